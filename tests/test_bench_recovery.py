"""`phalanx bench recovery` end to end on a tiny job (2 workers, model=tiny, one kill): torchrun
restarting from a DCP checkpoint and phalanx's replica recovery with a warm spare through
the bench's own code path, torchft's healing when torchft is installed; the JSON document,
its figures, and the MTTR / steps-lost / goodput arithmetic on hand-made commit logs."""

import json
import math

import pytest

from phalanx.bench import BENCHES, write_result
from phalanx.bench.recovery import FIGURES, Case, analyse, bench, torchft_available

# 8 steps, rank 1 SIGKILLs itself before step 3, checkpoints after steps 1 and 3 (every 2).
# 2 workers keep it short; tests/test_elastic_ddp.py recovers 4 data-parallel workers.
TINY = Case(model=("model=tiny",), workers=2, seq_len=64, global_batch=8, steps=8, fail_first=3,
            fail_every=100, ckpt_every=2, elastic_steps=8, torchft_min_replicas=2,
            torchft_heartbeat_timeout_ms=1000, pg_timeout_s=30.0)


def _load(doc, tmp_path):
    out = tmp_path / "recovery.json"
    write_result(doc, out)
    doc = json.loads(out.read_text())
    assert set(doc) == {"bench", "quick", "machine", "runs", "figures"}
    assert doc["bench"] == "recovery" and doc["quick"] is True and "recovery" in BENCHES
    setup, *runs = doc["runs"]
    assert setup["kind"] == "setup" and setup["kills"] == [[1, 3]] and setup["workers"] == 2
    assert set(doc["figures"]) <= set(FIGURES)
    for key, v in doc["figures"].items():
        assert isinstance(v, float) and math.isfinite(v), (key, v)
    return doc, {r["system"]: r for r in runs}


def _one_failure(run):
    [k] = run["kills"]
    assert (k["rank"], k["step"]) == (1, 3)
    [f] = run["failures"]
    assert f["last_committed_before"] == 2 and f["end_step"] == 3
    assert f["mttr_s"] > 0 and f["end_t"] > k["at"]
    assert run["committed_steps"] == TINY.steps
    assert 0 < run["goodput_tokens_per_s"] <= run["steady_tokens_per_s"] * 1.05
    return f


@pytest.mark.e2e
def test_recovery_bench_torchrun_and_phalanx(tmp_path):
    doc = bench(TINY, quick=True, systems=("torchrun", "phalanx_replica"), timeout=120,
                root=tmp_path)
    doc, runs = _load(doc, tmp_path)
    figs = doc["figures"]
    assert set(figs) == {"mttr_s_torchrun", "mttr_s_replica", "mttr_speedup",
                         "steps_lost_replica", "goodput_phalanx", "goodput_torchrun"}

    tr = runs["torchrun"]
    f = _one_failure(tr)
    # Every worker restarted once and loaded the checkpoint written after step 1 (step 2),
    # then replayed step 2: one committed step lost.
    assert tr["restarts"] == 1 and f["restored_step"] == 2 and f["steps_lost"] == 1
    assert f["first_commit_after_step"] == 2
    assert 0 < f["restart_python_up_s"] < f["restart_pg_ready_s"] < f["restart_ckpt_loaded_s"] \
        < f["mttr_s"]
    assert figs["mttr_s_torchrun"] == pytest.approx(f["mttr_s"])
    assert figs["goodput_torchrun"] == pytest.approx(tr["goodput_tokens_per_s"])

    ph = runs["phalanx_replica"]
    f = _one_failure(ph)
    # Replica recovery: the next committed step is step 3 itself, nothing replayed.
    assert f["kind"] == "replica" and f["steps_lost"] == 0 and f["phalanx_steps_lost"] == 0
    assert f["first_commit_after_step"] == 3 and f["restored_step"] == 3
    assert ph["recoveries"] == 1 and ph["spare_replacements"] == 1
    assert figs["steps_lost_replica"] == 0.0
    assert figs["mttr_speedup"] == pytest.approx(figs["mttr_s_torchrun"] / figs["mttr_s_replica"])
    assert not list(tmp_path.glob("phalanx-recbench-*"))  # scratch files removed


@pytest.mark.e2e
@pytest.mark.skipif(torchft_available() is not None, reason="torchft is not installed")
def test_recovery_bench_torchft(tmp_path):
    doc = bench(TINY, quick=True, systems=("torchft",), timeout=120, root=tmp_path)
    doc, runs = _load(doc, tmp_path)
    ft = runs["torchft"]
    f = _one_failure(ft)
    assert f["steps_lost"] == 0 and len(ft["restarts"]) == 1 and not ft["left_running_at_the_end"]
    # The restarted replica group healed from a peer and took part in the step that ended it.
    assert f["restart_python_up_s"] < f["restart_manager_ready_s"] < f["mttr_s"]
    assert doc["figures"]["mttr_s_torchft"] == pytest.approx(f["mttr_s"])


def _c(step, t, participants=4):
    return {"step": step, "t": float(t), "participants": participants}


def test_analyse_definitions():
    tokens = 100
    # Rollback: committed 0..4, killed at t=5 before step 5, checkpoint at 3: steps 3, 4
    # re-executed, step 5 commits at t=12.
    log = [_c(s, s) for s in range(5)] + [_c(3, 10), _c(4, 11), _c(5, 12), _c(6, 13)]
    r = analyse(log, [{"rank": 1, "step": 5, "at": 5.0}], steps=7, tokens_per_step=tokens)
    [f] = r["failures"]
    assert (f["last_committed_before"], f["end_step"], f["steps_lost"]) == (4, 5, 2)
    assert f["mttr_s"] == 7.0 and f["first_commit_after_step"] == 3
    assert r["committed_steps"] == 7 and r["commits"] == 9
    # Goodput: steps 1..6 committed (final commits), from step 0's commit (t=0) to step 6's.
    assert r["goodput_tokens_per_s"] == pytest.approx(6 * tokens / 13)
    assert r["median_commit_interval_s"] == 1.0
    assert r["goodput_fraction"] == pytest.approx(6 / 13)

    # torchft-like: the survivors commit at 3 of 4 replica groups; the MTTR ends at the first
    # commit with all 4, and the reduced steps count their share of tokens.
    log = [_c(0, 0), _c(1, 1), _c(2, 3, 3), _c(3, 4, 3), _c(4, 5), _c(5, 6)]
    r = analyse(log, [{"rank": 2, "step": 2, "at": 1.5}], steps=6, tokens_per_step=tokens)
    [f] = r["failures"]
    assert f["end_step"] == 4 and f["mttr_s"] == 3.5 and f["steps_lost"] == 0
    assert f["reduced_commits"] == 2
    assert r["committed_tokens"] == pytest.approx(tokens * (1 + 0.75 + 0.75 + 1 + 1))

    # Not recovered before the end: no MTTR, and a run without its last step has no goodput.
    r = analyse([_c(0, 0), _c(1, 1)], [{"rank": 1, "step": 2, "at": 1.5}], steps=4,
                tokens_per_step=tokens)
    assert r["failures"][0]["mttr_s"] is None and math.isnan(r["mttr_s_median"])
    assert "goodput_tokens_per_s" not in r
