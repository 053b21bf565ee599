"""The controller: owns the store, publishes the plan, starts and watches the workers.

It decides and never computes gradients (DESIGN.md). In this build a lost worker
ends the run (after the others are terminated); recovery arrives with the
elastic issue and plugs in where `_fail` is called.
"""

from __future__ import annotations

import ctypes
import dataclasses
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
from phalanx.orchestrator.commit import RUN, Committer
from phalanx.orchestrator.console import Console
from phalanx.orchestrator.control_plane import TOKEN_ENV, ControlPlane
from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus
from phalanx.orchestrator.faults import StragglerWatch, with_random_faults
from phalanx.orchestrator.membership import choose_recovery, publish_generation
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
    # A cluster run (ClusterLaunch): node agents start the workers (_open_store, _spawn).
    agents: Any = None
    guard: Any = None

    def __init__(self, run: RunConfig, *, run_dir: Path, resolved_yaml: str,
                 port: int = 0, cluster: Any = None) -> None:
        # fault.random: the failure schedule is drawn once, here, and becomes fault.inject.
        run, self.random_faults = with_random_faults(run)
        self.run = run
        self.dir = RunDir(run_dir)
        self.resolved_yaml = resolved_yaml
        self.port = port
        self.cluster = cluster
        # A token set by the user (PHALANX_TOKEN) outlives the run, so a resumed run can check
        # the signatures of the checkpoints an earlier run wrote.
        self.token = os.environ.get(TOKEN_ENV) or secrets.token_hex(16)
        self.workers: list[_Worker] = []
        self.metrics: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._signal: int | None = None
        self.checkpoints: list[dict[str, Any]] = []
        # holder rank -> (ward rank, step): the buddy copy in each persister's memory.
        self.peer_copies: dict[int, tuple[int, int]] = {}
        self.resumed: dict[str, Any] | None = None
        self._event_seq: dict[int, int] = {}
        self.injected: list[dict[str, Any]] = []
        self.recoveries: list[dict[str, Any]] = []
        self._pending_recovery: dict[str, Any] | None = None
        self.done_records: dict[int, dict[str, Any]] = {}
        self.spares: list[tuple[str, subprocess.Popen, Path]] = []
        self._progress: tuple[int, float, Any] = (-1, time.monotonic(), None)
        self._grow_at: int | None = None
        self.full_run = run
        self._spare_seq = 0
        self.replicas_agree: bool | None = None
        # The current generation's recovery record and start (wall clock): until it commits
        # its first step, the ranks it was delivering state to hold none yet.
        self._gen_recovery: dict[str, Any] = {"kind": "fresh", "step": 0}
        self._gen_wall = time.time()
        self.stragglers: list[dict[str, Any]] = []
        self._left: set[tuple[int, int]] = set()  # (rank, generation) from generation_left
        self._straggler_watch: tuple[Any, StragglerWatch] | None = None

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
        if self.random_faults:
            self.dir.event("fault_schedule", inject=self.random_faults,
                           mtbf_steps=self.run.fault.random.mtbf_steps,
                           seed=self.run.fault.random.seed)
        corpus = corpus_to_dict(prepare_corpus(self.run))
        backend = "nccl" if torch.cuda.is_available() and \
            torch.cuda.device_count() >= self.run.cluster.devices_per_node else "gloo"
        plan = plan_single_node(self.run, generation=0, backend=backend,
                                cores=len(os.sched_getaffinity(0)), corpus=corpus)
        self.dir.write_plan(plan.to_json())
        self.full_plan = plan
        start_step = self._resolve_resume()
        self.ledger = self._requeue_ledger(plan, corpus, start_step)
        store = self._open_store()
        self.store = store
        self.run_cp = ControlPlane(store, token=self.token, generation=RUN)
        if self.cluster is not None:
            plan = self._join_cluster(plan)
        recovery = ({"kind": "resume", "path": self.resumed["path"], "step": start_step}
                    if self.resumed else {"kind": "fresh", "step": 0})
        self._gen_recovery, self._gen_wall = recovery, time.time()
        cp = publish_generation(store, token=self.token, generation=plan.generation,
                                config=self.run.to_dict(), plan_json=plan.to_json(),
                                recovery=recovery)
        self.committer = Committer(self._own_connection(plan.generation),
                                   ranks=[m.rank for m in plan.members], first_step=start_step)
        self.committer.start()
        self.dir.event("generation", generation=plan.generation, world_size=plan.world_size,
                       layout=plan.layout.to_dict())
        console = Console(self.run.logging, total_steps=self.run.trainer.steps)
        if start_step:
            console.set_completed(start_step)
            console.note(f"resumed from {self.resumed['path']} at step {start_step}")
        wandb_run = self._start_wandb()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._spawn(plan, store.port, list(plan.members))
            self._start_spares(plan, store.port)
            status, message = self._watch(cp, plan, console, wandb_run, start_step)
        except KeyboardInterrupt:
            status, message = "failed", "forced stop (second interrupt); workers were killed."
        finally:
            self.committer.stop()
            self._terminate_all()
            self._drop_peer_copies()
            console.close()
            for s, h in old.items():
                signal.signal(s, h)
        self._close_store(0 if status == "ok" else 1)
        summary = self._summary(status, message, getattr(self, "final_plan", plan), corpus,
                                time.monotonic() - t_start)
        if self.agents is not None:
            summary["nodes"] = self.agents.describe()
        if plan.schedule is not None:
            pipeline = export_timeline(self.dir.path, schedule=plan.schedule)
            if pipeline is not None:
                summary["pipeline"] = pipeline
        if self.run.lowcomm.method != "none":
            from phalanx.parallel.lowcomm import summarize

            committed = list({m["step"]: m for m in self.metrics}.values())
            summary["lowcomm"] = {"method": self.run.lowcomm.method, **(summarize(committed) or {})}
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

    def _worker_env(self, plan: Plan, port: int) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(plan.threads_per_worker)
        env.update({
            "WORLD_SIZE": str(plan.world_size),
            "LOCAL_WORLD_SIZE": str(self.run.cluster.devices_per_node),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            TOKEN_ENV: self.token, "PHALANX_RUN_DIR": str(self.dir.path),
            # Without a thread budget, each worker's OpenMP pool takes every core and
            # multi-process steps run 10-15x slower on a small machine.
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"})
        return env

    def _start_spares(self, plan: Plan, port: int) -> None:
        """Keep fault.spares warm workers waiting (started, torch imported)."""
        while len(self.spares) < self.run.fault.spares:
            self._spare_seq += 1
            sid = str(self._spare_seq)
            env = {**self._worker_env(plan, port), "PHALANX_SPARE": sid}
            log_path = self.dir.path / "logs" / f"spare{sid}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.worker"], env=env,
                                        stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
            self.spares.append((sid, proc, log_path))
            self.dir.event("spare_start", spare=sid, pid=proc.pid)

    def _take_spare(self, m: Any, generation: int) -> _Worker | None:
        """A ready spare becomes rank m.rank of `generation`, or None (none alive). A spare
        still starting (a failure early in the run) is further along than a process started
        now: wait for it, up to fault.startup_timeout_s."""
        alive = [i for i, (_, proc, _) in enumerate(self.spares) if proc.poll() is None]
        ready = [i for i in alive if self.run_cp.get(f"spare_ready/{self.spares[i][0]}")]
        if not alive:
            return None
        i = (ready or alive)[0]
        sid, proc, log_path = self.spares[i]
        deadline = time.monotonic() + self.run.fault.startup_timeout_s
        while not ready and self.run_cp.get(f"spare_ready/{sid}") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        del self.spares[i]
        self.run_cp.set(f"spare/{sid}", {"rank": m.rank, "local_rank": m.local_rank,
                                         "generation": generation})
        self.dir.event("worker_start", rank=m.rank, pid=proc.pid, generation=generation,
                       spare=sid)
        return _Worker(rank=m.rank, proc=proc, log_path=log_path, hb_seen=time.monotonic())

    def _spawn(self, plan: Plan, port: int, members: list, *, replacement: bool = False) -> None:
        for m in members:
            w = self._take_spare(m, plan.generation) if replacement else None
            if w is not None:
                self.workers = [x for x in self.workers if x.rank != m.rank] + [w]
                self.workers.sort(key=lambda x: x.rank)
                continue
            env = dict(os.environ)
            threads = str(plan.threads_per_worker)
            env.update({
                "RANK": str(m.rank), "LOCAL_RANK": str(m.local_rank),
                "WORLD_SIZE": str(plan.world_size),
                "LOCAL_WORLD_SIZE": str(self.run.cluster.devices_per_node),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                TOKEN_ENV: self.token, "PHALANX_GENERATION": str(plan.generation),
                "PHALANX_RUN_DIR": str(self.dir.path),
                "PHALANX_REPLACEMENT": "1" if replacement else "0",
                # Without a thread budget, each worker's OpenMP pool takes every core and
                # multi-process steps run 10-15x slower on a small machine.
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONUNBUFFERED": "1",
            })
            log_path = self.dir.worker_log(m.rank)
            if self.agents is not None:  # a cluster run: the node's agent starts it
                prev = next((w.proc for w in self.workers if w.rank == m.rank), None)
                proc = self.agents.spawn(m, env=env, log_path=log_path, prev=prev)
            else:
                with open(log_path, "ab") as out:
                    # Own session: a terminal's Ctrl-C reaches the controller only, which then
                    # stops the workers together at a step boundary.
                    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.worker"],
                                            env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
            self.workers = [w for w in self.workers if w.rank != m.rank]
            self.workers.append(_Worker(rank=m.rank, proc=proc, log_path=log_path,
                                        hb_seen=time.monotonic()))
            self.workers.sort(key=lambda w: w.rank)
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

    def _drop_peer_copies(self) -> None:
        """The buddy copies in host memory (tmpfs) serve recovery only: gone with the run."""
        import shutil

        from phalanx.checkpoint.manager import peer_dir

        shutil.rmtree(peer_dir(self.checkpoint_root()), ignore_errors=True)

    def checkpoint_root(self) -> Path:
        from phalanx.checkpoint.reshard import default_root

        return default_root(self.run, self.dir.path)

    def _drain_events(self, console: Console) -> None:
        """Workers' events (checkpoints, injected faults, generations left) into events.jsonl
        and the console; keyed by process, so a replacement's events never collide."""
        for w in self.workers:
            pid = w.proc.pid
            seq = self._event_seq.get(pid, 0)
            while (rec := self.run_cp.get(f"event/{pid}/{seq}")) is not None:
                self.run_cp.delete(f"event/{pid}/{seq}")
                seq += 1
                name = rec.pop("event")
                self.dir.event(name, **rec)
                if name == "checkpoint_saved":
                    self.checkpoints.append(rec)
                    console.note(f"checkpoint step {rec['step']} on disk "
                                 f"({rec['bytes'] / 2**20:.1f} MiB, durable after "
                                 f"{rec['durable_s']:.2f} s in the background)")
                elif name == "checkpoint_peer":
                    self.peer_copies[rec["rank"]] = (rec["from_rank"], rec["step"])
                elif name == "checkpoint_failed":
                    console.note(f"checkpoint {rec.get('command')} at step {rec.get('step')} "
                                 f"failed on rank {rec.get('rank')}: {rec.get('error')} "
                                 "(training continues)", warning=True)
                elif name == "generation_left":
                    self._left.add((rec["rank"], rec["generation"]))
                elif name == "fault_injected":
                    self.injected.append({**rec, "t": time.monotonic()})
                    where = rec.get("where", "step")
                    console.note(f"fault injected: {rec['kind']} rank {rec['rank']} at step "
                                 f"{rec['step']}" + (f" ({where})" if where != "step" else ""),
                                 warning=True)
            self._event_seq[pid] = seq

    def _watch(self, cp: ControlPlane, plan: Plan, console: Console,
               wandb_run: Any, start_step: int = 0) -> tuple[str, str]:
        f = self.run.fault
        next_step = start_step
        t0 = time.monotonic()
        stop_sent: float | None = None
        while True:
            now = time.monotonic()
            self.final_plan = plan
            next_step = self._drain_metrics(cp, next_step, t0, console, wandb_run)
            self._drain_events(console)
            self._note_recovered(console)
            lost: list[tuple[_Worker, int | None, str, str]] = []
            for w in self.workers:
                rc = w.proc.poll()
                # After poll: a worker writes done/ before it exits, so an exit seen here
                # without done/ is a real failure, not a race.
                if not w.done and cp.has(f"done/{w.rank}"):
                    w.done = True
                if rc is not None and (rc != 0 or not w.done):
                    gone = getattr(w.proc, "lost", None)  # a remote worker's node is lost
                    lost.append((w, rc, f"worker rank {w.rank} (pid {w.proc.pid}) "
                                 + (gone or _describe_exit(rc)),
                                 "node_lost" if gone else "worker_exit"))
                    continue
                hb = self.run_cp.get(f"hb/{w.rank}")
                if hb is not None and hb.get("pid") != w.proc.pid:
                    hb = None  # the previous incarnation's last beat
                if hb is not None and hb != w.hb_value:
                    w.hb_value, w.hb_seen, w.step = hb, now, hb["step"]
                if rc is None and w.hb_value is None and now - w.hb_seen > f.startup_timeout_s:
                    return self._fail(w, None, f"worker rank {w.rank} sent no heartbeat within "
                                      f"fault.startup_timeout_s={f.startup_timeout_s:.0f} s",
                                      kind="startup_timeout")
                if rc is None and w.hb_value is not None and now - w.hb_seen > f.heartbeat_timeout_s:
                    lost.append((w, None, f"worker rank {w.rank} (pid {w.proc.pid}) sent no "
                                 f"heartbeat for {now - w.hb_seen:.0f} s (frozen or "
                                 "partitioned; fault.heartbeat_timeout_s="
                                 f"{f.heartbeat_timeout_s:.0f})", "heartbeat_timeout"))
            if not lost:
                lost = self._check_stragglers(plan, console)
            if not lost:
                lost = self._check_hang(console)
            if not lost and self._grow_at is not None and \
                    self.committer.committed + 1 >= self._grow_at:
                self.committer.stop()
                next_step = self._drain_committed(cp, next_step, t0, console, wandb_run)
                cp, plan, next_step = self._grow(plan, console)
                continue
            if lost:
                if self._signal is not None or not self._can_recover(plan) or \
                        lost[0][3] == "hang_unattributed":
                    w, rc, what, kind = lost[0]
                    if kind == "worker_exit":
                        w = self._root_cause(w)
                        rc = w.proc.returncode
                        what = f"worker rank {w.rank} (pid {w.proc.pid}) {_describe_exit(rc)}"
                    return self._fail(w, rc, what, kind=kind)
                cp, plan, next_step = self._recover(lost, cp, plan, console, next_step, t0,
                                                    wandb_run)
                if cp is None:
                    return "failed", self._recover_failed
                continue
            if all(w.done and w.proc.poll() == 0 for w in self.workers):
                self.done_records = {w.rank: cp.get(f"done/{w.rank}") or {} for w in self.workers}
                self._check_replicas(plan)
                next_step = self._drain_metrics(cp, next_step, t0, console, wandb_run)
                self._drain_events(console)
                self._note_recovered(console)
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

    def _check_stragglers(self, plan: Plan, console: Console) -> list:
        """Busy times the ranks sent with their votes (per committed step) into the straggler
        watch of this generation; a new straggler is an event, and with
        fault.straggler_policy=evict a lost worker (fenced and replaced)."""
        f = self.run.fault
        c = self.committer
        if f.straggler_policy == "off" or plan.world_size < 2:
            c.busy.clear()
            return []
        if self._straggler_watch is None or self._straggler_watch[0] is not c:
            lay = plan.layout

            def peers(r: int) -> list[int]:
                same = [q for q in range(lay.world_size)
                        if lay.coords(q)["pp"] == lay.coords(r)["pp"]]
                return same if len(same) > 1 else list(range(lay.world_size))

            self._straggler_watch = (c, StragglerWatch(factor=f.straggler_factor,
                                                       steps=f.straggler_steps, peers=peers))
        watch = self._straggler_watch[1]
        lost = []
        while c.busy:
            step, busy = c.busy.popleft()
            for hit in watch.observe(busy):
                w = next((w for w in self.workers if w.rank == hit["rank"]), None)
                # Evicting costs a recovery: never when none is allowed (that would end the
                # run for a slow worker), nor for one that has finished.
                evict = (f.straggler_policy == "evict" and w is not None and not w.done
                         and not lost and self._can_recover(plan))
                rec = self.dir.event("straggler", **hit, step=step, generation=plan.generation,
                                     factor=f.straggler_factor, steps=f.straggler_steps,
                                     policy=f.straggler_policy, evicted=evict)
                self.stragglers.append({k: v for k, v in rec.items() if k != "event"})
                console.note(f"straggler: rank {hit['rank']} busy {hit['ratio']:.1f}x its peers' "
                             f"median for {f.straggler_steps} steps"
                             + (" -- evicting" if evict else ""), warning=True)
                if evict:
                    lost.append((w, None, f"worker rank {w.rank} is a straggler ({hit['ratio']:.1f}x "
                                 f"its peers' busy time; fault.straggler_policy=evict)",
                                 "straggler"))
        return lost

    def _check_hang(self, console: Console) -> list:
        """No step committed for fault.hang_timeout_s (plus start-up time before a
        generation's first commit) while the workers are alive: collect their stacks, name
        the rank that is not where the others wait, and hand it over as lost."""
        from phalanx.orchestrator.hangs import attribute, main_thread_frames

        now, f = time.monotonic(), self.run.fault
        c = self.committer
        if c.committed != self._progress[0] or c is not self._progress[2]:
            self._progress = (c.committed, now, c)
            return []
        first = c.committed < c.first_step
        limit = f.hang_timeout_s + (f.startup_timeout_s if first else 0.0)
        if now - self._progress[1] < limit or any(w.proc.poll() is not None for w in self.workers):
            return []
        for w in self.workers:
            try:
                w.proc.send_signal(signal.SIGUSR1)  # local or through the node's agent
            except ProcessLookupError:
                pass
        time.sleep(1.0)  # faulthandler writes synchronously; give the logs a moment
        stacks = {w.rank: main_thread_frames(w.log_path.read_text(errors="replace"))
                  for w in self.workers}
        odd, why = attribute(stacks)
        self.dir.event("hang", after_s=round(now - self._progress[1], 1), stacks=stacks,
                       ranks=odd, why=why)
        console.note(f"hang: no step for {now - self._progress[1]:.0f} s; {why}", warning=True)
        self._progress = (c.committed, time.monotonic(), c)
        if not odd:  # nobody to blame: a recovery would hang the same way
            return [(w, None, f"hang: {why}", "hang_unattributed") for w in self.workers[:1]]
        return [(w, None, f"worker rank {w.rank} hung ({why})", "hang")
                for w in self.workers if w.rank in odd]

    # -- the store, its guard, and the node agents of a cluster run -------------------------
    def _open_store(self) -> Any:
        """The control plane's TCPStore: bound to localhost for a single-node run (no other
        machine can reach it); on all interfaces for a cluster run, where node agents and
        workers connect. Every value the controller writes is watched (guard.py), and values
        the controller rejects or finds forged are events."""
        import socket

        from phalanx.orchestrator.control_plane import set_reject_hook
        from phalanx.orchestrator.guard import StoreGuard

        if self.cluster is None:
            self._listen = socket.socket()
            self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listen.bind(("127.0.0.1", self.port))
            self._listen.listen(1024)
            raw = dist.TCPStore("127.0.0.1", self._listen.getsockname()[1], is_master=True,
                                wait_for_workers=False, master_listen_fd=self._listen.fileno())
        else:
            raw = dist.TCPStore("127.0.0.1", self.cluster.port, is_master=True,
                                wait_for_workers=False)
        self.guard = StoreGuard(self.token, lambda key, how: self.dir.event(
            "control_plane_forged", key=key, how=how))
        store = self.guard.wrap(raw)
        set_reject_hook(lambda key, why: self.dir.event("control_plane_rejected", key=key,
                                                        why=why))
        port = raw.port
        self.guard.start(lambda: dist.TCPStore("127.0.0.1", port, is_master=False))
        if self.cluster is not None:
            from phalanx.orchestrator.agents import Agents

            f = self.run.fault
            self.agents = Agents(
                self.cluster, store=store, token=self.token, heartbeat_s=f.heartbeat_s,
                heartbeat_timeout_s=f.heartbeat_timeout_s, event=self.dir.event,
                log_dir=self.dir.path / "logs",
                connect=lambda: self.guard.wrap(dist.TCPStore("127.0.0.1", port,
                                                              is_master=False)))
            self.agents.publish()
            self.agents.start()
        return store

    def _join_cluster(self, plan: Plan) -> Plan:
        """Wait for the member nodes' agents; rank r runs on node r // nproc. Threads per
        worker follow the smallest node unless cluster.threads_per_worker says."""
        from phalanx.orchestrator.plan import Member

        la = self.cluster
        self.dir.event("rendezvous", host=la.host, port=la.port, rdzv_id=la.rdzv_id,
                       nnodes=[la.min_nodes, la.max_nodes], nproc=la.nproc)
        try:
            if la.local_agent:
                self.agents.start_local_agent()
            self.agents.rendezvous()
        except BaseException:
            self._close_store(1)
            raise
        members = tuple(Member(rank=r, node=r // la.nproc, local_rank=r % la.nproc)
                        for r in range(plan.world_size))
        threads = self.run.cluster.threads_per_worker or max(1, self.agents.cores() // la.nproc)
        plan = dataclasses.replace(plan, members=members, threads_per_worker=threads)
        self.dir.write_plan(plan.to_json())
        self.full_plan = plan
        return plan

    def _close_store(self, code: int) -> None:
        """After the workers: the agents exit (with the run's exit code), the helpers stop."""
        from phalanx.orchestrator.control_plane import set_reject_hook

        if self.agents is not None:
            self.agents.shutdown(code)
        if self.guard is not None:
            self.guard.stop()
        set_reject_hook(None)

    def _own_connection(self, generation: int) -> ControlPlane:
        """The committer blocks in store waits; on the main connection those would hold the
        socket and delay every other store call of the watch loop (detection included)."""
        client = dist.TCPStore("127.0.0.1", self.store.port, is_master=False)
        if self.guard is not None:
            client = self.guard.wrap(client)
        return ControlPlane(client, token=self.token, generation=generation)

    def _check_replicas(self, plan: Plan) -> None:
        """Invariant 2 at the end of every run: data-parallel replicas of a shard finished
        with identical parameters and optimizer state (digests the workers computed)."""
        digests = {r: d.get("digest") for r, d in self.done_records.items()}
        if any(v is None for v in digests.values()):
            return
        groups: dict[tuple, set[str]] = {}
        for r, d in digests.items():
            key = tuple(v for k, v in plan.layout.coords(r).items() if k != "dp_replicate")
            groups.setdefault(key, set()).add(d)
        self.replicas_agree = all(len(v) == 1 for v in groups.values())
        if not self.replicas_agree:
            self.dir.event("replicas_disagree", digests=digests)
            log.error("data-parallel replicas finished with different state: %s", digests)

    # -- recovery ----------------------------------------------------------------------
    def _no_recovery_reason(self) -> str | None:
        f = self.run.fault
        if f.policy == "none":
            return "fault.policy=none"
        if self.run.parallel.zero.backend == "deepspeed":
            return "the DeepSpeed backend is not elastic"
        if len(self.failures) >= f.max_failures:
            return f"{len(self.failures)} failure(s) already, fault.max_failures={f.max_failures}"
        if self._signal is not None:
            return "a stop was requested"
        return None

    def _can_recover(self, plan: Plan) -> bool:
        return self._no_recovery_reason() is None

    def _fence(self, w: _Worker) -> None:
        """SIGKILL a lost worker (a frozen one first woken so the kill lands) and reap it: a
        fenced worker cannot write into a later generation, and its sockets close, which ends
        the survivors' pending collectives with an error instead of a gloo timeout."""
        if w.proc.poll() is None:
            self._signal_group(w, signal.SIGKILL)
            self._signal_group(w, signal.SIGCONT)
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _recover(self, lost: list, cp: ControlPlane, plan: Plan, console: Console,
                 next_step: int, t0: float, wandb_run: Any):
        """A new generation around the loss: fence, choose the source, publish, replace."""
        t_detect, wall_detect = time.monotonic(), time.time()
        time.sleep(0.05)  # a peer that crashed along with the first loss shows up now
        lost_ranks = {w.rank for w, *_ in lost}
        lost += [(w, w.proc.poll(), f"worker rank {w.rank} {_describe_exit(w.proc.poll())}",
                  "worker_exit") for w in self.workers
                 if w.rank not in lost_ranks and w.proc.poll() not in (None, 0) and not w.done]
        lost_ranks = {w.rank for w, *_ in lost}
        for w, _rc, what, kind in lost:
            self._fence(w)
            rec = self.dir.event("failure", kind=kind, rank=w.rank, pid=w.proc.pid,
                                 exit_code=w.proc.returncode, step=next_step,
                                 generation=plan.generation)
            self.failures.append({k: v for k, v in rec.items() if k != "event"})
            console.note(f"{what}: recovering", warning=True)
        self.committer.stop()
        alive0 = any(w.rank == 0 for w in self.workers if w.rank not in lost_ranks)
        next_step = (self._drain_committed(cp, next_step, t0, console, wandb_run) if alive0
                     else self._drain_metrics(cp, next_step, t0, console, wandb_run))
        committed = self.committer.committed + 1
        # A failure during a recovery: ranks that recovery had not yet given their state hold
        # none (a replacement still waiting for its replica's copy, everyone in the middle of
        # a rollback): they are alive, but not a source, and receive their state again.
        stateless = self._stateless(lost_ranks)
        self._interrupt_recovery(stateless, console)
        # Every generation starts its own snapshots: the copies reported so far serve this
        # recovery only (the survivors' own snapshots go with their old trainers).
        copies, self.peer_copies = self.peer_copies, {}
        shrunk = self._shrink_plan(plan, lost_ranks | stateless)
        if shrunk is not None:
            for w in self.workers:
                if w.rank in stateless:
                    self._fence(w)
            return self._shrink(shrunk, plan, lost_ranks | stateless, committed, console,
                                next_step, t_detect, wall_detect)
        par = self.run.parallel
        recovery, why = choose_recovery(policy=self.run.fault.policy, layout=plan.layout,
                                        lost=lost_ranks | stateless, committed_steps=committed,
                                        checkpoint_root=self.checkpoint_root(), token=self.token,
                                        checkfree_ok=par.tp == 1 and par.zero.stage == 0,
                                        peer_copies=copies)
        if stateless:
            why += (f"; rank(s) {sorted(stateless)} had not received their state when the "
                    "recovery was interrupted")
        if recovery is None:
            self._recover_failed = f"lost rank(s) {sorted(lost_ranks)} and cannot recover: {why}"
            return None, plan, next_step
        gen = plan.generation + 1
        if recovery.kind in ("checkpoint", "restart"):
            self._report_skipped(recovery, gen)
        new_plan = dataclasses.replace(plan, generation=gen)
        self.dir.write_plan(new_plan.to_json())
        record = recovery.record()
        if self.ledger is not None:
            record["requeue"] = self._requeue(recovery.kind, recovery.step, plan.layout,
                                              lost_ranks | stateless, gen)
        cp = publish_generation(self.store, token=self.token, generation=gen,
                                config=self.run.to_dict(), plan_json=new_plan.to_json(),
                                recovery=record)
        self.committer = Committer(self._own_connection(gen),
                                   ranks=[m.rank for m in new_plan.members],
                                   first_step=recovery.step)
        self.committer.start()
        self._spawn(new_plan, self.store.port, [m for m in new_plan.members
                                               if m.rank in lost_ranks], replacement=True)
        self._start_spares(new_plan, self.store.port)  # refill, off the critical path
        # Detection latency is measured from the injected fault when there was one (its
        # wall-clock time in the worker; this generation's, not an earlier incarnation's),
        # else unknown (0: the poll that saw the exit).
        injected = [i for i in self.injected if i["rank"] in lost_ranks and "at" in i
                    and i["at"] >= self._gen_wall and i["kind"] != "corrupt_checkpoint"]
        first_sign = min([i["at"] for i in injected] or [wall_detect])
        self._gen_recovery, self._gen_wall = recovery.record(), time.time()
        self._pending_recovery = {
            "kind": recovery.kind, "source": recovery.record(), "generation": gen,
            "lost_ranks": sorted(lost_ranks), "why": why,
            "detect_s": round(wall_detect - first_sign, 3),
            "steps_lost": committed - recovery.step, "_t_detect": t_detect,
            "_first_step": recovery.step}
        self.dir.event("generation", generation=gen, world_size=new_plan.world_size,
                       layout=new_plan.layout.to_dict(), recovery=recovery.record(), why=why)
        console.note(f"generation {gen}: {recovery.kind} recovery ({why}); "
                     f"{committed - recovery.step} committed step(s) lost", warning=True)
        if recovery.step < next_step:
            console.set_completed(recovery.step)
        return cp, new_plan, recovery.step

    # -- a lost low-communication replica's samples (parallel/lowcomm/requeue.py) ----------
    def _requeue_ledger(self, plan: Plan, corpus: dict[str, Any], start: int) -> Any:
        if self.run.lowcomm.method == "none":
            return None
        from phalanx.data.dataset import train_samples
        from phalanx.data.sampler import GlobalBatchSampler
        from phalanx.parallel.lowcomm.requeue import Ledger

        t = self.run.trainer
        # The workers' sampler over the same training windows.
        n = train_samples(int(corpus["num_tokens"]), self.run.data.val_fraction, t.seq_len)
        return Ledger(self.run.lowcomm, sampler=GlobalBatchSampler(n, t.global_batch, t.seed),
                      replicas=plan.layout.dp_replicate,
                      micro_batch_size=self.run.parallel.micro_batch_size,
                      deals=plan.schedule is None, start=start)

    def _requeue(self, kind: str, step: int, layout: Any, lost: set[int],
                 generation: int) -> list[dict[str, Any]]:
        """The entries the next generation deals: after a replica recovery the lost
        replicas' windows are added; after a rollback, the list as it was at that step."""
        r = layout.dp_replicate
        if kind != "replica":
            return self.ledger.roll_back(step=step, replicas=r)
        gone = sorted({layout.coords(x)["dp_replicate"] for x in lost})
        return self._requeue_windows(step=step, lost=gone, replicas=r, generation=generation,
                                     back={d: None if d in gone else d for d in range(r)})

    def _requeue_windows(self, *, step: int, lost: list[int], back: dict[int, int | None],
                         replicas: int, generation: int) -> list[dict[str, Any]]:
        entries, windows = self.ledger.continue_with(step=step, lost=lost, back=back,
                                                     replicas=replicas)
        for w in windows:
            self.dir.event("requeue", generation=generation, **w)
        return entries

    def _stateless(self, lost: set[int]) -> set[int]:
        """Live members whose state the current generation's recovery had not delivered yet
        (it has committed no step): its newcomers, or everyone after a rollback/restart."""
        c = self.committer
        if c.committed >= c.first_step:
            return set()
        rec = self._gen_recovery
        alive = {w.rank for w in self.workers} - lost
        if rec.get("kind") in ("checkpoint", "peer", "restart", "resume"):
            return alive
        return alive & {int(k) for k in (*rec.get("sources", {}), *rec.get("rebuild", {}))}

    def _interrupt_recovery(self, stateless: set[int], console: Console) -> None:
        """The pending recovery never completed: it goes into the summary as interrupted."""
        r = self._pending_recovery
        if r is None:
            return
        self._pending_recovery = None
        r = {k: v for k, v in r.items() if not k.startswith("_")}
        r.update(recover_s=None, interrupted=True, stateless=sorted(stateless))
        self.recoveries.append(r)
        self.dir.event("recovery_interrupted", **r)
        console.note(f"recovery into generation {r['generation']} interrupted by another failure",
                     warning=True)

    def _report_skipped(self, recovery: Any, gen: int) -> None:
        """Checkpoints newer than the one a rollback uses were skipped (torn, corrupt, still
        being written): an event each, with the reason (invariant 4)."""
        from phalanx.checkpoint.store import CheckpointError, list_checkpoints, verify

        for path in list_checkpoints(self.checkpoint_root()):
            if recovery.path is not None and path == Path(recovery.path):
                break
            try:
                verify(path, token=self.token)
                reason = "complete now, but not when the recovery chose its source"
            except CheckpointError as e:
                reason = str(e)
            self.dir.event("checkpoint_skipped", path=str(path), reason=reason, generation=gen)

    # -- shrink and grow (fault.replace=false) --------------------------------------------
    def _run_for_replicas(self, replicas: int) -> RunConfig:
        """The recipe with `replicas` data-parallel replicas (each the full run's pp x tp x
        dp_shard ranks), global batch unchanged: each replica accumulates more micro-batches."""
        from phalanx.config import validate

        r, lay = self.full_run, self.full_plan.layout
        world = replicas * (lay.world_size // lay.dp_replicate)
        # Injections fire in the processes started first (they read them at start-up); the
        # smaller world's recipe only needs to stay valid.
        inject = [i for i in r.fault.inject if int(i["rank"]) < world]
        return validate(dataclasses.replace(
            r, parallel=dataclasses.replace(r.parallel, dp=None, dp_replicate=replicas),
            cluster=dataclasses.replace(r.cluster, nodes=1, devices_per_node=world),
            fault=dataclasses.replace(r.fault, inject=inject)))

    @staticmethod
    def _kept_replicas(layout: Any, lost: set[int]) -> list[int]:
        """The data-parallel replicas (dp_replicate indices) with no lost rank."""
        gone = {layout.coords(r)["dp_replicate"] for r in lost}
        return [i for i in range(layout.dp_replicate) if i not in gone]

    def _shrink_plan(self, plan: Plan, lost: set[int]) -> Plan | None:
        """The smaller plan when the recipe asks to shrink and the layout allows it: the
        replicas that lost a rank leave whole (a pipeline, tensor or ZeRO group is useless
        without its missing member, and its state lives on in the other replicas), the rest
        go on with the same pp x tp x dp_shard layout."""
        lay, f = plan.layout, self.run.fault
        kept = self._kept_replicas(lay, lost)
        dp = len(kept) * lay.dp_shard
        if f.replace or not kept or \
                self.run.trainer.global_batch % (dp * self.run.parallel.micro_batch_size):
            return None
        try:
            run = self._run_for_replicas(len(kept))
        except ConfigError:
            return None
        new = plan_single_node(run, generation=plan.generation + 1, backend=plan.backend,
                               cores=len(os.sched_getaffinity(0)), corpus=plan.corpus)
        same = all(getattr(new.layout, a) == getattr(lay, a) for a in ("pp", "tp", "dp_shard", "vpp"))
        return new if same and new.layout.dp_replicate == len(kept) else None

    def _new_generation(self, new_plan: Plan, run: RunConfig, recovery: dict[str, Any],
                        renumber: dict[int, int]) -> ControlPlane:
        self.run = run
        self.dir.write_plan(new_plan.to_json())
        cp = publish_generation(self.store, token=self.token, generation=new_plan.generation,
                                config=run.to_dict(), plan_json=new_plan.to_json(),
                                recovery={**recovery, "renumber": {str(o): n for o, n in
                                                                   renumber.items()}})
        self._gen_recovery, self._gen_wall = recovery, time.time()
        for w in self.workers:
            w.rank = renumber.get(w.rank, w.rank)
        self.committer = Committer(self._own_connection(new_plan.generation),
                                   ranks=[m.rank for m in new_plan.members],
                                   first_step=recovery["step"])
        self.committer.start()
        self.dir.event("generation", generation=new_plan.generation,
                       world_size=new_plan.world_size, layout=new_plan.layout.to_dict(),
                       recovery=recovery)
        return cp

    def _shrink(self, new_plan: Plan, plan: Plan, lost: set[int], committed: int,
                console: Console, next_step: int, t_detect: float, wall_detect: float):
        # Ranks keep their place in their replica; replicas are renumbered in order (the
        # replica axis is the outermost, so a rank's new number is its old one shifted).
        kept = self._kept_replicas(plan.layout, lost)
        lay = new_plan.layout
        renumber = {}
        for new in range(lay.world_size):
            c = lay.coords(new)
            renumber[plan.layout.rank_of(**{**c, "dp_replicate": kept[c["dp_replicate"]]})] = new
        # The lost replicas' live ranks leave with them.
        for w in self.workers:
            if w.rank not in lost and w.rank not in renumber:
                self._fence(w)
        self.workers = [w for w in self.workers if w.rank in renumber]
        record: dict[str, Any] = {"kind": "shrink", "step": committed}
        if self.ledger is not None:  # the replicas that left: their windows re-queued
            gone = [d for d in range(plan.layout.dp_replicate) if d not in kept]
            record["requeue"] = self._requeue_windows(
                step=committed, lost=gone, back=dict(enumerate(kept)), replicas=len(kept),
                generation=new_plan.generation)
        cp = self._new_generation(new_plan, self._run_for_replicas(len(kept)), record, renumber)
        f = self.run.fault
        self._grow_at = committed + f.grow_after_steps if f.grow_after_steps else None
        injected = [i for i in self.injected if i["rank"] in lost and "at" in i]
        self._pending_recovery = {
            "kind": "shrink", "source": {"kind": "shrink", "world": new_plan.world_size},
            "generation": new_plan.generation, "lost_ranks": sorted(lost),
            "why": (f"fault.replace=false: {len(kept)} data-parallel replica(s) continue, "
                    f"{plan.layout.dp_replicate - len(kept)} left with the lost rank(s)"),
            "detect_s": round(wall_detect - min([i["at"] for i in injected] or [wall_detect]), 3),
            "steps_lost": 0, "_t_detect": t_detect, "_first_step": committed}
        console.note(f"generation {new_plan.generation}: shrink to {new_plan.world_size} "
                     f"worker(s), global batch kept ({self.run.grad_accum} micro-batches per "
                     "worker)", warning=True)
        return cp, new_plan, committed

    def _grow(self, plan: Plan, console: Console):
        """Back to the full world at a step boundary: survivors keep their ranks (the replica
        axis is the outermost: the first replicas' ranks are the same in both layouts),
        newcomers take the rest and receive their state from a live replica of their shard."""
        from phalanx.checkpoint.recover import replica_source

        self.committer.stop()
        committed = self.committer.committed + 1
        full = dataclasses.replace(self.full_plan, generation=plan.generation + 1)
        have = plan.world_size
        record: dict[str, Any] = {
            "kind": "grow", "step": committed,
            "sources": {str(r): replica_source(full.layout, r, set(range(have)))
                        for r in range(have, full.world_size)}}
        if self.ledger is not None:  # newcomers start from the global model
            old_r = plan.layout.dp_replicate
            record["requeue"] = self._requeue_windows(
                step=committed, lost=[], replicas=full.layout.dp_replicate,
                back={d: d if d < old_r else None for d in range(full.layout.dp_replicate)},
                generation=full.generation)
        cp = self._new_generation(full, self.full_run, record,
                                  {r: r for r in range(full.world_size)})
        self._spawn(full, self.store.port, [m for m in full.members if m.rank >= have],
                    replacement=True)
        self._grow_at = None
        self.dir.event("grow", generation=full.generation, world_size=full.world_size,
                       step=committed)
        console.note(f"generation {full.generation}: grow back to {full.world_size} workers at "
                     f"step {committed}")
        return cp, full, committed

    def _note_recovered(self, console: Console) -> None:
        """A recovery is complete when the new generation commits its first step."""
        r = self._pending_recovery
        if r is None or self.committer.committed < r["_first_step"]:
            return
        r["recover_s"] = round(time.monotonic() - r.pop("_t_detect"), 3)
        r.pop("_first_step")
        self.recoveries.append(r)
        self._pending_recovery = None
        self.dir.event("recovered", **r)
        console.note(f"recovered ({r['kind']}) in {r['recover_s']:.2f} s after detection "
                     f"({r['detect_s']:.2f} s to detect); training continues")

    def _drain_committed(self, cp: ControlPlane, next_step: int, t0: float, console: Console,
                         wandb_run: Any, timeout_s: float = 5.0) -> int:
        """Before leaving a generation: rank 0 publishes a step's metrics just after its
        commit, so wait (briefly) for every committed step's record."""
        deadline = time.monotonic() + timeout_s
        while True:
            # Rank 0 left the generation: it published what it will (a step can commit and
            # its optimizer step still fail, e.g. in ZeRO's all-gather); do not wait for more.
            self._drain_events(console)
            left = (0, cp.generation) in self._left
            next_step = self._drain_metrics(cp, next_step, t0, console, wandb_run)
            if next_step > self.committer.committed or left or time.monotonic() > deadline:
                return next_step
            time.sleep(0.01)

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
        why = self._no_recovery_reason() or "no recovery source"
        msg = (f"{what} near step {max(step, 0)} of {self.run.trainer.steps}. Not recovered "
               f"({why}), so the run stopped and the other workers were terminated. "
               f"Worker log: {w.log_path}")
        if tail:
            msg += f"\n  last lines:\n{tail}"
        return "failed", msg

    def _terminate_all(self) -> None:
        """Leave nothing running: KILL the workers' process groups (workers ignore SIGTERM,
        which a batch system sends to every process of a job; see worker.main)."""
        for _sid, proc, _ in self.spares:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.spares.clear()
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            self._signal_group(w, signal.SIGKILL)
        for w in live:
            w.proc.wait()
            self.dir.event("worker_exit", rank=w.rank, exit_code=w.proc.returncode)

    @staticmethod
    def _signal_group(w: _Worker, sig: int) -> None:
        if hasattr(w.proc, "signal_group"):  # a remote worker: its node agent signals it
            w.proc.signal_group(sig)
            return
        try:
            os.killpg(w.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _summary(self, status: str, message: str, plan: Plan, corpus: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
        # After a rollback some steps ran twice: the committed record of a step is its last.
        ms = list({m["step"]: m for m in self.metrics}.values())
        ms.sort(key=lambda m: m["step"])
        step_time = sum(m["step_time_s"] for m in self.metrics)
        vals = [m["val_loss"] for m in ms if "val_loss" in m]
        return {
            "status": status,
            "message": message,
            "steps": len(ms),
            "initial_loss": ms[0]["loss"] if ms else None,
            "final_loss": ms[-1]["loss"] if ms else None,
            "final_val_loss": vals[-1] if vals else None,
            "tokens_per_s": sum(m["tokens"] for m in self.metrics) / step_time if step_time
            else None,
            "steps_executed": len(self.metrics),
            "median_step_s": statistics.median(m["step_time_s"] for m in ms) if ms else None,
            "wall_s": round(wall_s, 3),
            "layout": plan.layout.to_dict(),
            "world_size": plan.world_size,
            "backend": plan.backend,
            "corpus": {k: corpus[k] for k in ("source", "sha256", "num_tokens")},
            "failures": self.failures,
            "recoveries": self.recoveries,
            "stragglers": self.stragglers,
            "replicas_agree": self.replicas_agree,
            "state_digests": {str(r): d.get("digest") for r, d in self.done_records.items()},
            "resumed_from": self.resumed,
            "checkpoints": [{k: c[k] for k in ("step", "path", "bytes", "durable_s")}
                            for c in self.checkpoints],
        }

