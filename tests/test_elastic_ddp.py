"""Replica recovery with 4 data-parallel workers: a rank that is not next to the dead one in
gloo's ring all-reduce must not wait for the collective timeout.

When rank 1 dies inside the gradient all-reduce, ranks 0 and 2 (its ring neighbours) see the
connection drop and leave the generation, abandoning their groups; rank 3 waits on them, alive
but gone. Before DDP's all-reduce became abortable it waited fault.collective_timeout_s (300 s
by default) and the run hung; with 2 workers there is no such bystander (test_elastic.py)."""

import json

import pytest
from conftest import read_jsonl, run_phalanx

pytestmark = pytest.mark.e2e


def test_bystander_in_the_ring_leaves_at_once(tmp_path):
    d = tmp_path / "dp4"
    proc = run_phalanx(["model=tiny", "data=synthetic", "trainer.seq_len=64",
                        "trainer.global_batch=8", "parallel.micro_batch_size=2", "parallel.dp=4",
                        "--nproc-per-node", "4", "trainer.steps=8", "trainer.eval_every=100",
                        "fault.spares=1", "fault.inject=[{rank:1,step:3,kind:kill}]",
                        "--run-dir", str(d)], timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((d / "summary.json").read_text())
    [rec] = s["recoveries"]
    assert rec["kind"] == "replica" and rec["steps_lost"] == 0 and rec["lost_ranks"] == [1]
    assert rec["recover_s"] < 20  # not the 300 s collective timeout
    assert s["replicas_agree"] is True and s["steps"] == 8
    left = {e["rank"]: e for e in read_jsonl(d / "events.jsonl") if e["event"] == "generation_left"}
    assert sorted(left) == [0, 2, 3]  # the bystander (3) left generation 0 like the others
    assert "generation 1 started" in left[3]["error"]
