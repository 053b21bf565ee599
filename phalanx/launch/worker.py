"""Worker process entry point: `python -m phalanx.launch.worker` (started by the controller).

Process concerns only -- environment, control plane, heartbeats, reporting; the
training itself lives in `phalanx.parallel`. The environment is torchrun's
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) plus PHALANX_TOKEN,
PHALANX_GENERATION and PHALANX_RUN_DIR.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("phalanx.worker")

# Exit codes the controller turns into messages.
EXIT_CONTROLLER_LOST = 3


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
            cp.set(f"hb/{rank}", {"t": time.time(), "step": state["step"], "pid": os.getpid()})
            last_ok = time.monotonic()
        except Exception:  # noqa: BLE001 - any store failure means the same: controller gone
            if time.monotonic() - last_ok > 10 * period_s + 10:
                # An orphan must not keep training (or hold its cores) without a controller.
                print(f"rank {rank}: controller unreachable, exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_CONTROLLER_LOST)


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


def _checkpoint_manager(run, trainer, cp, *, rank: int, world: int, token: str, run_dir: Path,
                        generation: int, host: str, port: int):
    """The checkpoint levels this recipe asks for, reporting into the controller's events."""
    ck = run.checkpoint
    if not (ck.memory_every or ck.disk_every or ck.peer_every):
        return None
    from phalanx.checkpoint.manager import CheckpointManager
    from phalanx.checkpoint.reshard import default_root

    seq = [0]

    def report(event: dict) -> None:
        # Saves are collective: rank 0 speaks for all; every rank reports its own failures.
        if rank != 0 and event["event"] != "checkpoint_failed":
            return
        try:
            cp.set(f"event/{rank}/{seq[0]}", event)
            seq[0] += 1
        except Exception:  # noqa: BLE001 - an unreachable controller is the heartbeat's job
            log.warning("could not report %s", event.get("event"))

    return CheckpointManager(run, trainer, root=default_root(run, run_dir), rank=rank,
                             world=world, token=token, events=report, generation=generation,
                             host=host, port=port,
                             ranks_per_node=run.cluster.devices_per_node)


def main() -> int:
    # A crash or abort prints every thread's Python stack into the worker log.
    faulthandler.enable(all_threads=True)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    token = os.environ["PHALANX_TOKEN"]
    generation = int(os.environ.get("PHALANX_GENERATION", "0"))
    run_dir = Path(os.environ["PHALANX_RUN_DIR"])
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    import torch
    import torch.distributed as dist

    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.control_plane import ControlPlane, connect
    from phalanx.orchestrator.corpus import corpus_from_dict
    from phalanx.orchestrator.plan import Plan
    from phalanx.parallel.factory import build_trainer

    store = connect(host, port, timeout_s=60)
    cp = ControlPlane(store, token=token, generation=generation)
    run = RunConfig.from_dict(cp.wait("config", timeout_s=60))
    plan = Plan.from_json(cp.wait("plan", timeout_s=60))
    torch.set_num_threads(plan.threads_per_worker)
    _pin_cores(local_rank, plan.threads_per_worker)
    assert plan.world_size == world, f"plan world {plan.world_size} != WORLD_SIZE {world}"

    state = {"step": -1}
    stop_hb = threading.Event()
    hb_thread = threading.Thread(target=_heartbeat, daemon=True, name="heartbeat",
                                 args=(host, port, token, generation, rank, run.fault.heartbeat_s,
                                       state, stop_hb))
    hb_thread.start()

    if plan.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(plan.backend, store=dist.PrefixStore(f"g{generation}/pg", store),
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=run.fault.collective_timeout_s))
    tokens = open_tokens(corpus_from_dict(plan.corpus))
    lay = plan.layout
    trainer = build_trainer(run, rank=rank, layout=lay, schedule=plan.schedule, tokens=tokens,
                            device=device)
    start = 0
    resume = cp.wait("resume", timeout_s=60)
    if resume:
        from phalanx.checkpoint.reshard import load_trainer

        start = load_trainer(trainer, resume["path"], token=token)
        log.info("resumed from %s at step %d", resume["path"], start)
    manager = _checkpoint_manager(run, trainer, cp, rank=rank, world=world, token=token,
                                  run_dir=run_dir, generation=generation, host=host, port=port)
    cp.set(f"ready/{rank}", {"pid": os.getpid()})

    audit = None
    if run.trainer.audit_samples:
        (run_dir / "audit").mkdir(parents=True, exist_ok=True)
        audit = open(run_dir / "audit" / f"rank{rank}.jsonl", "a")
    t = run.trainer
    step = start
    for step in range(start, t.steps):
        res = trainer.train_step(step, stop_requested=cp.has("stop"))
        state["step"] = step
        if manager is not None:
            manager.after_step(step + 1, final=res.stop or step + 1 == t.steps)
        val = trainer.evaluate() if ((step + 1) % t.eval_every == 0 or step + 1 == t.steps) else None
        if audit is not None:
            audit.write(json.dumps({"step": step, "generation": generation,
                                    "dp_rank": trainer.dp_rank, "ids": res.sample_ids}) + "\n")
            audit.flush()
        if rank == 0:
            rec = {"step": step, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                   "tokens": res.tokens, "step_time_s": res.step_time_s,
                   "tokens_per_s": res.tokens / res.step_time_s, "skipped": res.skipped}
            if val is not None:
                rec["val_loss"] = val
            if manager is not None and manager.snap is not None and manager.snap.blocking_s:
                rec["checkpoint_blocking_s"] = manager.snap.blocking_s[-1]
            cp.set(f"metrics/{step}", rec)
        if res.stop:
            break
    if manager is not None:
        manager.close()  # the last checkpoint is durable before this worker reports done
    _write_timeline(run_dir, rank, lay, trainer, step)
    if audit is not None:
        audit.close()
    dist.barrier()
    cp.set(f"done/{rank}", {"last_step": step, "stopped": bool(res.stop)})
    # Join before exit: a thread left inside a store call while the interpreter tears
    # down aborts the process ("terminate called without an active exception").
    stop_hb.set()
    hb_thread.join(timeout=30)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: with torch 2.13 + gloo, destroying the C++ objects at
    # teardown aborts now and then ("terminate called without an active exception", no Python
    # frame), which would turn a finished worker into a crashed one. Everything is flushed.
    os._exit(code)
