"""The torchrun peer of `phalanx bench recovery`: one worker of a DDP job that torchrun restarts.

Launched by `python -m torch.distributed.run ... -m phalanx.bench.peer_torchrun SPEC` (see
`phalanx.bench.recovery`). Plain DDP + AdamW on the bench's model and data; a synchronous
DCP `dcp.save` of model and optimizer state every `ckpt_every` steps (rank 0 then points
`latest` at it), and on start a `dcp.load` of `latest` when there is one -- so a restart
by `--max-restarts` resumes every worker from the last checkpoint. The killed rank SIGKILLs
itself right before its step (once: a marker file), as phalanx's fault injection does.
Rank 0 logs one JSON line per committed step (`t`: wall clock once the step's gradient is
reduced and clipped, just before `optimizer.step()`) and one per process start.
"""

from __future__ import annotations

import time

T_PROC = time.time()  # first thing: this process's Python is up (before torch is imported)

import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from phalanx.bench.recovery import JsonLog, PeerJob
    from phalanx.parallel.optim import build_adamw

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    t_imported = time.time()
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["pg_timeout_s"]))
    t_pg = time.time()
    job = PeerJob(spec)
    run = job.run
    params = inspect.signature(DDP.__init__).parameters
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
            else {"broadcast_buffers": False})  # as phalanx's DDP trainer
    ddp = DDP(job.model, gradient_as_bucket_view=True, **sync)
    opt = build_adamw(job.model, run.optim)
    ckdir = Path(spec["ckpt_dir"])
    latest = ckdir / "latest"
    start = 0
    if latest.exists():
        start = int(latest.read_text())
        msd, osd = get_state_dict(ddp, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(ckdir / f"step{start}"))
        set_state_dict(ddp, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    t_loaded = time.time()
    log = JsonLog(spec["log"]) if rank == 0 else None
    if log is not None:
        log.write({"event": "start", "restart": restart, "world": world, "t_proc": T_PROC,
                   "t_imported": t_imported, "t_pg": t_pg, "t_loaded": t_loaded,
                   "start_step": start})
    steps, every = spec["steps"], spec["ckpt_every"]
    clip = run.trainer.grad_clip if run.trainer.grad_clip > 0 else float("inf")
    vocab = run.model.vocab_size
    for step in range(start, steps):
        job.maybe_kill(step, rank)
        lr = job.lr(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = job.batch(step, rank, world)
        logits = ddp(x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        loss.backward()  # DDP: the gradient all-reduce completes inside backward
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), clip)
        t_commit = time.time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None:
            log.write({"event": "commit", "step": step, "t": t_commit, "t_done": time.time(),
                       "participants": world, "restart": restart, "loss": float(loss.detach())})
        if every and (step + 1) % every == 0 and step + 1 < steps:
            t0 = time.time()
            msd, osd = get_state_dict(ddp, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckdir / f"step{step + 1}"))
            if rank == 0:
                # dcp.save returns on rank 0 after every rank's data and the metadata are
                # written: only then may a restart find this checkpoint.
                tmp = ckdir / "latest.tmp"
                tmp.write_text(str(step + 1))
                os.replace(tmp, latest)
            if log is not None:
                log.write({"event": "save", "step": step + 1, "t": time.time(),
                           "save_s": time.time() - t0})
    dist.barrier()
    if log is not None:
        log.write({"event": "end", "t": time.time()})
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (gloo objects may abort in their destructors)
