"""Elastic fault tolerance end to end: `phalanx run` with injected failures survives them.

Failures are declared (`fault.inject`), the workers are real processes, and each check is
on state: the per-rank SHA-256 of parameters and optimizer state at the end of the run
(`summary.state_digests`) must equal a failure-free run's, data-parallel replicas must agree
(invariant 2), and the audit of sample ids must show every step's global batch consumed
exactly once in the generation that committed it (invariant 3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import read_jsonl, run_phalanx, run_summary

pytestmark = pytest.mark.e2e

BASE = ["data=synthetic", "trainer=smoke", "trainer.eval_every=100",
        "trainer.audit_samples=true", "fault.heartbeat_s=0.5", "fault.heartbeat_timeout_s=3"]


def run(tmp: Path, name: str, args: list[str]) -> dict:
    return run_summary([*BASE, "trainer.steps=12", *args], tmp / name, timeout=180)


def losses(s: dict) -> list[float]:
    by_step = {m["step"]: m["loss"] for m in read_jsonl(s["dir"] / "metrics.jsonl")}
    return [by_step[k] for k in sorted(by_step)]


def exactly_once(s: dict) -> None:
    """Per step, the committing generation's ranks consumed a global batch with no repeats,
    identical to what a failure-free run consumes (the sampler is a function of the step)."""
    seen: dict[int, dict[int, list[int]]] = defaultdict(dict)
    gen_of: dict[int, int] = {}
    for f in (s["dir"] / "audit").glob("rank*.jsonl"):
        for rec in read_jsonl(f):
            step, gen = rec["step"], rec["generation"]
            if gen >= gen_of.get(step, -1):
                if gen > gen_of.get(step, -1):
                    seen[step] = {}
                gen_of[step] = gen
                seen[step][rec["dp_rank"]] = rec["ids"]
    assert sorted(seen) == list(range(s["steps"]))
    for step, per_rank in seen.items():
        ids = [i for r in sorted(per_rank) for i in per_rank[r]]
        assert len(ids) == len(set(ids)) == 8, step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic_ref")
    return {"dp2": run(tmp, "dp2", ["parallel.dp=2"]),
            "pp2": run(tmp, "pp2", ["parallel.pp=2"])}


def test_killed_replica_is_replaced_exactly(tmp_path, reference):
    s = run(tmp_path, "kill", ["parallel.dp=2", "fault.inject=[{rank:1,step:5,kind:kill}]"])
    ref = reference["dp2"]
    [rec] = s["recoveries"]
    assert rec["kind"] == "replica" and rec["steps_lost"] == 0 and rec["lost_ranks"] == [1]
    assert rec["recover_s"] > 0 and rec["detect_s"] >= 0
    assert [f["rank"] for f in s["failures"]] == [1]
    assert s["replicas_agree"] is True
    assert s["state_digests"] == ref["state_digests"]  # bit-identical to no failure
    assert losses(s) == losses(ref)
    exactly_once(s)


def test_frozen_worker_is_fenced_and_replaced(tmp_path, reference):
    s = run(tmp_path, "stop", ["parallel.dp=2", "fault.inject=[{rank:0,step:4,kind:stop}]"])
    [rec] = s["recoveries"]
    assert rec["kind"] == "replica" and rec["detect_s"] >= 2.5  # the heartbeat timeout
    assert [(f["rank"], f["kind"]) for f in s["failures"]] == [(0, "heartbeat_timeout")]
    assert s["state_digests"] == reference["dp2"]["state_digests"]
    exactly_once(s)


def test_two_failures_in_a_row(tmp_path, reference):
    s = run(tmp_path, "two", ["parallel.dp=2",
                              "fault.inject=[{rank:1,step:3,kind:kill},{rank:0,step:7,kind:exit}]"])
    assert [r["kind"] for r in s["recoveries"]] == ["replica", "replica"]
    assert s["state_digests"] == reference["dp2"]["state_digests"]
    exactly_once(s)


def test_lost_stage_rolls_back_to_the_checkpoint(tmp_path, reference):
    # The persisters start with the workers and need a few seconds (a process importing
    # torch): which checkpoint is the newest durable one at the kill depends on the machine.
    s = run(tmp_path, "ckpt", ["parallel.pp=2", "checkpoint.disk_every=2",
                               "fault.inject=[{rank:1,step:11,kind:kill}]"])
    [rec] = s["recoveries"]
    assert rec["kind"] == "checkpoint", rec
    assert rec["source"]["step"] in (2, 4, 6, 8, 10) and rec["steps_lost"] == 11 - rec["source"]["step"]
    assert s["state_digests"] == reference["pp2"]["state_digests"]
    assert losses(s) == losses(reference["pp2"])
    exactly_once(s)


def test_lost_stage_rolls_back_to_its_buddys_memory_copy(tmp_path, reference):
    """No replica and no disk checkpoint: the lost rank's snapshot comes from its buddy's
    memory (the copy its persister kept), every survivor rolls back to its own snapshot of
    that step in host memory, and the run ends bit-identical to a failure-free one. Rank 0
    is slowed so that the persisters (a process importing torch each) are up before step 5."""
    from phalanx.checkpoint.manager import peer_dir

    s = run(tmp_path, "peer", ["parallel.pp=2", "checkpoint.peer_every=5", "fault.slow_s=0.5",
                               "fault.inject=[{rank:0,step:0,kind:slow},{rank:1,step:11,kind:kill}]"])
    [rec] = s["recoveries"]
    assert rec["kind"] == "peer", rec
    assert rec["source"]["sources"] == {"1": 0}
    assert rec["source"]["step"] in (5, 10) and rec["steps_lost"] == 11 - rec["source"]["step"]
    assert s["state_digests"] == reference["pp2"]["state_digests"]
    assert losses(s) == losses(reference["pp2"])
    exactly_once(s)
    # The copies in host memory are gone with the run.
    assert not peer_dir(s["dir"] / "checkpoints").exists()


def test_policy_none_and_too_many_failures_fail_cleanly(tmp_path):
    d = tmp_path / "max"
    proc = run_phalanx([*BASE, "trainer.steps=12", "parallel.dp=2", "fault.max_failures=1",
                        "--run-dir", str(d),
                        "fault.inject=[{rank:1,step:2,kind:kill},{rank:0,step:6,kind:kill}]"],
                       timeout=180)
    assert proc.returncode == 1
    assert "fault.max_failures=1" in proc.stderr
    summary = json.loads((d / "summary.json").read_text())
    assert len(summary["recoveries"]) == 1 and len(summary["failures"]) == 2


def test_controller_death_leaves_no_orphans_and_resume_continues(tmp_path):
    d = tmp_path / "ctl"
    args = [*BASE, "parallel.dp=2", "trainer.steps=400", "checkpoint.disk_every=3",
            "--run-dir", str(d)]
    proc = subprocess.Popen([sys.executable, "-m", "phalanx", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        ck = d / "checkpoints"
        while not (ck.is_dir() and any((p / "manifest.json").exists() for p in ck.iterdir())):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        pids = [e["pid"] for e in read_jsonl(d / "events.jsonl") if e["event"] == "worker_start"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{p}").exists() and "Z" not in
                  Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[:1] for p in pids):
            assert time.monotonic() < deadline, "a worker outlived its controller"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = run_phalanx([*BASE, "parallel.dp=2", "checkpoint.resume=latest", "--run-dir", str(d),
                        "trainer.steps=15"], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["resumed_from"]["step"] > 0 and summary["status"] == "ok"


def test_hang_is_attributed_to_the_stuck_rank_and_recovered(tmp_path, reference):
    """Rank 1 stays alive and keeps beating but never reaches the step's collective: the
    stacks show rank 0 waiting inside torch (DDP's backward) and rank 1 in our own code."""
    s = run(tmp_path, "hang", ["parallel.dp=2", "fault.hang_timeout_s=3",
                               "fault.inject=[{rank:1,step:5,kind:hang}]"])
    [hang] = [e for e in read_jsonl(s["dir"] / "events.jsonl") if e["event"] == "hang"]
    assert hang["ranks"] == [1] and "rank 1 in worker.py" in hang["why"]
    assert [(f["rank"], f["kind"]) for f in s["failures"]] == [(1, "hang")]
    assert s["recoveries"][0]["kind"] == "replica"
    assert s["state_digests"] == reference["dp2"]["state_digests"]


def test_shrink_then_grow_keeps_the_global_batch(tmp_path):
    """fault.replace=false on pp=2 x dp=2: rank 3 (replica 1, stage 1) is lost, so replica 1
    leaves whole and replica 0 goes on alone, accumulating twice the micro-batches (global
    batch and gradient scale unchanged, invariant 5); 3 steps later two newcomers take
    replica 1's place again, fed stage by stage by replica 0."""
    four = ["parallel.pp=2", "parallel.dp=2", "parallel.micro_batch_size=2", "--nproc-per-node", "4"]
    ref = run(tmp_path, "ref", four)
    s = run(tmp_path, "shrink", [*four, "fault.replace=false", "fault.grow_after_steps=3",
                                 "fault.inject=[{rank:3,step:4,kind:kill}]"])
    [rec] = s["recoveries"]
    assert rec["kind"] == "shrink" and rec["steps_lost"] == 0
    events = read_jsonl(s["dir"] / "events.jsonl")
    worlds = [e["world_size"] for e in events if e["event"] == "generation"]
    assert worlds == [4, 2, 4] and any(e["event"] == "grow" for e in events)
    assert [e["layout"]["dp_replicate"] for e in events if e["event"] == "generation"] == [2, 1, 2]
    assert s["world_size"] == 4 and s["replicas_agree"] is True
    exactly_once(s)
    # Same global batches, another reduction order: equal within float tolerance.
    assert losses(s) == pytest.approx(losses(ref), rel=1e-5)


def test_lost_intermediate_stage_is_rebuilt_by_the_checkfree_formula(tmp_path):
    """pp=4, rank 2 (an intermediate stage, no copy anywhere) killed before step 8: its layers
    become the gradient-norm-weighted average of stages 1 and 3. The neighbours' weights at
    step 8 are those of a failure-free run's step-8 checkpoint (training is deterministic);
    applying the formula to them with the norms the recovery used gives the rebuilt layers."""
    import torch

    from phalanx.checkpoint import store
    from phalanx.checkpoint.checkfree import reconstruct_stage
    from phalanx.checkpoint.recover import tensors_digest

    pp4 = ["parallel.pp=4", "parallel.micro_batch_size=2", "--nproc-per-node", "4"]
    ref = run(tmp_path, "ref", [*pp4, "checkpoint.disk_every=8", "trainer.steps=9"])
    s = run(tmp_path, "cf", [*pp4, "trainer.steps=10", "fault.policy=checkfree",
                             "fault.inject=[{rank:2,step:8,kind:kill}]"])
    [rec] = s["recoveries"]
    assert rec["kind"] == "checkfree" and rec["steps_lost"] == 0
    [ev] = [e for e in read_jsonl(s["dir"] / "events.jsonl") if e["event"] == "checkfree_rebuilt"]
    assert (ev["prev_rank"], ev["next_rank"]) == (1, 3) and ev["prev_grad_norm"] > 0
    weights = store.read_tensors(store.step_dir(ref["dir"] / "checkpoints", 8), prefix="model/")
    stage = {k.removeprefix("model/"): v for k, v in weights.items()}
    per = 1  # tiny has 4 layers: one per stage

    def layers(first: int) -> dict[str, torch.Tensor]:
        return {k: v for k, v in stage.items()
                if k.startswith(tuple(f"model.layers.{i}." for i in range(first, first + per)))}

    rebuilt = reconstruct_stage(layers(1), layers(3), ev["prev_grad_norm"], ev["next_grad_norm"],
                                ev["layers"])
    assert tensors_digest(rebuilt) == ev["digest"]
    assert s["final_loss"] < s["initial_loss"]
