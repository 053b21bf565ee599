"""Worker process entry point: `python -m phalanx.launch.worker` (started by the controller).

Process concerns only -- environment, control plane, heartbeats, reporting; the
training itself lives in `phalanx.parallel`. The environment is torchrun's
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) plus PHALANX_TOKEN,
PHALANX_GENERATION and PHALANX_RUN_DIR.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("phalanx.worker")

# Exit codes the controller turns into messages.
EXIT_CONTROLLER_LOST = 3


def _proc_id() -> int:
    """How the controller knows this process: its pid, or on a cluster the run-unique id its
    node agent was given (pids repeat across machines and containers)."""
    return int(os.environ.get("PHALANX_PROC_ID") or os.getpid())


def _heartbeat(host: str, port: int, token: str, generation: int, rank: int, period_s: float,
               state: dict, stop: threading.Event) -> None:
    """Write hb/{rank} every period; if the controller is unreachable for long, exit.

    Its own store connection: the main thread's may be blocked in a wait.
    """
    from phalanx.orchestrator.control_plane import ControlPlane, connect

    cp = ControlPlane(connect(host, port, timeout_s=10), token=token, generation=generation)
    last_ok = time.monotonic()
    while not stop.wait(period_s):
        try:
            # The rank can change when the world shrinks or grows (state["rank"]).
            cp.set(f"hb/{state.get('rank', rank)}",
                   {"t": time.time(), "step": state["step"], "pid": _proc_id()})
            last_ok = time.monotonic()
        except Exception:  # noqa: BLE001 - any store failure means the same: controller gone
            if time.monotonic() - last_ok > 10 * period_s + 10:
                # An orphan must not keep training (or hold its cores) without a controller.
                print(f"rank {rank}: controller unreachable, exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_CONTROLLER_LOST)


def _generation_watch(host: str, port: int, token: str, seen: dict,
                      stop: threading.Event) -> None:
    """Keep seen["generation"] current (own store connection), so a rank waiting on a
    transfer from a peer that has already left the generation can give up at once."""
    from phalanx.orchestrator.commit import RUN, current_generation
    from phalanx.orchestrator.control_plane import ControlPlane, connect

    cp = ControlPlane(connect(host, port, timeout_s=10), token=token, generation=RUN)
    while not stop.wait(0.05):
        try:
            seen["generation"] = current_generation(cp)
        except Exception:  # noqa: BLE001 - the heartbeat thread handles a lost controller
            pass


def _pin_cores(local_rank: int, threads: int) -> None:
    # One core group per worker when the node has enough: a rank waiting in a receive then
    # cannot be preempted by its peer's threads, which makes timings stable (DESIGN.md).
    cpus = sorted(os.sched_getaffinity(0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if len(cpus) >= local_world * threads:
        os.sched_setaffinity(0, cpus[local_rank * threads:(local_rank + 1) * threads])


def _write_timeline(run_dir: Path, rank: int, layout, trainer, step: int) -> None:
    """The last step's measured action timeline of one pipeline (dp replica 0, tp rank 0)."""
    events = getattr(trainer, "last_events", None)
    coords = layout.coords(rank)
    if not events or coords["dp_replicate"] or coords["dp_shard"] or coords["tp"]:
        return
    (run_dir / "timeline").mkdir(exist_ok=True)
    (run_dir / "timeline" / f"pp{coords['pp']}.json").write_text(json.dumps(
        {"step": step, "pp_rank": coords["pp"], "events": [vars(e) for e in events]}))


def _checkpoint_manager(run, trainer, report, *, rank: int, world: int, token: str,
                        run_dir: Path, generation: int, host: str, port: int):
    """The checkpoint levels this recipe asks for, reporting into the controller's events."""
    ck = run.checkpoint
    if not (ck.memory_every or ck.disk_every or ck.peer_every):
        return None
    from phalanx.checkpoint.manager import CheckpointManager
    from phalanx.checkpoint.reshard import default_root

    def events(event: dict) -> None:
        # Saves are collective: rank 0 speaks for all; every rank reports its own failures.
        if rank == 0 or event["event"] == "checkpoint_failed":
            report(event)

    return CheckpointManager(run, trainer, root=default_root(run, run_dir), rank=rank,
                             world=world, token=token, events=events, generation=generation,
                             host=host, port=port,
                             ranks_per_node=run.cluster.devices_per_node)


class _Injector:
    """fault.inject for this rank (config.py documents kinds and points). Each injection fires
    once per run: it marks the run-global store key fault/fired/{key} before it acts, and a
    replacement worker skips the marked ones (it does not re-enact its predecessor's failure)
    but fires the rest of its rank's. Points other than `step` fire from hooks: `waits`
    (gradient reductions, pipeline receives), the optimizer's post-step hook, and `main`
    around entering a recovery generation."""

    def __init__(self, run, rank: int, *, replacement: bool, run_cp, report,
                 root: Path) -> None:
        from phalanx.parallel import waits

        self.run_cp, self.report, self.root, self.rank = run_cp, report, root, rank
        self.pending: list[dict] = []
        seen: dict[str, int] = {}
        for inj in run.fault.inject:
            if int(inj["rank"]) != rank:
                continue
            at = inj.get("at", "step")
            base = f"{rank}-{int(inj['step'])}-{inj['kind']}-{at}"
            seen[base] = seen.get(base, 0) + 1
            key = f"{base}-{seen[base] - 1}"
            if replacement and run_cp.get(f"fault/fired/{key}") is not None:
                continue
            self.pending.append({"step": int(inj["step"]), "kind": inj["kind"], "at": at,
                                 "delay_s": float(inj.get("delay_s", 0)), "key": key,
                                 "random": bool(inj.get("random", False))})
        self.pending.sort(key=lambda i: i["step"])  # stable: declared order within a step
        self.slow_s = run.fault.slow_s
        self.slow = False
        self.step = -1
        if any(i["at"] in ("allreduce", "recv") for i in self.pending):
            waits.set_fault_hook(self.point)

    # -- firing ----------------------------------------------------------------------------
    def _fire(self, inj: dict, step: int, **extra):
        """Mark, report, and return the action (None for slow / corrupt_checkpoint)."""
        self.pending.remove(inj)
        try:
            self.run_cp.set(f"fault/fired/{inj['key']}", {"pid": os.getpid(), "step": step})
        except Exception:  # noqa: BLE001 - the fault still fires; only a replacement may repeat it
            log.warning("could not mark injection %s as fired", inj["key"])
        kind = inj["kind"]
        self.report({"event": "fault_injected", "kind": kind, "step": step, "at": time.time(),
                     "where": inj["at"], "random": inj["random"], **extra})
        log.warning("fault injection: %s at step %d (%s)", kind, step, inj["at"])
        if kind == "slow":
            self.slow = True
            return None
        if kind == "corrupt_checkpoint":
            return None
        delay = inj["delay_s"]

        def act() -> None:
            logging.shutdown()
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif kind == "exit":
                os._exit(1)
            elif kind == "hang":
                while True:  # the heartbeat thread keeps beating: only progress stops
                    time.sleep(3600)

        if delay <= 0:
            return act
        timer = threading.Timer(delay, act)
        timer.daemon = True
        return timer.start

    def _due(self, at: str, step: int) -> dict | None:
        return next((i for i in self.pending if i["at"] == at and i["step"] <= step), None)

    def point(self, op: str):
        """`waits`' fault hook: the fault's action if an injection at `op` is due, else None."""
        inj = self._due(op, self.step) if self.step >= 0 else None
        return self._fire(inj, self.step) if inj is not None else None

    def before_step(self, step: int, report=None, manager=None) -> None:
        self.step = step
        while (inj := self._due("step", step)) is not None:
            extra = self._corrupt(manager) if inj["kind"] == "corrupt_checkpoint" else {}
            act = self._fire(inj, step, **extra)
            if act is not None:
                act()
        if self.slow:
            time.sleep(self.slow_s)

    def attach(self, trainer) -> None:
        """A new generation's trainer: the `optimizer` point hooks its optimizer's step."""
        if any(i["at"] == "optimizer" for i in self.pending):
            def after_optimizer_step(*_a, **_k) -> None:
                act = self.point("optimizer")
                if act is not None:
                    act()

            trainer.optimizer.register_step_post_hook(after_optimizer_step)

    def entering_recovery(self, rec: dict, seen_step: int):
        """The action of an injection at `recovery` due in this generation, else None: one
        whose step the run had reached (this worker's last step, or the recovery's)."""
        if rec.get("kind", "fresh") in ("fresh", "resume"):
            return None
        step = max(int(rec.get("step", 0)), seen_step)
        inj = self._due("recovery", step)
        return self._fire(inj, step, generation_kind=rec.get("kind")) if inj else None

    def _corrupt(self, manager) -> dict:
        """Flip bytes in the newest complete checkpoint's shard file (this rank's when it wrote
        one), after this rank's pending writes are durable (so that it is the newest)."""
        from phalanx.checkpoint.store import MANIFEST, list_checkpoints

        if manager is not None:
            deadline = time.monotonic() + 120
            while manager.in_use and time.monotonic() < deadline:
                manager.poll(block_s=0.5)
        path = next((p for p in list_checkpoints(self.root) if (p / MANIFEST).is_file()), None)
        if path is None:
            log.warning("corrupt_checkpoint: no complete checkpoint under %s", self.root)
            return {"path": None}
        shards = sorted(path.glob("*.distcp"))
        mine = [f for f in shards if f.name.startswith(f"__{self.rank}_")]
        target = (mine or shards)[0]
        size = target.stat().st_size
        with open(target, "r+b") as f:
            f.seek(size // 2)
            block = f.read(64)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in block))
            f.flush()
            os.fsync(f.fileno())
        return {"path": str(path), "file": target.name,
                "checkpoint_step": int(path.name.split("_")[-1])}


def _wait_as_spare(spare: str, host: str, port: int, token: str) -> dict:
    """A warm spare: pay for starting Python and importing torch and phalanx now, then wait
    until the controller assigns a rank (run-global key spare/{id}); a replacement then
    costs a store round trip instead of a process start."""
    import torch  # noqa: F401 - the import is the point
    import torch.distributed  # noqa: F401

    import phalanx.checkpoint.recover  # noqa: F401
    import phalanx.parallel.factory  # noqa: F401
    import phalanx.parallel.pipeline_trainer  # noqa: F401
    from phalanx.orchestrator.commit import RUN
    from phalanx.orchestrator.control_plane import ControlPlane, connect

    cp = ControlPlane(connect(host, port, timeout_s=60), token=token, generation=RUN)
    cp.set(f"spare_ready/{spare}", {"pid": os.getpid()})
    while True:  # a blocking store wait: no polling while idle, no delay when called
        try:
            return cp.wait(f"spare/{spare}", timeout_s=3600)
        except TimeoutError:
            continue


def main() -> int:
    # A crash or abort prints every thread's Python stack into the worker log.
    faulthandler.enable(all_threads=True)
    # On SIGUSR1 (the controller suspects a hang) every thread's stack goes to the log.
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    # Stopping is the controller's decision, taken at a step boundary for every rank at once.
    # A batch system signals every process of a job (Slurm's --signal, scancel, a requeue):
    # the controller gets it too and stops the run cleanly; a worker that died of it would
    # turn that stop into a failure. The controller ends workers with SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    token = os.environ["PHALANX_TOKEN"]
    if spare := os.environ.get("PHALANX_SPARE"):
        logging.basicConfig(level=logging.INFO,
                            format=f"%(asctime)s spare{spare} %(levelname)s %(name)s: %(message)s")
        job = _wait_as_spare(spare, host, port, token)
        os.environ.update({"RANK": str(job["rank"]), "LOCAL_RANK": str(job["local_rank"]),
                           "PHALANX_GENERATION": str(job["generation"]),
                           "PHALANX_REPLACEMENT": "1"})
        log.info("spare %s takes rank %d in generation %d", spare, job["rank"], job["generation"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    generation = int(os.environ.get("PHALANX_GENERATION", "0"))
    replacement = os.environ.get("PHALANX_REPLACEMENT") == "1"
    run_dir = Path(os.environ["PHALANX_RUN_DIR"])
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    import torch
    import torch.distributed as dist

    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.commit import RUN, CommitGate, GenerationChanged, current_generation
    from phalanx.orchestrator.control_plane import ControlPlane, connect
    from phalanx.orchestrator.corpus import corpus_from_dict
    from phalanx.orchestrator.plan import Plan

    store = connect(host, port, timeout_s=60)
    run_cp = ControlPlane(store, token=token, generation=RUN)
    cp = ControlPlane(store, token=token, generation=generation)
    run = RunConfig.from_dict(cp.wait("config", timeout_s=60))
    plan = Plan.from_json(cp.wait("plan", timeout_s=60))
    torch.set_num_threads(plan.threads_per_worker)
    _pin_cores(local_rank, plan.threads_per_worker)

    state = {"step": -1, "rank": rank}
    stop_hb = threading.Event()
    hb_thread = threading.Thread(target=_heartbeat, daemon=True, name="heartbeat",
                                 args=(host, port, token, RUN, rank, run.fault.heartbeat_s,
                                       state, stop_hb))
    hb_thread.start()
    seen = {"generation": generation}
    threading.Thread(target=_generation_watch, daemon=True, name="generation-watch",
                     args=(host, port, token, seen, stop_hb)).start()
    from phalanx.parallel.waits import set_abort_check

    set_abort_check(lambda: seen["generation"] > state["generation"])
    state["generation"] = generation
    seq = [0]

    def report(event: dict) -> None:
        try:
            run_cp.set(f"event/{_proc_id()}/{seq[0]}", {"rank": rank, **event})
            seq[0] += 1
        except Exception:  # noqa: BLE001 - an unreachable controller is the heartbeat's job
            log.warning("could not report %s", event.get("event"))

    if plan.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    tokens = open_tokens(corpus_from_dict(plan.corpus))
    from phalanx.checkpoint.reshard import default_root
    from phalanx.parallel import waits

    injector = _Injector(run, rank, replacement=replacement, run_cp=run_cp, report=report,
                         root=default_root(run, run_dir))
    old_trainer, step, res = None, 0, None
    memory = None  # the last generation's snapshots in host memory (a peer recovery's source)
    while True:
        # One generation: its groups, its trainer (rebuilt), its recovery, its steps. When the
        # world shrinks or grows the controller renumbers the survivors.
        rec = cp.wait("recovery", timeout_s=60)
        if rec.get("renumber"):
            if str(rank) not in rec["renumber"]:
                log.info("not a member of generation %d; exiting", generation)
                return 0
            rank = int(rec["renumber"][str(rank)])
            state["rank"] = rank
            run = RunConfig.from_dict(cp.wait("config", timeout_s=60))
        elif rank not in {m.rank for m in plan.members}:
            log.info("not a member of generation %d; exiting", generation)
            return 0
        state["generation"] = generation
        dist.init_process_group(plan.backend,
                                store=dist.PrefixStore(f"g{generation}/pg", store), rank=rank,
                                world_size=plan.world_size,
                                timeout=timedelta(seconds=run.fault.collective_timeout_s))
        waits.take_aborted()  # what the last generation's waits ended in is reported already
        trainer = manager = None
        # fault.inject at: recovery -- this rank fails while entering a recovery generation.
        act = injector.entering_recovery(rec, state["step"] + 1)
        if act is not None:
            act()
        try:
            trainer, start, manager = _enter_generation(
                run, plan, cp, rank=rank, device=device, tokens=tokens, old=old_trainer,
                token=token, run_dir=run_dir, generation=generation, host=host, port=port,
                report=report, memory=memory)
        except (GenerationChanged, RuntimeError) as e:
            # A peer failed during the recovery (a transfer or a collective of the trainer's
            # construction lost its partner) or the controller moved on. What this worker
            # carried into the generation is untouched (the rebuilt trainer only read it):
            # it carries it into the next one; the controller knows which ranks' state this
            # recovery had not yet delivered. A checkpoint that cannot be loaded is not a
            # peer's failure: this worker fails (as before), and the controller sees it.
            from phalanx.checkpoint.store import CheckpointError

            if isinstance(e, CheckpointError):
                raise
            during, why = "recovery", (str(e).splitlines() or [type(e).__name__])[0][:200]
            log.warning("recovery into generation %d failed", generation, exc_info=True)
        else:
            during = "training"
            old_trainer = memory = None
            injector.attach(trainer)
            trainer.commit_gate = CommitGate(cp, run_cp, rank=rank)
            cp.set(f"ready/{rank}", {"pid": os.getpid(), "start": start})
            try:
                step, res = _train(run, trainer, cp, rank=rank, start=start, state=state,
                                   manager=manager, injector=injector, report=report,
                                   run_dir=run_dir, generation=generation)
                break
            except (GenerationChanged, RuntimeError) as e:
                # A peer died (gloo: connection reset) or the controller moved on.
                why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        # Outside the except block: its traceback's frames refer to the trainer, and the
        # trainer to the old groups. Keep the tensors, drop everything else, and drop the
        # groups now: their connections close, which releases peers blocked on a receive
        # from this rank (gloo cannot cancel one) so that they can leave the generation too.
        from phalanx.checkpoint.recover import survivor_state

        if manager is not None:
            manager.abandon()
            if during == "training":
                memory = _memory_of(manager)
        if during == "training":
            carried = survivor_state(trainer, step=state["step"] + 1)
        else:
            carried = old_trainer
        trainer = manager = None
        release = _abandon_groups()
        gc.collect()  # the old trainer's cycles: the groups themselves outlive it, in `release`
        release()
        log.warning("generation %d ended at step %d (%s): %s", generation, state["step"] + 1,
                    during, why)
        report({"event": "generation_left", "generation": generation,
                "step": state["step"] + 1, "error": why, "during": during,
                "aborted_in": waits.take_aborted()})
        deadline = time.monotonic() + run.fault.startup_timeout_s
        while current_generation(run_cp) <= generation:
            if time.monotonic() > deadline:
                log.error("no new generation within fault.startup_timeout_s; exiting")
                return 1
            time.sleep(0.02)
        generation = current_generation(run_cp)
        cp = ControlPlane(store, token=token, generation=generation)
        plan = Plan.from_json(cp.wait("plan", timeout_s=60))
        old_trainer = carried
    from phalanx.checkpoint.recover import state_digest

    digest = state_digest(trainer, step=step + 1) if hasattr(trainer, "optimizer") and \
        run.parallel.zero.backend == "torch" else None
    if getattr(trainer, "lowcomm", None) is not None:
        # Replicas share the outer state (global model, outer momentum), not their inner
        # optimizers'; None where they differ by design (NoLoCo).
        digest = trainer.lowcomm.digest()
    dist.barrier()
    cp.set(f"done/{rank}", {"last_step": step, "stopped": bool(res.stop) if res else False,
                            "digest": digest, "generation": generation})
    # Join before exit: a thread left inside a store call while the interpreter tears
    # down aborts the process ("terminate called without an active exception").
    stop_hb.set()
    hb_thread.join(timeout=30)
    dist.destroy_process_group()
    return 0


def _abandon_groups() -> Callable[[], None]:
    """Forget every process group without calling its shutdown (DESIGN.md: abandon, not
    destroy_process_group, whose teardown can block on a group whose peer vanished). What
    `destroy_process_group` resets, minus the shutdown. The group counter restarts so the
    next generation's group names match those of a freshly started replacement.

    Returns `release`, to call once the old trainer is collected: it drops the groups on a
    thread of their own, where their destructors close the connections (which releases
    peers blocked on a receive from this rank: gloo cannot cancel one). A gloo group's
    destructor first waits for its operations in flight, and a receive whose sender is
    still inside its own group's destructor only ends at the collective timeout: two ranks
    that both left with a receive posted would otherwise hold each other in the garbage
    collector for minutes instead of joining the next generation (seen in the shrink/grow
    test). The worker ends with os._exit, so a destructor still waiting then is moot."""
    import torch.distributed.distributed_c10d as c10d

    w = c10d._world
    groups = [pg for pg in (*w.pg_map, c10d.GroupMember.WORLD) if pg is not None]
    c10d._update_default_pg(None)
    for table in (w.pg_map, w.pg_names, w.pg_group_ranks, w.pg_backend_config, w.pg_to_tag,
                  w.tags_to_pg, w.pg_coalesce_state):
        table.clear()
    c10d._unregister_all_process_groups()
    w.group_count = 0

    def release() -> None:
        threading.Thread(target=groups.clear, name="phalanx-drop-groups", daemon=True).start()

    return release


def _memory_of(manager) -> dict:
    """What a peer recovery can use from an abandoned generation's checkpoint manager: its
    complete snapshots (step -> buffers) and the buddy copy its persister kept."""
    snap = manager.snap
    snapshots = {} if snap is None else {
        held: snap.sets[i] for i, held in enumerate(snap.step) if held is not None}
    return {"snapshots": snapshots,
            "peer_file": manager.peer_copy["path"] if manager.peer_copy else None}


def _enter_generation(run, plan, cp, *, rank, device, tokens, old, token, run_dir, generation,
                      host, port, report, memory=None):
    """Build the trainer on this generation's groups and give it its state: fresh (or from
    checkpoint.resume), carried over from this worker's previous trainer, received from a
    replica, or rolled back to a checkpoint -- as the controller's `recovery` record says."""
    from phalanx.checkpoint.recover import carry_over, replica_transfer
    from phalanx.checkpoint.reshard import load_trainer
    from phalanx.parallel.factory import build_trainer

    t0 = time.perf_counter()
    rec = cp.wait("recovery", timeout_s=60)
    kind, start = rec.get("kind", "fresh"), int(rec.get("step", 0))
    trainer = build_trainer(run, rank=rank, layout=plan.layout, schedule=plan.schedule,
                            tokens=tokens, device=device,
                            state_follows=kind not in ("fresh", "restart"))
    t_built = time.perf_counter()
    if kind in ("replica", "shrink", "grow", "checkfree"):
        # Survivors keep their own state (a replica's is the same whatever the world size);
        # newcomers receive theirs from a live replica.
        if old is not None:
            carry_over(old, trainer, step=start)
        replica_transfer(trainer, rank=rank,
                         sources={int(k): v for k, v in rec.get("sources", {}).items()},
                         step=start)
        if kind == "checkfree":
            from phalanx.checkpoint.recover import checkfree_transfer

            used = checkfree_transfer(
                trainer, rank=rank, step=start, base_lr=run.optim.lr,
                rebuild={int(k): tuple(v) for k, v in rec.get("rebuild", {}).items()},
                init=run.fault.checkfree_init)
            if used is not None:
                report({"event": "checkfree_rebuilt", "generation": generation, **used})
    elif kind == "peer":  # every rank rolls back to its snapshot in memory (own, or a buddy's)
        from phalanx.checkpoint.recover import peer_transfer

        memory = memory or {}
        start = peer_transfer(trainer, rank=rank, step=start,
                              sources={int(k): v for k, v in rec.get("sources", {}).items()},
                              own=memory.get("snapshots", {}).get(start),
                              peer_file=memory.get("peer_file"))
        log.info("rolled back to step %d from memory (peer recovery)", start)
    elif rec.get("path"):  # resume at start-up, or every rank rolls back to a checkpoint
        start = load_trainer(trainer, rec["path"], token=token)
        log.info("loaded %s at step %d (%s)", rec["path"], start, kind)
    elif kind not in ("fresh", "restart"):
        raise RuntimeError(f"recovery {kind} without a source")
    # "restart": nothing survived anywhere; the rebuilt trainer starts from step 0.
    trainer.requeue = list(rec.get("requeue", []))  # a lost lowcomm replica's samples
    newcomers = {int(k) for k in rec.get("sources", {})}
    if getattr(trainer, "lowcomm", None) is not None and kind in ("replica", "grow") \
            and rank in newcomers:
        trainer.lowcomm.rejoin()  # from the global model, not the source's local one
    t_state = time.perf_counter()
    manager = _checkpoint_manager(run, trainer, report, rank=rank, world=plan.world_size,
                                  token=token, run_dir=run_dir, generation=generation,
                                  host=host, port=port)
    if generation > 0:  # where a recovery's time goes, per rank (events.jsonl)
        report({"event": "generation_entered", "generation": generation, "kind": kind,
                "build_s": round(t_built - t0, 4), "state_s": round(t_state - t_built, 4),
                "checkpoint_s": round(time.perf_counter() - t_state, 4)})
    return trainer, start, manager


def _train(run, trainer, cp, *, rank, start, state, manager, injector, report, run_dir,
           generation):
    t = run.trainer
    audit = None
    if t.audit_samples:
        (run_dir / "audit").mkdir(parents=True, exist_ok=True)
        audit = open(run_dir / "audit" / f"rank{rank}.jsonl", "a")
    from phalanx.parallel import waits

    gate = trainer.commit_gate
    step, res = start, None
    for step in range(start, t.steps):
        # Busy time (straggler detection): this iteration's wall time minus the time blocked
        # on peers (waits: collectives, transfers; the commit gate). It goes to the controller
        # with the next step's vote.
        t_it, w_it, g_it = time.perf_counter(), waits.waited_s(), gate.wait_s if gate else 0.0
        injector.before_step(step, report, manager)
        res = trainer.train_step(step, stop_requested=cp.has("stop"))
        state["step"] = step
        if manager is not None:
            manager.after_step(step + 1, final=res.stop or step + 1 == t.steps)
        val = trainer.evaluate() if ((step + 1) % t.eval_every == 0 or step + 1 == t.steps) else None
        if audit is not None:
            audit.write(json.dumps({"step": step, "generation": generation,
                                    "dp_rank": trainer.dp_rank, "ids": res.sample_ids}) + "\n")
            audit.flush()
        lowcomm = getattr(trainer, "lowcomm", None)
        lowcomm_rec = lowcomm.take_metrics() if lowcomm is not None else {}
        if rank == 0:
            rec = {"step": step, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                   "tokens": res.tokens, "step_time_s": res.step_time_s,
                   "tokens_per_s": res.tokens / res.step_time_s, "skipped": res.skipped,
                   "generation": generation}
            if val is not None:
                rec["val_loss"] = val
            if manager is not None and manager.snap is not None and manager.snap.blocking_s:
                rec["checkpoint_blocking_s"] = manager.snap.blocking_s[-1]
            rec.update(lowcomm_rec)  # bytes this worker sent to its replicas, time blocked
            cp.set(f"metrics/{step}", rec)
        if gate is not None:
            busy = (time.perf_counter() - t_it) - (waits.waited_s() - w_it) - (gate.wait_s - g_it)
            gate.busy = {"step": step, "s": round(max(busy, 0.0), 6)}
        if res.stop:
            break
    if manager is not None:
        manager.close()  # the last checkpoint is durable before this worker reports done
    _write_timeline(run_dir, rank, trainer.layout, trainer, step)
    if audit is not None:
        audit.close()
    return step, res


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: with torch 2.13 + gloo, destroying the C++ objects at
    # teardown aborts now and then ("terminate called without an active exception", no Python
    # frame), which would turn a finished worker into a crashed one. Everything is flushed.
    os._exit(code)
