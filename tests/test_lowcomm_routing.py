"""NoLoCo's random routing of micro-batches between pipeline replicas
(lowcomm.route_microbatches; phalanx/parallel/lowcomm/routing.py): the permutations and the
origin they imply, every rank's view of them against every other's, the recipe checks, and
`phalanx run` end to end against the same run without routing."""

import itertools
import json
import threading
from pathlib import Path

import pytest
from conftest import read_jsonl, run_phalanx

from phalanx.config import ConfigError, validate
from phalanx.launch.cli import compose_recipe
from phalanx.parallel.lowcomm.routing import MicrobatchRouter, route_permutation
from phalanx.parallel.mesh import Layout
from phalanx.parallel.pipeline.lowering import lower
from phalanx.parallel.pipeline.schedules import build_schedule


def test_permutations_are_bijections_and_the_same_on_every_rank():
    for step, mb, stage in itertools.product(range(5), range(4), range(3)):
        perm = route_permutation(5, seed=7, step=step, mb=mb, stage=stage)
        assert sorted(perm) == list(range(5))
    # A pure function of (seed, step, micro-batch, stage): any process, any rank draws these
    # (numpy's default_rng is stable across platforms and versions).
    assert route_permutation(4, seed=0, step=0, mb=0, stage=0) == (2, 0, 1, 3)
    assert route_permutation(4, seed=1234, step=7, mb=3, stage=2) == (0, 2, 1, 3)
    # ... and they do change with each of them.
    draws = {route_permutation(4, seed=0, step=s, mb=k, stage=b)
             for s, k, b in itertools.product(range(3), range(3), range(2))}
    assert len(draws) > 5


def _routers(layout: Layout, schedule, step: int) -> dict[int, MicrobatchRouter]:
    out = {}
    for r in range(layout.world_size):
        out[r] = MicrobatchRouter(schedule=schedule, layout=layout, rank=r, seed=3)
        out[r].step = step
    return out


@pytest.mark.parametrize("name,pp,vpp,tp", [("1f1b", 3, 1, 1), ("gpipe", 2, 1, 2),
                                             ("zb_v", 2, 2, 1), ("interleaved_1f1b", 2, 2, 1)])
def test_every_send_meets_its_receive_and_the_loss_sees_its_origin(name, pp, vpp, tp):
    """For every rank of 3 replicas: each SEND's peer holds the matching RECV whose peer is the
    sender (forward and backward the same way back); following a micro-batch forward through
    the permutations lands it on the replica whose `origin` names where it started. zb_v puts
    stages 1 and 2 on one rank: that hand-over is in memory and not routed."""
    layout = Layout(dp_replicate=3, pp=pp, tp=tp, vpp=vpp)
    schedule = build_schedule(name, pp=pp, vpp=vpp, n_microbatches=4)
    lowered = lower(schedule, zero=False)
    twin = {"SEND_F": "RECV_F", "SEND_B": "RECV_B"}
    for step in range(3):
        routers = _routers(layout, schedule, step)
        crossed = 0
        for rank, router in routers.items():
            pp_rank = layout.coords(rank)["pp"]
            for a in lowered[pp_rank]:
                if a.kind not in twin:
                    continue
                prev, nxt = schedule.neighbours(a.stage, a.mb)
                other = routers[router.peer_rank(a)]
                assert {k: v for k, v in other.coords.items() if k not in ("dp_replicate", "pp")} \
                    == {k: v for k, v in router.coords.items() if k not in ("dp_replicate", "pp")}
                # The receive sits on the stage the message goes to.
                recv_stage = nxt if a.kind == "SEND_F" else prev
                match = [b for b in lowered[other.coords["pp"]]
                         if b.kind == twin[a.kind] and b.stage == recv_stage and b.mb == a.mb]
                assert len(match) == 1 and other.peer_rank(match[0]) == rank
                crossed += other.replica != router.replica
            assert router.sends_out(list(lowered[pp_rank])) <= len(lowered[pp_rank])
        assert crossed > 0  # the test is not vacuous: some messages change replica
        for mb in range(schedule.n_microbatches):
            route = schedule.routes[mb]
            for start in range(3):
                replica = start
                for s, nxt in zip(route, route[1:], strict=False):
                    if schedule.stage_to_rank[s] != schedule.stage_to_rank[nxt]:
                        replica = route_permutation(3, seed=3, step=step, mb=mb, stage=s)[replica]
                    at = routers[layout.rank_of(dp_replicate=replica, pp=schedule.stage_to_rank[nxt],
                                                dp_shard=0, tp=0)]
                    assert at.origin(mb, nxt) == start
                assert at.origin(mb) == start  # the last stage: targets of the start replica


def _check(overrides: list[str]):
    return validate(compose_recipe(overrides))


@pytest.mark.parametrize("overrides,message", [
    (["lowcomm=diloco", "lowcomm.route_microbatches=true", "parallel.pp=2",
      "--nproc-per-node", "4"],
     "lowcomm.route_microbatches=true with lowcomm.method=diloco: random routing of "
     "micro-batches between pipeline replicas is NoLoCo's; set lowcomm.method=noloco"),
    (["lowcomm.route_microbatches=true"], "with lowcomm.method=none"),
    (["lowcomm=noloco", "lowcomm.route_microbatches=true"],
     "lowcomm.route_microbatches=true with parallel.pp=1: it routes micro-batches between "
     "replicas of the next pipeline stage; set parallel.pp>=2"),
    (["lowcomm=noloco", "lowcomm.route_microbatches=true", "parallel.pp=2"],
     "lowcomm.method=noloco needs parallel.dp_replicate >= 2"),
])
def test_bad_routing_recipe_rejected_with_reason(overrides, message):
    with pytest.raises(ConfigError) as e:
        _check(overrides)
    assert message in str(e.value)


def test_routing_recipe_key():
    ok = _check(["lowcomm=noloco", "lowcomm.route_microbatches=true", "parallel.pp=2",
                 "--nproc-per-node", "4"])
    assert ok.lowcomm.route_microbatches and ok.parallel.dp_replicate == 2
    assert _check(["lowcomm=noloco"]).lowcomm.route_microbatches is False


ARGS = ["data=synthetic", "trainer=smoke", "parallel.micro_batch_size=2", "lowcomm=noloco",
        "lowcomm.sync_every=3", "parallel.pp=2", "--nproc-per-node", "4"]


@pytest.mark.e2e
def test_phalanx_run_routed_matches_unrouted_at_step_0(tmp_path: Path):
    """2 replicas x 2 stages, with and without routing (run side by side). Before any update
    every replica holds the same weights, so step 0's loss -- the same samples, each against
    its own targets, whatever replica's stage 1 it passed -- is bit for bit the unrouted one;
    from then on replicas' weights differ and the losses with them. Rank 0 (stage 0 of
    replica 0) counts one activation per micro-batch it sent to the other replica."""
    procs: dict[str, object] = {}

    def go(name: str, extra: list[str]) -> None:
        procs[name] = run_phalanx([*ARGS, *extra, "--run-dir", str(tmp_path / name)])

    jobs = [threading.Thread(target=go, args=("routed", ["lowcomm.route_microbatches=true"])),
            threading.Thread(target=go, args=("plain", []))]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    runs = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["steps"] == 10
        runs[name] = summary, read_jsonl(tmp_path / name / "metrics.jsonl")
    (s_on, m_on), (_, m_off) = runs["routed"], runs["plain"]
    assert s_on["final_loss"] < s_on["initial_loss"] - 1.0
    assert m_on[0]["loss"] == m_off[0]["loss"]
    assert all(a["loss"] != b["loss"] for a, b in zip(m_on[1:], m_off[1:], strict=True))
    seed = validate(compose_recipe(ARGS)).trainer.seed
    activation = 2 * 64 * validate(compose_recipe(ARGS)).model.hidden_size * 4  # mbs x seq x h, fp32
    for m in m_on:
        if m["lowcomm_syncs"]:
            continue
        out = sum(route_permutation(2, seed=seed, step=m["step"], mb=k, stage=0)[0] != 0
                  for k in range(2))
        assert m["lowcomm_bytes"] == out * activation
    assert m_on[0]["lowcomm_bytes"] > 0  # step 0 did route across replicas
