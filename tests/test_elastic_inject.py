"""Fault injection inside the step, failures during recovery, corrupt checkpoints, random
failures and stragglers: `phalanx run` with real worker processes survives each of them.

Injections fire at a point of the step (`fault.inject[].at`): inside a data-parallel
all-reduce, while a pipeline receive is pending, during ZeRO's optimizer step, or while a
rank enters a recovery generation. Every check is on state: summary.json, events.jsonl
(where each survivor was blocked when its generation ended: `generation_left.aborted_in`)
and the per-rank state digests or the per-step losses of a failure-free run (the dp=2
reference; the pp=2 and ZeRO layouts reach the same losses up to float rounding).

The failure-free reference is the straggler run: a rank that sleeps each step changes
timing, not state. Runs are combined where one does not hide the other, to keep this
file within its time budget on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_jsonl, run_summary

from phalanx.config import ConfigError, validate
from phalanx.launch.cli import compose_recipe
from phalanx.orchestrator.faults import StragglerWatch, draw_random_faults, with_random_faults

pytestmark = pytest.mark.e2e

STEPS = 10
HB_TIMEOUT = 3.0
BASE = ["data=synthetic", "trainer=smoke", "trainer.eval_every=100", f"trainer.steps={STEPS}",
        "fault.heartbeat_s=0.5", f"fault.heartbeat_timeout_s={HB_TIMEOUT}"]


def run(tmp: Path, name: str, args: list[str]) -> dict:
    summary = run_summary([*BASE, *args], tmp / name, timeout=150)
    summary["events"] = read_jsonl(summary["dir"] / "events.jsonl")
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    return summary


def events(s: dict, name: str) -> list[dict]:
    return [e for e in s["events"] if e["event"] == name]


def losses(s: dict) -> list[float]:
    by_step = {m["step"]: m["loss"] for m in read_jsonl(s["dir"] / "metrics.jsonl")}
    return [by_step[k] for k in sorted(by_step)]


def injected(s: dict) -> list[tuple]:
    return [(e["rank"], e["kind"], e["where"]) for e in events(s, "fault_injected")]


def left(s: dict, rank: int, generation: int) -> dict:
    [e] = [e for e in events(s, "generation_left")
           if e["rank"] == rank and e["generation"] == generation]
    return e


def assert_detected_by_heartbeat(rec: dict) -> None:
    # From the fault to its detection: the heartbeat timeout, less up to one heartbeat
    # period (the last beat came before the freeze), plus polling and a loaded machine.
    assert HB_TIMEOUT - 0.6 <= rec["detect_s"] <= HB_TIMEOUT + 2.5, rec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """dp=2, rank 1 sleeps 0.2 s before every step from step 1: a straggler (reported, not
    evicted) -- and, in state, a failure-free run."""
    tmp = tmp_path_factory.mktemp("inject_ref")
    return run(tmp, "slow", ["parallel.dp=2", "fault.slow_s=0.2", "fault.straggler_steps=3",
                             "fault.inject=[{rank:1,step:1,kind:slow}]"])


def test_straggler_is_reported_by_busy_time(reference):
    s = reference
    [hit] = s["stragglers"]
    # Wall-clock step times are equal on both ranks (rank 0 waits in the all-reduce);
    # busy time (wall minus time blocked on peers) names the slow one.
    assert hit["rank"] == 1 and hit["ratio"] > 2.0 and hit["policy"] == "report"
    assert hit["busy_s"] > 0.2 and hit["evicted"] is False  # its sleep is busy time
    assert [e["rank"] for e in events(s, "straggler")] == [1]
    assert s["failures"] == [] and s["recoveries"] == []
    assert s["replicas_agree"] is True


def test_straggler_evicted_survivor_fails_in_recovery_then_stop_inside_allreduce(tmp_path,
                                                                                 reference):
    """Three failures in a row on dp=2, each at a different point:

    1. straggler_policy=evict: slow rank 1 is fenced and replaced like a failed worker (its
       replacement is not slow: an injection fires once per run);
    2. rank 0, the only holder of the state, is killed while it enters that recovery: the
       replacement has received nothing, so it must not be taken for a replica -- the run
       restarts from step 0 (no checkpoint);
    3. at step 9, rank 1 freezes (SIGSTOP) right after issuing its gradient all-reduce:
       rank 0 is inside that all-reduce until rank 1 is declared dead (heartbeat timeout)
       and fenced; rank 0's replica recovers it exactly.
    The run ends in the failure-free state."""
    s = run(tmp_path, "churn", [
        "parallel.dp=2", "fault.slow_s=0.2", "fault.straggler_steps=3",
        "fault.straggler_policy=evict",
        "fault.inject=[{rank:1,step:1,kind:slow},{rank:0,step:1,kind:kill,at:recovery},"
        "{rank:1,step:9,kind:stop,at:allreduce}]"])
    assert injected(s) == [(1, "slow", "step"), (0, "kill", "recovery"),
                           (1, "stop", "allreduce")]
    [hit] = s["stragglers"]
    assert hit["rank"] == 1 and hit["policy"] == "evict" and hit["evicted"] is True
    assert [(f["rank"], f["kind"]) for f in s["failures"]] == [
        (1, "straggler"), (0, "worker_exit"), (1, "heartbeat_timeout")]
    evicted, restarted, stopped = s["recoveries"]
    assert evicted["kind"] == "replica" and evicted["interrupted"]
    assert evicted["stateless"] == [1]  # the replacement had not received its state yet
    assert left(s, 1, 1)["during"] == "recovery"
    assert restarted["kind"] == "restart" and "had not received their state" in restarted["why"]
    assert_detected_by_heartbeat(stopped)
    assert stopped["kind"] == "replica" and stopped["steps_lost"] == 0
    assert left(s, 0, 2)["aborted_in"] == ["allreduce"]  # rank 0 was inside the all-reduce
    assert s["state_digests"] == reference["state_digests"]  # exact: as if nothing failed
    assert losses(s) == losses(reference)


def test_stop_inside_pipeline_receive(tmp_path, reference):
    """pp=2: rank 1 freezes while its receive of an activation is pending; rank 0 goes on
    until it waits on a receive from rank 1 too. No replica and no checkpoint: once rank 1
    is declared dead and fenced, the run restarts and completes."""
    s = run(tmp_path, "recv", ["parallel.pp=2", "fault.inject=[{rank:1,step:3,kind:stop,at:recv}]"])
    assert injected(s) == [(1, "stop", "recv")]
    assert [(f["rank"], f["kind"]) for f in s["failures"]] == [(1, "heartbeat_timeout")]
    assert "recv" in left(s, 0, 0)["aborted_in"]  # rank 0 waited on a receive from rank 1
    [rec] = s["recoveries"]
    assert_detected_by_heartbeat(rec)
    assert rec["kind"] == "restart" and rec["recover_s"] > 0
    assert losses(s) == pytest.approx(losses(reference), rel=1e-6)


def test_random_kill_inside_zero_optimizer_step_and_corrupt_checkpoint(tmp_path, reference):
    """fault.random draws one failure (max_failures=1) from a seeded exponential
    distribution: with seed 5, rank 1 at step 5, during the optimizer step. With ZeRO-2
    (dp_shard=2) rank 1 dies after the commit, with its shard updated and before the
    all-gather of the updated shards, in which rank 0 is then left waiting. No replica holds
    rank 1's optimizer shard: everyone rolls back to a checkpoint. Just before, rank 0
    corrupted the newest one (step 4) on disk: the recovery skips it (checksum) and uses
    the one before."""
    drawn = draw_random_faults(mtbf_steps=5, kinds=["kill"], at=["optimizer"], seed=5, world=2,
                               steps=STEPS, budget=1)
    assert drawn == [{"rank": 1, "step": 5, "kind": "kill", "random": True, "at": "optimizer"}]
    s = run(tmp_path, "zero", [
        "parallel.dp_shard=2", "parallel.zero.stage=2", "checkpoint.disk_every=2",
        "fault.max_failures=1", "fault.inject=[{rank:0,step:5,kind:corrupt_checkpoint}]",
        "fault.random.mtbf_steps=5", "fault.random.seed=5", "fault.random.at=[optimizer]"])
    [schedule] = events(s, "fault_schedule")
    assert schedule["inject"] == drawn
    bad, fired = events(s, "fault_injected")
    assert (fired["rank"], fired["step"], fired["where"], fired["random"]) == (1, 5, "optimizer",
                                                                                True)
    assert left(s, 0, 0)["aborted_in"] == ["allgather"]
    assert bad["kind"] == "corrupt_checkpoint" and bad["checkpoint_step"] == 4
    [skipped] = events(s, "checkpoint_skipped")
    assert skipped["path"] == bad["path"] and "checksum mismatch" in skipped["reason"]
    [rec] = s["recoveries"]
    assert rec["kind"] == "checkpoint" and rec["source"]["step"] == 2
    assert rec["steps_lost"] == 6 - 2  # step 5 had committed
    assert losses(s) == pytest.approx(losses(reference), rel=1e-6)


# -- in-process: the pure parts and the config errors ------------------------------------


def test_random_schedule_is_seeded_exponential_and_capped():
    kw = dict(mtbf_steps=20.0, kinds=["kill", "stop"], at=["step", "recv"], world=4,
              steps=100_000)
    a = draw_random_faults(seed=1, budget=10_000, **kw)
    assert a == draw_random_faults(seed=1, budget=10_000, **kw)  # deterministic
    assert a != draw_random_faults(seed=2, budget=10_000, **kw)
    steps = [i["step"] for i in a]
    assert steps == sorted(set(steps)) and steps[-1] < 100_000 and steps[0] >= 1
    gaps = [b - c for b, c in zip(steps, [0, *steps[:-1]], strict=True)]
    assert 19.0 < sum(gaps) / len(gaps) < 22.0  # mean of ceil(Exp(20)) ~ 20.5
    assert {i["rank"] for i in a} == {0, 1, 2, 3} and {i["kind"] for i in a} == {"kill", "stop"}
    assert len(draw_random_faults(seed=1, budget=3, **kw)) == 3
    # The budget is max_failures minus the failures fault.inject already declares.
    r = validate(compose_recipe(["fault.random.mtbf_steps=1", "fault.max_failures=3",
                                 "trainer.steps=50",
                                 "fault.inject=[{rank:0,step:2,kind:kill},{rank:1,step:3,kind:slow}]"]))
    expanded, drawn = with_random_faults(r)
    assert len(drawn) == 2 and expanded.fault.inject == [*r.fault.inject, *drawn]
    validate(expanded)  # the drawn entries are valid injections


def test_straggler_watch_needs_consecutive_steps_and_reports_once():
    w = StragglerWatch(factor=2.0, steps=3, peers=lambda r: [0, 1, 2, 3])
    base = {0: 0.10, 1: 0.11, 2: 0.09}
    assert w.observe({**base, 3: 0.5}) == [] and w.observe({**base, 3: 0.5}) == []
    assert w.observe({**base, 3: 0.15}) == []  # the streak breaks
    for _ in range(2):
        assert w.observe({**base, 3: 0.5}) == []
    [hit] = w.observe({**base, 3: 0.4})
    assert hit["rank"] == 3 and hit["ratio"] == 5.0 and hit["peers_median_s"] == 0.1
    assert w.observe({**base, 3: 0.5}) == []  # once
    # Peers by pipeline stage: a slower stage is not a straggler among its own dp peers.
    w = StragglerWatch(factor=2.0, steps=1, peers=lambda r: [r % 2, r % 2 + 2])
    assert w.observe({0: 0.1, 1: 0.5, 2: 0.1, 3: 0.5}) == []


@pytest.mark.parametrize("overrides,message", [
    (["fault.inject=[{rank:0,step:1,kind:kill,at:backward}]"],
     "fault.inject[0].at='backward': choose step, allreduce, recv, optimizer, recovery"),
    (["fault.inject=[{rank:0,step:1,kind:explode}]"],
     "fault.inject[0].kind='explode': choose kill, stop, exit, slow, hang, corrupt_checkpoint"),
    (["fault.inject=[{rank:0,step:1,kind:slow,at:recv}]"],
     "kind slow fires before a step only"),
    (["fault.inject=[{rank:0,step:1,kind:kill,when:3}]"], "with optional at: POINT"),
    (["fault.inject=[{rank:0,step:1,kind:kill,delay_s:-1}]"], "delay_s=-1 must be >= 0"),
    (["fault.random.mtbf_steps=5", "fault.random.kinds=[slow]"],
     "fault.random.kinds=['slow']: choose from kill, stop, exit, hang"),
    (["fault.random.mtbf_steps=5", "fault.random.at=[later]"], "fault.random.at=['later']"),
    (["fault.straggler_policy=kick"], "choose off, report or evict"),
    (["fault.straggler_factor=0.5"], "fault.straggler_factor=0.5 must exceed 1"),
])
def test_bad_injection_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_recipe(overrides))
    assert message in str(e.value)
