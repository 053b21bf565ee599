"""`phalanx run` end to end: a controller and real worker processes over gloo on localhost."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_jsonl, run_phalanx

from phalanx.data import build_stdlib_corpus, open_tokens, train_val_split, unigram_entropy_nats

pytestmark = pytest.mark.e2e

SUMMARY_KEYS = {"status", "steps", "initial_loss", "final_loss", "tokens_per_s", "wall_s",
                "layout", "failures", "recoveries"}
FAST = ["data=synthetic", "trainer=smoke"]


def _ok(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    return summary


def test_default_job_learns_below_unigram_entropy(tmp_path):
    """README command 1: `phalanx run fault=demo`, the embedded default job with worker 1
    SIGKILLed before step 100 and taken over by a warm spare fed by its replica."""
    run_dir = tmp_path / "default"
    t0 = time.monotonic()
    proc = run_phalanx(["fault=demo", "--run-dir", str(run_dir)], timeout=300)
    wall = time.monotonic() - t0
    summary = _ok(proc, run_dir)
    assert wall < 180
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "events.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["steps"] == 200 and summary["layout"]["dp_replicate"] == 2
    tokens = open_tokens(build_stdlib_corpus(Path(os.environ["PHALANX_CACHE"]) / "corpus"))
    (lo, hi), _ = train_val_split(len(tokens), 0.05, 128)
    entropy = unigram_entropy_nats(tokens[lo:hi])
    assert summary["corpus"]["sha256"] and summary["corpus"]["source"] == "stdlib"
    assert summary["final_loss"] < entropy, (summary["final_loss"], entropy)
    assert summary["final_val_loss"] < entropy
    assert summary["final_loss"] < summary["initial_loss"] - 2.0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(200))
    assert sum("val_loss" in m for m in metrics) == 4
    [rec] = summary["recoveries"]
    assert rec["kind"] == "replica" and rec["steps_lost"] == 0 and rec["lost_ranks"] == [1]
    assert summary["replicas_agree"] is True


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The same synthetic recipe: twice on 2 workers, once on 1 worker."""
    base = tmp_path_factory.mktemp("smoke")
    out = {}
    for name, n in (("a", 2), ("b", 2), ("single", 1)):
        run_dir = base / name
        proc = run_phalanx([*FAST, "--nproc-per-node", str(n), "trainer.audit_samples=true",
                            "--run-dir", str(run_dir)])
        _ok(proc, run_dir)
        out[name] = run_dir
    return out


def test_same_command_twice_is_bit_identical(smoke_runs):
    a = read_jsonl(smoke_runs["a"] / "metrics.jsonl")
    b = read_jsonl(smoke_runs["b"] / "metrics.jsonl")
    assert len(a) == len(b) == 10
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [m.get(key) for m in a] == [m.get(key) for m in b], key


def test_ddp_matches_single_process_over_same_global_batch(smoke_runs):
    dp = read_jsonl(smoke_runs["a"] / "metrics.jsonl")
    single = read_jsonl(smoke_runs["single"] / "metrics.jsonl")
    plan = json.loads((smoke_runs["single"] / "plan.json").read_text())
    assert plan["layout"]["dp_replicate"] == 1 and plan["grad_accum"] == 2
    for x, y in zip(dp, single, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    # Same samples consumed, whatever the world size (the audit log records them).
    def consumed(run_dir: Path) -> dict[int, list[int]]:
        steps: dict[int, list[int]] = {}
        for f in sorted((run_dir / "audit").glob("rank*.jsonl")):
            for rec in read_jsonl(f):
                steps.setdefault(rec["step"], []).extend(rec["ids"])
        return {s: sorted(ids) for s, ids in steps.items()}
    assert consumed(smoke_runs["a"]) == consumed(smoke_runs["single"])


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phalanx", "run", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {n} steps within {timeout} s")


def _worker_pids(run_dir: Path) -> dict[int, int]:
    return {e["rank"]: e["pid"] for e in read_jsonl(run_dir / "events.jsonl")
            if e["event"] == "worker_start"}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


LONG = ["data=synthetic", "trainer=smoke", "trainer.steps=100000", "trainer.eval_every=100000"]


@pytest.fixture
def controller():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:  # a failed assertion must not leave a run behind
        if p.poll() is None:
            p.kill()
            p.wait()


def test_worker_sigkill_fails_run_cleanly(tmp_path, controller):
    run_dir = tmp_path / "kill"
    proc = _start([*LONG, "fault.policy=none", "--run-dir", str(run_dir)])
    controller.append(proc)
    _wait_for_steps(run_dir, 3, proc)
    pids = _worker_pids(run_dir)
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "worker rank 1" in err and "was killed by signal SIGKILL" in err
    assert "Not recovered (fault.policy=none)" in err
    assert not any(_alive(p) for p in pids.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert [(f["rank"], f["kind"]) for f in summary["failures"]] == [(1, "worker_exit")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_workers_at_a_step_boundary(tmp_path, controller, sig):
    run_dir = tmp_path / "stop"
    proc = _start([*LONG, "--run-dir", str(run_dir)])
    controller.append(proc)
    _wait_for_steps(run_dir, 3, proc)
    pids = _worker_pids(run_dir)
    if sig == signal.SIGTERM:
        # A batch system (Slurm's --signal, scancel, requeue) signals every process of the
        # job: the workers must leave the stop to the controller.
        for pid in pids.values():
            os.kill(pid, sig)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert not any(_alive(p) for p in pids.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"] == []
    assert f"stopped by {sig.name}" in summary["message"]
    # Every worker finished the same step and left through the front door.
    exits = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "worker_exit"]
    assert exits == []  # nobody had to be terminated
    for rank in pids:
        assert "Traceback" not in (run_dir / "logs" / f"rank{rank}.log").read_text()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(summary["steps"]))


def test_frozen_worker_is_declared_dead_and_killed(tmp_path, controller):
    run_dir = tmp_path / "frozen"
    proc = _start([*LONG, "fault.heartbeat_s=0.5", "fault.heartbeat_timeout_s=3",
                   "fault.policy=none", "--run-dir", str(run_dir)])
    controller.append(proc)
    _wait_for_steps(run_dir, 3, proc)
    pids = _worker_pids(run_dir)
    os.kill(pids[0], signal.SIGSTOP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "worker rank 0" in err and "sent no heartbeat" in err
    assert not any(_alive(p) for p in pids.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(f["rank"], f["kind"]) for f in summary["failures"]] == [(0, "heartbeat_timeout")]


def test_bf16_user_files_and_wandb_offline(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, src in enumerate(sorted(Path(__file__).parent.glob("*.py"))):
        (corpus / f"{i}.txt").write_bytes(src.read_bytes())
    run_dir = tmp_path / "bf16"
    proc = run_phalanx(["trainer=smoke", "precision=bf16", "logging=wandb", "data=files",
                        f"data.path={corpus}", "trainer.seq_len=32", "--run-dir", str(run_dir)])
    summary = _ok(proc, run_dir)
    assert summary["corpus"]["source"] == "user"
    assert summary["final_loss"] < summary["initial_loss"]
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"tokens_per_s" in data and b"val_loss" in data  # per-step history was logged


def test_multirun_sweeps_one_run_directory_each(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_phalanx([*FAST, "--multirun", "trainer.steps=2,3", "--run-dir", str(sweep)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(json.loads((d / "summary.json").read_text())["steps"]
                   for d in sweep.iterdir() if (d / "summary.json").exists())
    assert steps == [2, 3]


def test_interleaved_pipeline_with_dp_trains_and_writes_timeline(tmp_path):
    """The 3D-parallel issue's command: dp=2 x pp=2, vpp=2 interleaved, on 4 workers."""
    run_dir = tmp_path / "pp"
    proc = run_phalanx(["data=synthetic", "parallel.dp=2", "parallel.pp=2", "parallel.vpp=2",
                        "parallel.schedule=interleaved_1f1b", "parallel.micro_batch_size=1",
                        "trainer.global_batch=16", "trainer.seq_len=64", "trainer.steps=8",
                        "trainer.eval_every=4", "trainer.eval_batches=1", "--nproc-per-node", "4",
                        "--run-dir", str(run_dir)])
    summary = _ok(proc, run_dir)
    assert summary["layout"] == {"dp_replicate": 2, "dp_shard": 1, "pp": 2, "tp": 1, "vpp": 2}
    assert summary["final_loss"] < summary["initial_loss"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["schedule"]["name"] == "interleaved_1f1b" and plan["schedule"]["n_microbatches"] == 8
    trace = json.loads((run_dir / "timeline.json").read_text())
    rows = {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert rows == {0, 1}
    pipe = summary["pipeline"]
    assert 0 <= pipe["bubble_simulated"] <= pipe["bubble_measured"] < 1


def test_tensor_parallel_with_sequence_parallel_trains(tmp_path):
    run_dir = tmp_path / "tp"
    proc = run_phalanx([*FAST, "parallel.tp=2", "parallel.sp=true", "--run-dir", str(run_dir)])
    summary = _ok(proc, run_dir)
    assert summary["layout"]["tp"] == 2 and summary["layout"]["dp_replicate"] == 1
    assert summary["final_loss"] < summary["initial_loss"]


def test_zero3_run_matches_ddp_loss_curve(tmp_path, smoke_runs):
    """`phalanx run` with ZeRO-3 over 2 ranks follows the DDP run's losses step by step."""
    run_dir = tmp_path / "zero3"
    proc = run_phalanx([*FAST, "parallel.dp_shard=2", "parallel.zero.stage=3",
                        "parallel.recompute=full", "--run-dir", str(run_dir)])
    summary = _ok(proc, run_dir)
    assert summary["layout"]["dp_shard"] == 2 and summary["layout"]["dp_replicate"] == 1
    zero = read_jsonl(run_dir / "metrics.jsonl")
    ddp = read_jsonl(smoke_runs["a"] / "metrics.jsonl")
    for x, y in zip(zero, ddp, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert zero[-1]["val_loss"] == pytest.approx(ddp[-1]["val_loss"], rel=1e-5)
