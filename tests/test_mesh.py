"""Rank layout: DESIGN.md's order dp_replicate, pp, dp_shard, tp (tp innermost)."""

import itertools

import pytest

from phalanx.parallel.mesh import Layout


def test_rank_order_tp_innermost_replicate_outermost():
    lay = Layout(dp_replicate=2, pp=2, dp_shard=2, tp=2)
    assert lay.world_size == 16
    assert lay.coords(1) == {"dp_replicate": 0, "pp": 0, "dp_shard": 0, "tp": 1}
    assert lay.coords(2) == {"dp_replicate": 0, "pp": 0, "dp_shard": 1, "tp": 0}
    assert lay.coords(8)["dp_replicate"] == 1
    for r in range(16):
        assert lay.rank_of(**lay.coords(r)) == r
    assert lay.group_ranks(0, ("tp",)) == [0, 1]
    assert lay.group_ranks(0, ("dp_replicate",)) == [0, 8]
    dp_ranks = sorted(lay.dp_rank(r) for r in lay.group_ranks(0, ("dp_replicate", "dp_shard")))
    assert dp_ranks == list(range(lay.dp))


@pytest.mark.parametrize("dims", list(itertools.product([1, 2, 3], repeat=4)))
def test_coords_bijective(dims):
    lay = Layout(*dims)
    seen = {tuple(lay.coords(r).values()) for r in range(lay.world_size)}
    assert len(seen) == lay.world_size


def test_json_round_trip_and_bad_dims():
    lay = Layout(dp_replicate=2, tp=2)
    assert Layout.from_dict(lay.to_dict()) == lay
    with pytest.raises(ValueError, match="tp=0"):
        Layout(tp=0)
    with pytest.raises(ValueError, match="outside a world of 4"):
        lay.coords(4)
