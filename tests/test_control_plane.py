"""The control plane trusts only values signed with the run's token."""

import json

import pytest
import torch.distributed as dist

from phalanx.orchestrator.control_plane import ControlPlane


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_signed_round_trip_and_generation_prefix(store):
    cp = ControlPlane(store, token="secret", generation=3)
    cp.set("plan", {"world": 4})
    assert cp.get("plan") == {"world": 4}
    assert store.check(["g3/plan"]) and not store.check(["g0/plan"])
    cp.delete("plan")
    assert cp.get("plan") is None


def test_unsigned_forged_and_replayed_values_are_ignored(store):
    cp = ControlPlane(store, token="secret", generation=0)
    store.set("g0/stop", json.dumps({"v": "{}", "sig": "00" * 32}))  # forged
    store.set("g0/raw", b"not json")  # unsigned
    ControlPlane(store, token="other", generation=0).set("plan", {"x": 1})  # wrong token
    # A value signed for generation 0 copied under generation 1's prefix must not verify.
    cp.set("hb/0", {"t": 1})
    store.set("g1/hb/0", store.get("g0/hb/0"))
    assert cp.get("stop") is None and cp.get("raw") is None and cp.get("plan") is None
    assert ControlPlane(store, token="secret", generation=1).get("hb/0") is None
    assert set(cp.rejected) == {"g0/stop", "g0/raw", "g0/plan"}


def test_wait_times_out_with_the_key_named(store):
    cp = ControlPlane(store, token="secret", generation=0)
    with pytest.raises(TimeoutError, match="g0/plan"):
        cp.wait("plan", timeout_s=0.2)
