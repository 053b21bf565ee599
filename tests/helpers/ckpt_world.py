"""One rank of a checkpoint test world (`python -m tests.helpers.ckpt_world --worker SPEC`).

SPEC (JSON) holds a list of `jobs`, each run in order in this world:
  {"name", "run": RunConfig dict, "schedule": plan schedule or null, "corpus": dict,
   "load": checkpoint dir or null, "save_at": [steps], "root": dir, "steps": [lo, hi],
   "snapshot": bool}
A job builds the trainer, optionally loads, trains steps lo..hi-1 (saving synchronously
after the steps in save_at, or through the async CheckpointManager when "snapshot" is set)
and records every step's loss. Rank 0 writes {name: {"losses": [...], ...}} to spec["out"].
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def _job(job: dict, rank: int) -> dict:
    from phalanx.checkpoint.reshard import load_trainer, save_trainer
    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.corpus import corpus_from_dict
    from phalanx.parallel.factory import build_trainer
    from phalanx.parallel.mesh import Layout

    run = RunConfig.from_dict(job["run"])
    p = run.parallel
    layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, vpp=p.vpp)
    tokens = open_tokens(corpus_from_dict(job["corpus"]))
    trainer = build_trainer(run, rank=rank, layout=layout, schedule=job["schedule"],
                            tokens=tokens, device=torch.device("cpu"))
    lo, hi = job["steps"]
    if job.get("load"):
        got = load_trainer(trainer, job["load"])
        assert got == lo, f"checkpoint is at step {got}, job starts at {lo}"
    manager = None
    events: list = []
    if job.get("snapshot"):
        from phalanx.checkpoint.manager import CheckpointManager
        from phalanx.checkpoint.persister import DISK_LIMIT_ENV

        if job.get("disk_limit"):
            os.environ[DISK_LIMIT_ENV] = str(job["disk_limit"])  # inherited by the persister
        manager = CheckpointManager(run, trainer, root=job["root"], rank=rank,
                                    world=dist.get_world_size(), token=None,
                                    events=events.append, instance=job["index"])
        os.environ.pop(DISK_LIMIT_ENV, None)
    kill = job.get("kill_persister") or {}
    losses = []
    for step in range(lo, hi):
        losses.append(trainer.train_step(step).loss)
        if manager is not None:
            manager.after_step(step + 1)
            if kill.get("rank") == rank and kill.get("step") == step + 1:
                _kill_mid_write(manager, Path(job["root"]), step + 1)
        if step + 1 in job.get("save_at", []):
            save_trainer(trainer, job.get("sync_root", job["root"]), step=step + 1)
    out: dict = {"losses": losses}
    if manager is not None:
        if job.get("dump"):
            step_mem, mem = manager.memory_copy()
            torch.save({"step": step_mem, "state": mem}, Path(job["dump"]) / f"mem{rank}.pt")
            manager.poll(block_s=30)
            manager.dump_peer(Path(job["dump"]) / f"peer{rank}.pt")
        manager.close()
        out["stats"] = manager.stats()
        out["events"] = events
        out["buddy"] = getattr(manager, "buddy", None)
    return out


def _kill_mid_write(manager, root: Path, step: int) -> None:
    """SIGKILL this rank's persister once the checkpoint's directory exists: the save has
    begun, and it cannot commit without this rank's persister (barrier, shard, hashes)."""
    import signal
    import time

    from phalanx.checkpoint import store

    deadline = time.monotonic() + 30
    while not store.step_dir(root, step).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(manager.proc.pid, signal.SIGKILL)


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    out = {job["name"]: _job({**job, "index": i}, rank) for i, job in enumerate(spec["jobs"])}
    dist.barrier()
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, out)
    if rank == 0:
        merged = {name: {**res, "ranks": [r[name] for r in per_rank]} for name, res in out.items()}
        Path(spec["out"]).write_text(json.dumps(merged))
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        main(sys.argv[2])
        sys.stdout.flush()
        os._exit(0)
    sys.exit("usage: python -m tests.helpers.ckpt_world --worker SPEC")
