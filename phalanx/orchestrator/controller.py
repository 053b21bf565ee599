"""The controller: owns the store, publishes the plan, starts and watches the workers.

It decides and never computes gradients (DESIGN.md). In this build a lost worker
ends the run (after the others are terminated); recovery arrives with the
elastic issue and plugs in where `_fail` is called.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from phalanx.config import ConfigError, RunConfig
from phalanx.orchestrator.console import Console
from phalanx.orchestrator.control_plane import TOKEN_ENV, ControlPlane
from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus
from phalanx.orchestrator.plan import Plan, plan_single_node
from phalanx.orchestrator.run_dir import RunDir
from phalanx.orchestrator.timeline import export_timeline

log = logging.getLogger("phalanx.controller")

POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: if the controller dies (even by SIGKILL), the kernel
    # kills the worker, so no worker outlives its controller.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in text[-lines:])


class ResumeError(ConfigError):
    """checkpoint.resume names nothing loadable: a bad-input error, before any worker starts."""


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    log_path: Path
    hb_value: Any = None
    hb_seen: float = 0.0
    step: int = -1
    done: bool = False


@dataclass
class Outcome:
    exit_code: int
    summary: dict[str, Any]
    message: str = ""
    failures: list[dict[str, Any]] = field(default_factory=list)


class Controller:
    def __init__(self, run: RunConfig, *, run_dir: Path, resolved_yaml: str,
                 port: int = 0) -> None:
        self.run = run
        self.dir = RunDir(run_dir)
        self.resolved_yaml = resolved_yaml
        self.port = port
        # A token set by the user (PHALANX_TOKEN) outlives the run, so a resumed run can check
        # the signatures of the checkpoints an earlier run wrote.
        self.token = os.environ.get(TOKEN_ENV) or secrets.token_hex(16)
        self.workers: list[_Worker] = []
        self.metrics: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._signal: int | None = None
        self.checkpoints: list[dict[str, Any]] = []
        self.resumed: dict[str, Any] | None = None
        self._event_seq: dict[int, int] = {}

    # -- signals: the first Ctrl-C/SIGTERM asks for a stop at a step boundary, the second forces.
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is None:
            self._signal = signum
            log.warning("%s: stopping at the next step boundary (again to force)",
                        signal.Signals(signum).name)
        else:
            raise KeyboardInterrupt

    def run_job(self) -> Outcome:
        t_start = time.monotonic()
        self.dir.write_config(self.resolved_yaml)
        self.dir.event("run_start", pid=os.getpid())
        corpus = corpus_to_dict(prepare_corpus(self.run))
        backend = "nccl" if torch.cuda.is_available() and \
            torch.cuda.device_count() >= self.run.cluster.devices_per_node else "gloo"
        plan = plan_single_node(self.run, generation=0, backend=backend,
                                cores=len(os.sched_getaffinity(0)), corpus=corpus)
        self.dir.write_plan(plan.to_json())
        start_step = self._resolve_resume()
        store = dist.TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False)
        cp = ControlPlane(store, token=self.token, generation=plan.generation)
        cp.set("config", self.run.to_dict())
        cp.set("plan", plan.to_json())
        cp.set("resume", self.resumed or {})
        self.dir.event("generation", generation=plan.generation, world_size=plan.world_size,
                       layout=plan.layout.to_dict())
        console = Console(self.run.logging, total_steps=self.run.trainer.steps)
        if start_step:
            console.set_completed(start_step)
            console.note(f"resumed from {self.resumed['path']} at step {start_step}")
        wandb_run = self._start_wandb()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._spawn(plan, store.port)
            status, message = self._watch(cp, plan, console, wandb_run, start_step)
        except KeyboardInterrupt:
            status, message = "failed", "forced stop (second interrupt); workers were killed."
        finally:
            self._terminate_all()
            console.close()
            for s, h in old.items():
                signal.signal(s, h)
        summary = self._summary(status, message, plan, corpus, time.monotonic() - t_start)
        if plan.schedule is not None:
            pipeline = export_timeline(self.dir.path, schedule=plan.schedule)
            if pipeline is not None:
                summary["pipeline"] = pipeline
        self.dir.event("run_end", status=status)
        self.dir.write_summary(summary)
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in summary.items()
                                      if isinstance(v, (int, float, str))})
            wandb_run.finish(exit_code=0 if status == "ok" else 1)
        self.dir.close()
        if status == "ok":
            code = 0
        elif self._signal is not None and not self.failures:
            code = 128 + self._signal
        else:
            code = 1
        return Outcome(exit_code=code, summary=summary, message=message, failures=self.failures)

    def _start_wandb(self) -> Any:
        lg = self.run.logging
        if not lg.wandb:
            return None
        import wandb

        return wandb.init(project=lg.wandb_project, mode=lg.wandb_mode, dir=str(self.dir.path),
                          name=self.dir.path.name, config=self.run.to_dict())

    def _spawn(self, plan: Plan, port: int) -> None:
        for m in plan.members:
            env = dict(os.environ)
            threads = str(plan.threads_per_worker)
            env.update({
                "RANK": str(m.rank), "LOCAL_RANK": str(m.local_rank),
                "WORLD_SIZE": str(plan.world_size),
                "LOCAL_WORLD_SIZE": str(self.run.cluster.devices_per_node),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                TOKEN_ENV: self.token, "PHALANX_GENERATION": str(plan.generation),
                "PHALANX_RUN_DIR": str(self.dir.path),
                # Without a thread budget, each worker's OpenMP pool takes every core and
                # multi-process steps run 10-15x slower on a small machine.
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONUNBUFFERED": "1",
            })
            log_path = self.dir.worker_log(m.rank)
            with open(log_path, "ab") as out:
                # Own session: a terminal's Ctrl-C reaches the controller only, which then
                # stops the workers together at a step boundary.
                proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.worker"], env=env,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=_die_with_parent)
            self.workers.append(_Worker(rank=m.rank, proc=proc, log_path=log_path))
            self.dir.event("worker_start", rank=m.rank, pid=proc.pid, generation=plan.generation)

    def _resolve_resume(self) -> int:
        """checkpoint.resume: verify the checkpoint here, before any worker starts, and report
        the damaged ones skipped on the way (invariant 4). Returns the step to start at."""
        from phalanx.checkpoint.reshard import resolve
        from phalanx.checkpoint.store import CheckpointError

        spec = self.run.checkpoint.resume
        if not spec:
            return 0
        try:
            path, manifest, skipped = resolve(spec, self.checkpoint_root(), token=self.token)
        except (CheckpointError, OSError) as e:
            raise ResumeError(f"checkpoint.resume={spec}: {e}") from None
        for bad, why in skipped:
            self.dir.event("checkpoint_skipped", path=bad, reason=why)
            log.warning("skipped damaged checkpoint %s: %s", bad, why)
        step = int(manifest["step"])
        if step >= self.run.trainer.steps:
            raise ResumeError(f"checkpoint.resume={spec}: {path} is at step {step}, and "
                              f"trainer.steps={self.run.trainer.steps}; raise trainer.steps to "
                              "train further.")
        self.resumed = {"path": str(path), "step": step, "layout": manifest.get("layout"),
                        "skipped": [b for b, _ in skipped]}
        self.dir.event("resume", **self.resumed)
        return step

    def checkpoint_root(self) -> Path:
        from phalanx.checkpoint.reshard import default_root

        return default_root(self.run, self.dir.path)

    def _drain_events(self, cp: ControlPlane, console: Console) -> None:
        """Workers' events (checkpoints saved or failed) into events.jsonl and the console."""
        for w in self.workers:
            seq = self._event_seq.get(w.rank, 0)
            while (rec := cp.get(f"event/{w.rank}/{seq}")) is not None:
                cp.delete(f"event/{w.rank}/{seq}")
                seq += 1
                name = rec.pop("event")
                self.dir.event(name, **rec)
                if name == "checkpoint_saved":
                    self.checkpoints.append(rec)
                    console.note(f"checkpoint step {rec['step']} on disk "
                                 f"({rec['bytes'] / 2**20:.1f} MiB, durable after "
                                 f"{rec['durable_s']:.2f} s in the background)")
                elif name == "checkpoint_failed":
                    console.note(f"checkpoint {rec.get('command')} at step {rec.get('step')} "
                                 f"failed on rank {rec.get('rank')}: {rec.get('error')} "
                                 "(training continues)", warning=True)
            self._event_seq[w.rank] = seq

    def _watch(self, cp: ControlPlane, plan: Plan, console: Console,
               wandb_run: Any, start_step: int = 0) -> tuple[str, str]:
        f = self.run.fault
        next_step = start_step
        t0 = time.monotonic()
        stop_sent: float | None = None
        while True:
            now = time.monotonic()
            next_step = self._drain_metrics(cp, next_step, t0, console, wandb_run)
            self._drain_events(cp, console)
            for w in self.workers:
                rc = w.proc.poll()
                # After poll: a worker writes done/ before it exits, so an exit seen here
                # without done/ is a real failure, not a race.
                if not w.done and cp.has(f"done/{w.rank}"):
                    w.done = True
                if rc is not None and (rc != 0 or not w.done):
                    w = self._root_cause(w)
                    rc = w.proc.returncode
                    return self._fail(w, rc, f"worker rank {w.rank} (pid {w.proc.pid}) "
                                      f"{_describe_exit(rc)}")
                hb = cp.get(f"hb/{w.rank}")
                if hb is not None and hb != w.hb_value:
                    w.hb_value, w.hb_seen, w.step = hb, now, hb["step"]
                if rc is None and w.hb_value is None and now - t0 > f.startup_timeout_s:
                    return self._fail(w, None, f"worker rank {w.rank} sent no heartbeat within "
                                      f"fault.startup_timeout_s={f.startup_timeout_s:.0f} s",
                                      kind="startup_timeout")
                if rc is None and w.hb_value is not None and now - w.hb_seen > f.heartbeat_timeout_s:
                    return self._fail(w, None, f"worker rank {w.rank} (pid {w.proc.pid}) sent no "
                                      f"heartbeat for {now - w.hb_seen:.0f} s (frozen or "
                                      "partitioned; fault.heartbeat_timeout_s="
                                      f"{f.heartbeat_timeout_s:.0f})", kind="heartbeat_timeout")
            if all(w.done and w.proc.poll() == 0 for w in self.workers):
                next_step = self._drain_metrics(cp, next_step, t0, console, wandb_run)
                self._drain_events(cp, console)
                if self._signal is not None and next_step < self.run.trainer.steps:
                    name = signal.Signals(self._signal).name
                    return "failed", f"stopped by {name} after step {next_step} of " \
                        f"{self.run.trainer.steps}; all workers exited cleanly."
                return "ok", ""
            if self._signal is not None and stop_sent is None:
                stop_sent = now
                cp.set("stop", {"signal": self._signal})
                self.dir.event("stop_requested", signal=signal.Signals(self._signal).name,
                               after_step=next_step - 1)
            if stop_sent is not None and now - stop_sent > f.shutdown_grace_s:
                return "failed", f"workers did not stop within fault.shutdown_grace_s=" \
                    f"{f.shutdown_grace_s:.0f} s of the stop request; they were killed."
            time.sleep(POLL_S)

    def _drain_metrics(self, cp: ControlPlane, next_step: int, t0: float, console: Console,
                       wandb_run: Any) -> int:
        while (rec := cp.get(f"metrics/{next_step}")) is not None:
            cp.delete(f"metrics/{next_step}")
            rec["wall_s"] = round(time.monotonic() - t0, 3)
            self.metrics.append(rec)
            self.dir.metric(rec)
            console.update(rec)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
            next_step += 1
        return next_step

    def _root_cause(self, first: _Worker) -> _Worker:
        """When one worker dies its peers often crash within milliseconds (their collective
        loses its partner), and polling order decides which exit is seen first. Look again a
        moment later and blame a worker stopped from outside (killed, terminated) over one
        that crashed, so the message names the cause, not a consequence."""
        time.sleep(0.3)
        dead = [w for w in self.workers if w.proc.poll() not in (None, 0)]
        external = [w for w in dead if -w.proc.returncode in (signal.SIGKILL, signal.SIGTERM,
                                                              signal.SIGINT)]
        return (external or dead or [first])[0]

    def _fail(self, w: _Worker, rc: int | None, what: str,
              kind: str = "worker_exit") -> tuple[str, str]:
        step = max((x.step for x in self.workers), default=-1)
        rec = self.dir.event("failure", kind=kind, rank=w.rank, pid=w.proc.pid, exit_code=rc,
                             step=step)
        self.failures.append({k: v for k, v in rec.items() if k != "event"})
        tail = _tail(w.log_path)
        msg = (f"{what} near step {max(step, 0)} of {self.run.trainer.steps}. This build cannot "
               "recover a lost worker yet, so the run stopped and the other workers were "
               f"terminated. Worker log: {w.log_path}")
        if tail:
            msg += f"\n  last lines:\n{tail}"
        return "failed", msg

    def _terminate_all(self) -> None:
        """Leave nothing running: TERM the process groups, then KILL what is left."""
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            self._signal_group(w, signal.SIGTERM)
            self._signal_group(w, signal.SIGCONT)  # a frozen worker must wake to die
        deadline = time.monotonic() + 5.0
        for w in live:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal_group(w, signal.SIGKILL)
                w.proc.wait()
            self.dir.event("worker_exit", rank=w.rank, exit_code=w.proc.returncode)

    @staticmethod
    def _signal_group(w: _Worker, sig: int) -> None:
        try:
            os.killpg(w.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _summary(self, status: str, message: str, plan: Plan, corpus: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
        ms = self.metrics
        step_time = sum(m["step_time_s"] for m in ms)
        vals = [m["val_loss"] for m in ms if "val_loss" in m]
        return {
            "status": status,
            "message": message,
            "steps": len(ms),
            "initial_loss": ms[0]["loss"] if ms else None,
            "final_loss": ms[-1]["loss"] if ms else None,
            "final_val_loss": vals[-1] if vals else None,
            "tokens_per_s": sum(m["tokens"] for m in ms) / step_time if step_time else None,
            "median_step_s": statistics.median(m["step_time_s"] for m in ms) if ms else None,
            "wall_s": round(wall_s, 3),
            "layout": plan.layout.to_dict(),
            "world_size": plan.world_size,
            "backend": plan.backend,
            "corpus": {k: corpus[k] for k in ("source", "sha256", "num_tokens")},
            "failures": self.failures,
            "recoveries": [],
            "resumed_from": self.resumed,
            "checkpoints": [{k: c[k] for k in ("step", "path", "bytes", "durable_s")}
                            for c in self.checkpoints],
        }

