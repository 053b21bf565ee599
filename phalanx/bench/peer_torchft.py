"""The torchft peer of `phalanx bench recovery`: one replica group (of one worker) under torchft.

Started (and, after it dies, restarted) by the bench's harness in `phalanx.bench.recovery`
with `PHALANX_BENCH_REPLICA` = its replica-group index; the lighthouse runs in the harness.
torchft's `Manager` (ProcessGroupGloo, default HTTP checkpoint transport, async quorum),
its `DistributedDataParallel` and `Optimizer` wrapper, AdamW on the bench's model and data:
replica group r trains on data-parallel shard r of 4 of each step's global batch. A
restarted replica group joins the next quorum and heals from a peer's live state (torchft
copies the state dict of a replica at the quorum's max step). The killed replica SIGKILLs
itself right before its step (once: a marker file). Every replica logs one JSON line per
step with the commit decision, the wall clock `t` right after `should_commit()` returned
(before `optimizer.step()`) and the number of replica groups that took part.
"""

from __future__ import annotations

import time

T_PROC = time.time()  # first thing: this process's Python is up (before torch is imported)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402


def _start_barrier(spec: dict, replica: int) -> None:
    """Only the first incarnations: wait until every replica group has its manager up, so
    the first quorum has all of them (a restarted one joins a running job instead)."""
    d = Path(spec["ready_dir"])
    (d / f"ready{replica}").write_text(str(time.time()))
    deadline = time.monotonic() + spec["pg_timeout_s"]
    while len(list(d.glob("ready*"))) < spec["replicas"]:
        if time.monotonic() > deadline:
            raise TimeoutError("replica groups did not all start")
        time.sleep(0.01)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    replica = int(os.environ["PHALANX_BENCH_REPLICA"])
    incarnation = int(os.environ.get("PHALANX_BENCH_INCARNATION", "0"))
    import torch
    import torch.nn.functional as F
    from torch.distributed import TCPStore
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    from phalanx.bench.recovery import JsonLog, PeerJob
    from phalanx.parallel.optim import build_adamw

    torch.set_num_threads(1)
    t_imported = time.time()
    # The replica group's own store (torchrun would host it; a group of one hosts it itself).
    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    job = PeerJob(spec)
    run = job.run
    inner = build_adamw(job.model, run.optim)

    def state_dict() -> dict:
        return {"model": job.model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        job.model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    timeout = timedelta(seconds=spec["pg_timeout_s"])
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout), min_replica_size=spec["torchft_min_replicas"],
        load_state_dict=load_state_dict, state_dict=state_dict,
        replica_id=f"bench_{replica}", lighthouse_addr=spec["lighthouse"], hostname="localhost",
        rank=0, world_size=1, store_addr="localhost", store_port=store.port, timeout=timeout,
        quorum_timeout=timeout,
        # Every replica initialises the same weights from the seed: no step-0 sync needed.
        init_sync=False)
    model = DistributedDataParallel(manager, job.model)
    opt = Optimizer(manager, inner)
    t_manager = time.time()
    if incarnation == 0:
        _start_barrier(spec, replica)
    log = JsonLog(Path(spec["log_dir"]) / f"replica{replica}.jsonl")
    log.write({"event": "start", "incarnation": incarnation, "t_proc": T_PROC,
               "t_imported": t_imported, "t_manager": t_manager, "t_ready": time.time(),
               "step": manager.current_step()})
    steps, n = spec["steps"], spec["replicas"]
    clip = run.trainer.grad_clip if run.trainer.grad_clip > 0 else float("inf")
    vocab = run.model.vocab_size
    while (step := manager.current_step()) < steps:
        job.maybe_kill(step, replica)
        opt.zero_grad()  # torchft: starts this step's quorum (async), then zeroes the grads
        x, y = job.batch(step, replica, n)
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        loss.backward()  # torchft's DDP comm hook: the fault-tolerant all-reduce
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), clip)
        ok = manager.should_commit()  # a healing replica applies its peer's state here
        t = time.time()
        if ok:
            # The committed step's index: a replica that just healed jumped to the max step.
            lr = job.lr(manager.current_step() - 1)
            for g in inner.param_groups:
                g["lr"] = lr
            inner.step()
        log.write({"event": "commit" if ok else "abort", "step": manager.current_step() - 1
                   if ok else step, "t": t, "participants": manager.num_participants(),
                   "loss": float(loss.detach()), "incarnation": incarnation})
    log.write({"event": "end", "t": time.time()})
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (gloo and torchft's servers may abort in it)
