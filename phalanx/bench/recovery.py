"""`phalanx bench recovery`: time to recover from a killed worker, steps lost and goodput, for
torchrun restarting from DCP checkpoints, torchft healing a replica group from a peer, and
phalanx's replica and checkpoint recovery -- the same job killed at the same steps.

The job. 4 workers on this machine train phalanx's `small` Llama (model=small, ~10M
parameters; built by every system as `LlamaForCausalLM(model_config(run))` from the same
composed recipe, `init_weights(seed)`) with AdamW (phalanx's `build_adamw`, same
learning-rate schedule, grad-norm clip 1.0) on the same synthetic tokens: each step's
global batch is `global_batch` windows of `seq_len` tokens, split into 4 data-parallel
shards by phalanx's sampler. Every process has OMP_NUM_THREADS=1 (the 4 workers share the
machine's cores: 2 here, so a step is compute-bound and any extra process competes).

The failure, the same for every system: the worker of rank R SIGKILLs itself right before
step S, once (phalanx: `fault.inject=[{rank: R, step: S, kind: kill}]`, which reports its
wall-clock `at` first; the peers write a marker file with `at` and then kill themselves, so
a restarted process does not do it again). One run per system kills ranks 1, 2, 3 in turn
at steps S = fail_first, fail_first + fail_every, ... (mid-way between checkpoints), none
in the last fail_every steps. Rank 0 is never killed: it logs the peers' commits.

The systems:

- `torchrun`: `python -m torch.distributed.run --nnodes=1 --nproc-per-node=4
  --max-restarts=K --rdzv-backend=c10d --rdzv-endpoint=localhost:PORT -m
  phalanx.bench.peer_torchrun`: DDP + AdamW, a synchronous `dcp.save` of model and
  optimizer every `ckpt_every` steps; torchrun restarts every worker, which `dcp.load`s the
  latest checkpoint and replays the steps since.
- `torchrun_elastic`: the same with `--nnodes=1:2` (an elastic c10d rendezvous, whose
  default last-call wait of 30 s applies to the first rendezvous and to every restart);
  one failure only.
- `torchft`: 4 replica groups of one worker each (`phalanx.bench.peer_torchft`), the Rust
  lighthouse in this process (`LighthouseServer(bind="[::]:0", min_replicas=4)`, its default
  heartbeat timeout 5 s, join timeout and quorum tick; Manager(min_replica_size=4,
  hostname="localhost"), default async quorum, HTTP checkpoint transport); the killed
  replica group is restarted by this harness (torchft restarts nothing itself), polling
  every 0.05 s like phalanx's controller; it joins the next quorum and heals from a peer's
  live state; the survivors wait for it (why min 4: Case.torchft_min_replicas). No
  checkpoints are written (none is needed to heal from a peer).
- `torchft_min2` (full run only, `runs` only): the same with min_replicas=2, the survivors
  going on with 3 replica groups (and 3/4 of the batch) while the killed one restarts.
- `phalanx_replica`: `phalanx run parallel.dp=4 fault.spares=1 fault.policy=replica`: the
  lost rank's state comes from a live data-parallel replica, a warm spare (a process started
  ahead with torch imported, refilled after each use) takes its place. No checkpoints.
- `phalanx_replica_nospare`: the same with `fault.spares=0` (a fresh process).
- `phalanx_checkpoint`: `fault.policy=checkpoint checkpoint.disk_every=ckpt_every
  fault.spares=1`: every rank rolls back to the newest verified disk checkpoint.

Definitions (the same for every system, from wall-clock timestamps on this host):

- committed step: phalanx -- the controller writes the step's commit (`g{G}/commit/{step}`
  carries its `time.time()`, read live from the run's store by this harness); torchrun --
  rank 0 has the reduced, clipped gradient and is about to call `optimizer.step()`;
  torchft -- `Manager.should_commit()` returned True (every replica group logs its commits;
  a step index's commit is the earliest, with the number of participating replica groups
  torchft reports). Each is the instant the step's update is decided, just before the
  optimizer step.
- MTTR: from the kill (`at`) to the first committed step whose index is greater than the
  last step completed before the kill (S-1: the killed worker finished it), at the full
  world size (4 workers / 4 replica groups taking part). Re-executed steps after a rollback
  and torchft's steps at 3 replica groups do not end it. Figures are medians over the
  failures of one run.
- steps lost: committed steps executed again after the failure (step indices at or below
  S-1 committed before the kill and again afterwards, or twice afterwards).
- goodput: committed tokens between the commit of step 0 and that of the last step,
  divided by that time (tokens/s): sum over steps 1..M-1 of tokens in that step's final
  commit (global_batch x seq_len; for torchft, x participating replica groups / 4). It
  leaves out start-up, and includes every recovery, replayed step and checkpoint write.
  `goodput_fraction` in `runs` divides it by the same run's steady rate (global tokens /
  median commit-to-commit interval).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc
from phalanx.launch.world import free_port

NAME = "recovery"
WORKERS = 4
SYSTEMS = ("torchrun", "torchrun_elastic", "torchft", "phalanx_replica",
           "phalanx_replica_nospare", "phalanx_checkpoint")
# Measured in the full run only, reported in `runs` (no figure): torchft letting the survivors
# go on at reduced size (lighthouse min_replicas=2), see Case.torchft_min_replicas.
EXTRA_SYSTEMS = ("torchft_min2",)
FIGURES = ("mttr_s_torchrun", "mttr_s_torchrun_elastic", "mttr_s_torchft", "mttr_s_replica",
           "mttr_s_replica_nospare", "mttr_s_checkpoint", "mttr_speedup", "steps_lost_replica",
           "goodput_phalanx", "goodput_torchrun", "goodput_torchft")
POLL_S = 0.05  # the torchft harness's process poll: phalanx's controller polls as often


@dataclass(frozen=True)
class Case:
    """Model, batch, run length and failure schedule of one benchmark size."""

    model: tuple[str, ...] = ("model=small",)
    workers: int = WORKERS  # data-parallel workers / torchft replica groups (the issue: 4)
    seq_len: int = 128
    global_batch: int = 8
    steps: int = 80  # M: steps of each run
    fail_first: int = 15  # S of the first kill
    fail_every: int = 20  # N: a failure every N steps (none in the last N)
    ckpt_every: int = 10  # torchrun's dcp.save cadence; phalanx_checkpoint's disk_every
    elastic_steps: int = 25  # the torchrun_elastic run (one failure, at fail_first)
    seed: int = 1234
    # Lighthouse min_replicas and Manager min_replica_size. 4: the survivors wait for the
    # restarted replica group (a quorum of all 4 every step). With 2 or 3 they go on without
    # it, and on this 2-core machine the quorum never held all 4 again within a run: the
    # lighthouse's fast quorum forms as soon as the previous quorum's members are back, so a
    # newcomer (or whichever replica arrives last) is left out and heals at the next step,
    # and one replica group is always out (torchft_min2 in the full run's `runs`).
    torchft_min_replicas: int = 4
    torchft_heartbeat_timeout_ms: int = 5000  # the lighthouse's default
    pg_timeout_s: float = 60.0

    def kills(self, steps: int | None = None) -> list[tuple[int, int]]:
        """(rank, step) of each kill: ranks 1, 2, 3, 1, ... (rank 0 logs; it survives)."""
        m = self.steps if steps is None else steps
        # The last N steps stay failure-free: a torchft replica group restarting meanwhile
        # must be back before the others finish (they go on without it).
        at = range(self.fail_first, max(self.fail_first + 1, m - self.fail_every + 1),
                   self.fail_every)
        return [(1 + i % (self.workers - 1), s) for i, s in enumerate(at)]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def recipe(self) -> list[str]:
        """The recipe every system trains (phalanx gets these overrides verbatim)."""
        return [*self.model, "data=synthetic", f"trainer.seq_len={self.seq_len}",
                f"trainer.global_batch={self.global_batch}",
                f"parallel.micro_batch_size={self.global_batch // self.workers}",
                f"trainer.seed={self.seed}", f"parallel.dp={self.workers}",
                "--nproc-per-node", str(self.workers)]


FULL = Case()
# Same model and batch; fewer steps and failures (2 instead of 3), checkpoints more often.
QUICK = Case(steps=28, fail_first=8, fail_every=10, ckpt_every=5, elastic_steps=12)


# ------------------------------------------------------------------ shared by the peer scripts


class JsonLog:
    """Append-only JSON lines, flushed per line (a SIGKILLed writer loses nothing written)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.f = open(path, "a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by a SIGKILL
            out.append(json.loads(line))
    return out


class PeerJob:
    """What a peer worker trains: phalanx's model, data split, sampler and LR schedule, built
    from the bench's composed recipe (spec["run"]) and prepared corpus (spec["corpus"])."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from phalanx.config import RunConfig
        from phalanx.data import GlobalBatchSampler, TokenWindows, open_tokens, train_val_split
        from phalanx.models import LlamaForCausalLM
        from phalanx.orchestrator.corpus import corpus_from_dict
        from phalanx.parallel.data_parallel import model_config

        self.spec = spec
        self.run = run = RunConfig.from_dict(spec["run"])
        t = run.trainer
        tokens = open_tokens(corpus_from_dict(spec["corpus"]))
        (tr0, tr1), _ = train_val_split(len(tokens), run.data.val_fraction, t.seq_len)
        self.windows = TokenWindows(tokens, t.seq_len, start=tr0, stop=tr1)
        self.sampler = GlobalBatchSampler(len(self.windows), t.global_batch, t.seed)
        self.model = LlamaForCausalLM(model_config(run))
        self.model.init_weights(t.seed)
        self.kills = {(int(r), int(s)) for r, s in spec["kills"]}

    def batch(self, step: int, dp_rank: int, dp_size: int):
        ids = self.sampler.rank_indices(step, dp_rank, dp_size)
        return self.windows.batch(ids)

    def lr(self, step: int) -> float:
        from phalanx.parallel.optim import lr_factor

        o = self.run.optim
        return o.lr * lr_factor(step, cfg=o, total_steps=self.spec["steps"])

    def maybe_kill(self, step: int, rank: int) -> None:
        """SIGKILL this process right before `step` if the schedule says so, once."""
        if (rank, step) not in self.kills:
            return
        marker = Path(self.spec["markers"]) / f"kill_r{rank}_s{step}.json"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return  # done before: this is a restarted process replaying the step
        at = time.time()
        os.write(fd, json.dumps({"rank": rank, "step": step, "at": at, "pid": os.getpid()}).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ analysis (shared)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def analyse(commits: Sequence[dict[str, Any]], kills: Sequence[dict[str, Any]], *, steps: int,
            tokens_per_step: int, full: int = WORKERS) -> dict[str, Any]:
    """MTTR, steps lost and goodput from a run's commit log and kill records.

    `commits`: {"step", "t", "participants"} of every committed step in commit order
    (a replayed step appears once per commit); `kills`: {"rank", "step", "at"}."""
    log = sorted(commits, key=lambda c: c["t"])
    failures = []
    for k in sorted(kills, key=lambda k: k["at"]):
        at = k["at"]
        before = {c["step"] for c in log if c["t"] <= at}
        # The killed worker had finished step S-1: the step reached before the kill, even
        # when the logging worker's commit of it lands a moment after the kill (the peers'
        # commit points are per process).
        last = max(max(before, default=-1), k["step"] - 1)
        after = [c for c in log if c["t"] > at]
        end = next((c for c in after if c["step"] > last and c["participants"] >= full), None)
        upto = [c for c in after if end is None or c["t"] <= end["t"]]
        seen: dict[int, int] = {}
        for c in upto:
            if c["step"] <= last:
                seen[c["step"]] = seen.get(c["step"], 0) + 1
        # Re-executed: committed before the kill and again after, or twice after it.
        replayed = sorted(s for s, n in seen.items() if s in before or n > 1)
        first_after = upto[0] if upto else None
        failures.append({
            "rank": k["rank"], "step": k["step"], "at": at, "last_committed_before": last,
            "end_step": end["step"] if end else None, "end_t": end["t"] if end else None,
            "mttr_s": end["t"] - at if end else None,
            "first_commit_after_s": first_after["t"] - at if first_after else None,
            "first_commit_after_step": first_after["step"] if first_after else None,
            "first_commit_after_participants": first_after["participants"] if first_after else None,
            "steps_lost": len(replayed),
            "reduced_commits": sum(1 for c in upto if c["participants"] < full)})
    final: dict[int, dict[str, Any]] = {}
    for c in log:
        final[c["step"]] = c  # the committed record of a step is its last commit
    out: dict[str, Any] = {"failures": failures, "committed_steps": len(final),
                           "commits": len(log)}
    if 0 in final and steps - 1 in final and final[steps - 1]["t"] > final[0]["t"]:
        window = final[steps - 1]["t"] - final[0]["t"]
        tokens = sum(tokens_per_step * final[s]["participants"] / full
                     for s in range(1, steps) if s in final)
        gaps = [final[s]["t"] - final[s - 1]["t"] for s in range(1, steps)
                if s in final and s - 1 in final]
        steady = tokens_per_step / _median(gaps) if gaps else float("nan")
        out.update({"window_s": window, "committed_tokens": tokens,
                    "goodput_tokens_per_s": tokens / window,
                    "steady_tokens_per_s": steady, "median_commit_interval_s": _median(gaps),
                    "goodput_fraction": tokens / window / steady})
    first_kill = min((k["at"] for k in kills), default=math.inf)
    pre = sorted((c for c in final.values() if c["t"] < first_kill), key=lambda c: c["step"])
    pre_gaps = [b["t"] - a["t"] for a, b in zip(pre, pre[1:], strict=False)
                if b["step"] == a["step"] + 1]
    out["median_commit_interval_before_first_kill_s"] = _median(pre_gaps)
    t0 = log[0]["t"] if log else 0.0
    # Every commit, in time order: [step, seconds after the first commit, participants].
    out["commit_log"] = [[c["step"], round(c["t"] - t0, 3), c["participants"]] for c in log]
    mttrs = [f["mttr_s"] for f in failures if f["mttr_s"] is not None]
    out["mttr_s_median"] = _median(mttrs)
    out["mttr_s_all"] = mttrs
    out["steps_lost_total"] = sum(f["steps_lost"] for f in failures)
    return out


# ------------------------------------------------------------------ torchrun


def _spec_base(case: Case, tmp: Path, steps: int, kills: list[tuple[int, int]]) -> dict[str, Any]:
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus

    run = validate(compose_recipe([*case.recipe(), f"trainer.steps={steps}"]))
    (tmp / "markers").mkdir(parents=True, exist_ok=True)
    return {"run": run.to_dict(), "corpus": corpus_to_dict(prepare_corpus(run)), "steps": steps,
            "kills": kills, "markers": str(tmp / "markers"), "pg_timeout_s": case.pg_timeout_s}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kill_records(markers: Path) -> list[dict[str, Any]]:
    return sorted((json.loads(p.read_text()) for p in markers.glob("kill_*.json")),
                  key=lambda k: k["at"])


def _wait(proc: subprocess.Popen, timeout: float, log: Path, label: str) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"recovery bench: {label} still running after {timeout:.0f} s; "
                           f"log tail:\n{_tail(log)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"recovery bench: {label} exited with {proc.returncode}; "
                           f"log tail:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_torchrun(case: Case, tmp: Path, *, elastic: bool, timeout: float) -> dict[str, Any]:
    steps = case.elastic_steps if elastic else case.steps
    kills = case.kills(steps)[:1] if elastic else case.kills(steps)
    tmp.mkdir(parents=True)
    spec = {**_spec_base(case, tmp, steps, kills), "ckpt_every": case.ckpt_every,
            "ckpt_dir": str(tmp / "ckpt"), "log": str(tmp / "rank0.jsonl")}
    (tmp / "ckpt").mkdir()
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nnodes={'1:2' if elastic else '1'}", f"--nproc-per-node={case.workers}",
           f"--max-restarts={len(kills) + 1}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=phalanx-bench-{port}",
           "-m", "phalanx.bench.peer_torchrun", str(spec_path)]
    log_path = tmp / "torchrun.log"
    # torchrun's c10d rendezvous shares its TCPStore with the workers by default and the
    # restarted workers' init_process_group then reads the previous attempt's gloo addresses
    # (connectFullMesh: connection refused; pytorch issue 135712): the documented opt-out.
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(proc, timeout, log_path, "torchrun" + (" (elastic)" if elastic else ""))
    wall = time.time() - t0
    recs = read_jsonl(spec["log"])
    commits = [r for r in recs if r["event"] == "commit"]
    starts = [r for r in recs if r["event"] == "start"]
    kill_recs = _kill_records(tmp / "markers")
    res = analyse(commits, kill_recs, steps=steps, tokens_per_step=case.tokens_per_step,
                  full=case.workers)
    for f in res["failures"]:
        # Where the time goes: the first restarted process up, its process group formed,
        # the checkpoint loaded, then the replayed steps until the first new one commits.
        s = next((r for r in starts if r["t_proc"] > f["at"]), None)
        if s is not None:
            f.update({"restart_python_up_s": s["t_proc"] - f["at"],
                      "restart_torch_imported_s": s["t_imported"] - f["at"],
                      "restart_pg_ready_s": s["t_pg"] - f["at"],
                      "restart_ckpt_loaded_s": s["t_loaded"] - f["at"],
                      "restored_step": s["start_step"]})
    saves = [r["save_s"] for r in recs if r["event"] == "save"]
    return {"system": "torchrun_elastic" if elastic else "torchrun", "command": " ".join(cmd[1:]),
            "nnodes": "1:2" if elastic else "1", "steps": steps, "ckpt_every": case.ckpt_every,
            "checkpoint": "synchronous dcp.save of model + AdamW state (get_state_dict) every "
                          f"{case.ckpt_every} steps; restart: dcp.load of the latest",
            "env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, "restarts": len(starts) - 1,
            "dcp_save_s_median": _median(saves), "dcp_saves": len(saves), "wall_s": wall,
            "kills": kill_recs, **res}


# ------------------------------------------------------------------ torchft


def _torchft_commits(log_dir: Path, workers: int) -> list[dict[str, Any]]:
    """One commit per step index over every replica group's log (torchft never replays an
    index): the earliest `should_commit() == True`, the most participants any group saw."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in range(workers):
        for x in read_jsonl(log_dir / f"replica{r}.jsonl"):
            if x["event"] != "commit":
                continue
            c = by_step.setdefault(x["step"], {"step": x["step"], "t": x["t"], "groups": 0,
                                               "participants": x["participants"]})
            c["t"] = min(c["t"], x["t"])
            c["participants"] = max(c["participants"], x["participants"])
            c["groups"] += 1
    return sorted(by_step.values(), key=lambda c: c["t"])


def torchft_available() -> str | None:
    """None when torchft imports here, else why not."""
    try:
        import torchft  # noqa: F401
        from torchft.coordination import LighthouseServer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same
        return f"torchft does not import here: {type(e).__name__}: {e}"
    return None


def run_torchft(case: Case, tmp: Path, *, timeout: float) -> dict[str, Any]:
    from torchft.coordination import LighthouseServer

    steps, kills = case.steps, case.kills()
    tmp.mkdir(parents=True)
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=case.torchft_min_replicas,
                                  heartbeat_timeout_ms=case.torchft_heartbeat_timeout_ms)
    try:
        port = int(lighthouse.address().rsplit(":", 1)[1])
        (tmp / "ready").mkdir()
        (tmp / "logs").mkdir()
        spec = {**_spec_base(case, tmp, steps, kills), "replicas": case.workers,
                "lighthouse": f"http://localhost:{port}", "ready_dir": str(tmp / "ready"),
                "log_dir": str(tmp / "logs"), "torchft_min_replicas": case.torchft_min_replicas}
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        procs: dict[int, subprocess.Popen] = {}
        incarnation = dict.fromkeys(range(case.workers), 0)
        restarts: list[dict[str, Any]] = []

        def spawn(r: int) -> None:
            env = {**_env(), "PHALANX_BENCH_REPLICA": str(r),
                   "PHALANX_BENCH_INCARNATION": str(incarnation[r])}
            with open(tmp / "logs" / f"replica{r}.{incarnation[r]}.log", "wb") as out:
                procs[r] = subprocess.Popen([sys.executable, "-m", "phalanx.bench.peer_torchft",
                                             str(spec_path)], env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

        t0 = time.time()
        for r in range(case.workers):
            spawn(r)
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        finished_at: float | None = None
        left_running: list[int] = []
        try:
            while len(done) < case.workers:
                if done and finished_at is None:
                    finished_at = time.monotonic()
                if finished_at is not None and time.monotonic() - finished_at > 10.0:
                    # The job reached its last step; a restarted replica group still waiting
                    # for a quorum (the others finished first) would wait for ever.
                    left_running = sorted(set(range(case.workers)) - done)
                    break
                for r, p in list(procs.items()):
                    rc = p.poll()
                    if r in done or rc is None:
                        continue
                    if rc == 0:
                        done.add(r)
                        continue
                    if len(restarts) > len(kills):
                        raise RuntimeError(f"recovery bench: torchft replica {r} exited with {rc}"
                                           f" (restarts used up); log tail:\n"
                                           f"{_tail(tmp / 'logs' / f'replica{r}.{incarnation[r]}.log')}")
                    seen = time.time()
                    incarnation[r] += 1
                    spawn(r)  # what torchelastic would do for this replica group, at once
                    restarts.append({"replica": r, "exit_code": rc, "seen_t": seen,
                                     "spawned_t": time.time()})
                if time.monotonic() > deadline:
                    raise RuntimeError(f"recovery bench: torchft still running after {timeout:.0f}"
                                       f" s; replica 0 log tail:\n"
                                       f"{_tail(tmp / 'logs' / f'replica0.{incarnation[0]}.log')}")
                time.sleep(POLL_S)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        wall = time.time() - t0
    finally:
        lighthouse.shutdown()
    recs = read_jsonl(tmp / "logs" / "replica0.jsonl")
    commits = _torchft_commits(tmp / "logs", case.workers)
    kill_recs = _kill_records(tmp / "markers")
    res = analyse(commits, kill_recs, steps=steps, tokens_per_step=case.tokens_per_step,
                  full=case.workers)
    for f in res["failures"]:
        rr = next((x for x in restarts if x["seen_t"] > f["at"]), None)
        if rr is not None:
            f["harness_detect_s"] = rr["seen_t"] - f["at"]
        starts = [x for x in read_jsonl(tmp / "logs" / f"replica{f['rank']}.jsonl")
                  if x["event"] == "start" and x["t_proc"] > f["at"]]
        if starts:
            s = starts[0]
            f.update({"restart_python_up_s": s["t_proc"] - f["at"],
                      "restart_torch_imported_s": s["t_imported"] - f["at"],
                      "restart_manager_ready_s": s["t_manager"] - f["at"]})
        healed = [x for x in read_jsonl(tmp / "logs" / f"replica{f['rank']}.jsonl")
                  if x["event"] == "commit" and x["t"] > f["at"]]
        if healed:
            f["restarted_first_commit_s"] = healed[0]["t"] - f["at"]
    aborts = sum(1 for r in recs if r["event"] == "abort")
    return {"system": "torchft", "steps": steps, "replica_groups": case.workers,
            "workers_per_group": 1, "lighthouse": {
                "min_replicas": case.torchft_min_replicas,
                "heartbeat_timeout_ms": case.torchft_heartbeat_timeout_ms,
                "join_timeout_ms": "default (60000)", "quorum_tick_ms": "default (100)"},
            "manager": {"min_replica_size": case.torchft_min_replicas, "use_async_quorum": True,
                        "checkpoint_transport": "HTTPTransport (default)", "init_sync": False},
            "restarted_by": f"this harness (polls every {POLL_S} s, starts a new process)",
            "restarts": restarts, "aborted_steps_replica0": aborts, "wall_s": wall,
            "left_running_at_the_end": left_running,
            "kills": kill_recs, **res}


# ------------------------------------------------------------------ phalanx


class _CommitWatcher(threading.Thread):
    """Reads every generation's commit keys (with the controller's wall-clock `t`) from the
    run's store while it runs; they vanish with the controller."""

    def __init__(self, port: int, token: str, workers: int, steps: int) -> None:
        super().__init__(daemon=True, name="commit-watcher")
        self.port, self.token, self.workers = port, token, workers
        self.last_step = steps  # nxt[g] == steps: step steps-1 committed in generation g
        self.commits: list[dict[str, Any]] = []
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import torch.distributed as dist

        from phalanx.orchestrator.commit import RUN, current_generation
        from phalanx.orchestrator.control_plane import ControlPlane

        try:
            store = dist.TCPStore("127.0.0.1", self.port, is_master=False,
                                  timeout=timedelta(seconds=120))
        except Exception as e:  # noqa: BLE001
            self.error = f"could not reach the run's store: {e}"
            return
        run_cp = ControlPlane(store, token=self.token, generation=RUN)
        nxt: dict[int, int] = {}
        try:
            while not self._halt.is_set():
                for g in range(current_generation(run_cp) + 1):
                    cp = ControlPlane(store, token=self.token, generation=g)
                    if g not in nxt:
                        rec = cp.get("recovery")
                        if rec is None:
                            continue
                        nxt[g] = int(rec.get("step", 0))
                    while (v := cp.get(f"commit/{nxt[g]}")) is not None:
                        self.commits.append({"step": nxt[g], "t": float(v["t"]),
                                             "generation": g, "participants": self.workers})
                        nxt[g] += 1
                if self.last_step in nxt.values():
                    return  # the last step committed: nothing more to read (and no store
                    # call left to fail loudly when the controller exits)
                self._halt.wait(0.1)
        except Exception:  # noqa: BLE001 - the controller exited: the store is gone
            return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


PHALANX_VARIANTS = {
    "phalanx_replica": ["fault.spares=1", "fault.policy=replica"],
    "phalanx_replica_nospare": ["fault.spares=0", "fault.policy=replica"],
    "phalanx_checkpoint": ["fault.spares=1", "fault.policy=checkpoint"],
}


def run_phalanx(case: Case, tmp: Path, variant: str, *, timeout: float) -> dict[str, Any]:
    steps, kills = case.steps, case.kills()
    extra = list(PHALANX_VARIANTS[variant])
    if variant == "phalanx_checkpoint":
        extra.append(f"checkpoint.disk_every={case.ckpt_every}")
    inject = ",".join(f"{{rank:{r},step:{s},kind:kill}}" for r, s in kills)
    run_dir = tmp / "run"
    args = [*case.recipe(), f"trainer.steps={steps}", f"trainer.eval_every={steps + 1}",
            f"fault.inject=[{inject}]", f"fault.max_failures={len(kills) + 1}", *extra,
            "--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "phalanx", "run", *args]
    port, token = free_port(), secrets.token_hex(16)
    env = {**_env(), "MASTER_PORT": str(port), "PHALANX_TOKEN": token}
    tmp.mkdir(parents=True)
    log_path = tmp / "phalanx.log"
    watcher = _CommitWatcher(port, token, case.workers, steps)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        watcher.start()
        try:
            _wait(proc, timeout, log_path, variant)
        finally:
            watcher.stop()
    wall = time.time() - t0
    events = read_jsonl(run_dir / "events.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    kill_recs = [{"rank": e["rank"], "step": e["step"], "at": e["at"]} for e in events
                 if e["event"] == "fault_injected"]
    commits = watcher.commits
    source = "store commit keys (controller time.time())"
    if not commits or max(c["step"] for c in commits) < steps - 1:
        raise RuntimeError(f"recovery bench: {variant}: read {len(commits)} commits from the "
                           f"run's store ({watcher.error or 'the run ended first'})")
    res = analyse(commits, kill_recs, steps=steps, tokens_per_step=case.tokens_per_step,
                  full=case.workers)
    recovered = [e for e in events if e["event"] == "recovered"]
    for f, r in zip(res["failures"], recovered, strict=False):
        f.update({"kind": r["kind"], "phalanx_detect_s": r["detect_s"],
                  "phalanx_recover_s": r["recover_s"], "phalanx_steps_lost": r["steps_lost"],
                  "restored_step": r["source"]["step"],
                  "recovered_event_after_kill_s": r["time"] - f["at"]})
        # Where the time goes: the controller saw the exit, published the new generation,
        # the survivors left the old one, the replacement started.
        after = [e for e in events if e["time"] > f["at"]]
        for name, key in (("failure", "failure_event_s"), ("generation", "generation_event_s"),
                          ("worker_start", "replacement_started_s")):
            e = next((e for e in after if e["event"] == name), None)
            if e is not None:
                f[key] = e["time"] - f["at"]
        left = [e["time"] - f["at"] for e in after if e["event"] == "generation_left"
                and e.get("generation") == r["generation"] - 1]
        if left:
            f["survivors_left_s"] = max(left)
    spare_used = sum(1 for e in events if e["event"] == "worker_start" and "spare" in e)
    return {"system": variant, "command": "phalanx run " + " ".join(args[:-2]), "steps": steps,
            "commit_times": source, "recoveries": len(summary["recoveries"]),
            "spare_replacements": spare_used, "summary_wall_s": summary["wall_s"],
            "summary_tokens_per_s": summary["tokens_per_s"],
            "steps_executed": summary["steps_executed"], "wall_s": wall, "kills": kill_recs,
            **res}


# ------------------------------------------------------------------ the bench


def measure(case: Case, systems: Sequence[str] = SYSTEMS, *, timeout: float = 600.0,
            root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One run per system, in order; raw records. Scratch files under `root` are removed."""
    tmp = Path(tempfile.mkdtemp(prefix="phalanx-recbench-", dir=root))
    runs: list[dict[str, Any]] = []
    try:
        for system in systems:
            t0 = time.monotonic()
            print(f"recovery bench: {system} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            d = tmp / system
            if system in ("torchrun", "torchrun_elastic"):
                rec = run_torchrun(case, d, elastic=system == "torchrun_elastic", timeout=timeout)
            elif system == "torchft":
                rec = run_torchft(case, d, timeout=timeout)
            elif system == "torchft_min2":
                rec = run_torchft(replace(case, torchft_min_replicas=2), d, timeout=timeout)
                rec["system"] = system
            else:
                rec = run_phalanx(case, d, system, timeout=timeout)
            rec["load_avg_1m_before"], rec["load_avg_1m_after"] = load, os.getloadavg()[0]
            runs.append(rec)
            print(f"recovery bench: {system}: MTTR {rec['mttr_s_all']} s, steps lost "
                  f"{rec['steps_lost_total']}, goodput {rec.get('goodput_tokens_per_s', 0):.0f} "
                  f"tok/s ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if os.environ.get("PHALANX_BENCH_KEEP"):  # debugging: logs and run directories
            print(f"recovery bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return runs


def figures_from(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The figures of the systems that ran (all of FIGURES when every system ran)."""
    by = {r["system"]: r for r in runs if "system" in r}
    figs: dict[str, float] = {}
    names = {"torchrun": "mttr_s_torchrun", "torchrun_elastic": "mttr_s_torchrun_elastic",
             "torchft": "mttr_s_torchft", "phalanx_replica": "mttr_s_replica",
             "phalanx_replica_nospare": "mttr_s_replica_nospare",
             "phalanx_checkpoint": "mttr_s_checkpoint"}
    for system, key in names.items():
        if system in by:
            figs[key] = by[system]["mttr_s_median"]
    if "torchrun" in by and "phalanx_replica" in by:
        figs["mttr_speedup"] = figs["mttr_s_torchrun"] / figs["mttr_s_replica"]
    if "phalanx_replica" in by:
        figs["steps_lost_replica"] = by["phalanx_replica"]["steps_lost_total"]
    for system, key in (("phalanx_replica", "goodput_phalanx"), ("torchrun", "goodput_torchrun"),
                        ("torchft", "goodput_torchft")):
        if system in by:
            figs[key] = by[system].get("goodput_tokens_per_s", float("nan"))
    return {k: figs[k] for k in FIGURES if k in figs}


DEFINITIONS = {
    "committed_step": "phalanx: the controller's commit of the step (its time.time(), read from "
                      "the run's store); torchrun: rank 0 holds the reduced, clipped gradient, "
                      "just before optimizer.step(); torchft: Manager.should_commit() returned "
                      "True, just before optimizer.step() (the earliest replica group to commit "
                      "the step index, with the participant count torchft reports)",
    "mttr_s": "kill (the killed process's time.time() right before its SIGKILL) -> first "
              "committed step with index > the last step committed before the kill, with all "
              "4 workers / replica groups taking part; median over the failures of one run",
    "steps_lost": "committed steps executed again after a failure (sum over the run's failures)",
    "goodput": "tokens/s: committed tokens of steps 1..M-1 (global_batch x seq_len per step; "
               "torchft: x participating replica groups / 4) / (commit time of step M-1 - commit "
               "time of step 0); start-up excluded, recoveries, replays and checkpoint writes "
               "included",
    "goodput_phalanx": "the phalanx_replica run (warm spare, replica recovery)",
    "torchft": "figures from the torchft run with lighthouse min_replicas=4 (the survivors wait "
               "for the restarted replica group); torchft_min2 (full run) lets them go on",
    "mttr_speedup": "mttr_s_torchrun / mttr_s_replica",
}


def _finite(x: Any) -> Any:
    """NaN/inf (a median of nothing) as null: the document stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def bench(case: Case, *, quick: bool, systems: Sequence[str] = SYSTEMS,
          timeout: float = 600.0, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    unavailable: dict[str, str] = {}
    todo = list(systems)
    if "torchft" in todo and (why := torchft_available()) is not None:
        todo.remove("torchft")
        unavailable = {"mttr_s_torchft": why, "goodput_torchft": why}
    t0 = time.monotonic()
    runs = measure(case, todo, timeout=timeout, root=root)
    setup = {"kind": "setup", "case": asdict(case), "workers": case.workers,
             "tokens_per_step": case.tokens_per_step, "kills": case.kills(),
             "threads_per_worker": 1, "usable_cores": len(os.sched_getaffinity(0)),
             "definitions": DEFINITIONS, "systems": todo, "unavailable": unavailable,
             "bench_wall_s": time.monotonic() - t0}
    figs = figures_from(runs)
    for key, v in list(figs.items()):
        if not math.isfinite(v):  # e.g. no failure recovered to the full world before the end
            unavailable[key] = ("not measured in this run: no failure recovered to the full "
                                "world size before the run ended (see runs)")
            del figs[key]
    doc = result_doc(NAME, quick=quick, runs=[_finite(setup), *map(_finite, runs)],
                     figures=figs)
    for key in unavailable:  # null, with the reason in runs[0]["unavailable"]
        doc["figures"][key] = None
    if set(systems) >= set(SYSTEMS):
        doc["figures"] = {k: doc["figures"][k] for k in FIGURES}
    return doc


def run(*, quick: bool) -> dict[str, Any]:
    """The registered entry point: QUICK or FULL, every system (FULL: also torchft_min2)."""
    if quick:
        return bench(QUICK, quick=True, timeout=300.0)
    return bench(FULL, quick=False, systems=(*SYSTEMS, *EXTRA_SYSTEMS), timeout=600.0)


__all__ = ["FIGURES", "FULL", "QUICK", "SYSTEMS", "Case", "JsonLog", "PeerJob", "analyse",
           "bench", "figures_from", "measure", "run"]

if __name__ == "__main__":
    from phalanx.bench import main

    sys.exit(main([NAME, *sys.argv[1:]]))
