"""The background persister: one process per worker that writes snapshots to disk and
keeps a buddy's snapshot in its memory.

A process, not a thread: hashing and serialising hundreds of MB would hold the
GIL and stall the training loop. The persisters of all workers form their own
gloo world (store prefix `g{G}/persist`), because a DCP save is collective and
must never share a process group with the training collectives (a concurrent
DCP save on the training group aborts the job). Commands arrive in the same
order on every rank (they are a function of the step), so the persisters'
collectives always match. One command runs at a time: at most one write in
flight.

Failures stay here: an I/O error (disk full, quota) fails that checkpoint on
every rank -- DCP gathers write errors -- and no manifest is written, so the
checkpoint stays invisible; the worker is told and reports it; training goes on.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
import traceback
from datetime import timedelta
from typing import Any

# Fault injection (tests, `phalanx bench checkpoint`): cap the size of any file this process
# writes, so a write fails with EFBIG the way a full disk fails with ENOSPC.
DISK_LIMIT_ENV = "PHALANX_FAULT_DISK_LIMIT_BYTES"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(cfg: dict[str, Any], sets: list[dict[str, Any]], cmds: Any, replies: Any) -> None:
    """Entry point of the spawned process. `sets`: the worker's shared-memory buffer sets."""
    _die_with_parent()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from phalanx.checkpoint import store

    torch.set_num_threads(1)
    tcp = dist.TCPStore(cfg["host"], cfg["port"], is_master=False,
                        timeout=timedelta(seconds=cfg["timeout_s"]))
    dist.init_process_group("gloo", store=dist.PrefixStore(cfg["prefix"], tcp),
                            rank=cfg["rank"], world_size=cfg["world"],
                            timeout=timedelta(seconds=cfg["timeout_s"]))
    limit = os.environ.get(DISK_LIMIT_ENV)
    if limit:  # after start-up, which writes its own files (caches) the cap would break
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    replies.put(("ready", None, {"pid": os.getpid()}))
    peer: dict[str, Any] = {}
    while True:
        cmd = cmds.get()
        kind = cmd[0]
        if kind == "stop":
            break
        try:
            if kind == "save":
                _, idx, step, path, meta = cmd
                t0 = time.perf_counter()
                m = store.save(sets[idx], path, meta=meta, token=cfg.get("token"))
                # When the manifest became durable, on the host-wide CLOCK_MONOTONIC: the
                # worker measures from its own after_step call (`phalanx bench checkpoint`).
                done = time.monotonic()
                gone = []
                if cfg["rank"] == 0:
                    gone = [str(p) for p in store.prune(cfg["root"], keep_last=cfg["keep_last"],
                                                        keep_every=cfg["keep_every"])]
                replies.put(("saved", idx, {"step": step, "path": str(path),
                                            "durable_s": time.perf_counter() - t0,
                                            "bytes": sum(f["bytes"] for f in m["files"].values()),
                                            "pruned": gone, "done_monotonic": done}))
            elif kind == "peer":
                _, idx, step = cmd
                t0 = time.perf_counter()
                peer = _exchange(sets[idx], step, cfg)
                # Into host memory outside this process (tmpfs): the copy must outlive the
                # persister, which a generation change kills, so that recovery can send it.
                path = _keep(peer, cfg["peer_dir"], cfg["rank"])
                del peer["state"]
                replies.put(("peer", idx, {"step": step, "from_rank": peer["rank"],
                                           "path": path,
                                           "exchange_s": time.perf_counter() - t0}))
            elif kind == "dump_peer":
                import shutil

                shutil.copyfile(peer["path"], cmd[1])
                replies.put(("dumped", None, {"path": cmd[1]}))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported, never fatal
            # (DCP's CheckpointException derives from BaseException.)
            idx = cmd[1] if kind in ("save", "peer") else None
            replies.put(("failed", idx, {"command": kind, "step": cmd[2] if len(cmd) > 2 else None,
                                         "error": _summary(e), "trace": traceback.format_exc()}))
            if not _healthy(dist):
                break  # a dead gloo group cannot run another collective (see DESIGN.md)
    dist.destroy_process_group()
    replies.put(("stopped", None, {}))


def _keep(peer: dict[str, Any], directory: str, rank: int) -> str:
    """Write the ward's copy atomically as `peer-holder{rank}.pt`; returns its path."""
    import torch

    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"peer-holder{rank}.pt")
    tmp = f"{final}.tmp"
    torch.save({"step": peer["step"], "rank": peer["rank"], "state": peer["state"]}, tmp)
    os.replace(tmp, final)
    peer["path"] = final
    return final


def _summary(e: BaseException) -> str:
    """One line: DCP wraps every rank's traceback into its message; the last line of it is
    the root cause (the I/O error)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = lines[-1] if lines else ""
    return f"{type(e).__name__}: {cause}"[:400]


def _healthy(dist: Any) -> bool:
    try:
        dist.barrier()
        return True
    except Exception:  # noqa: BLE001
        return False


def _exchange(state: dict[str, Any], step: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Send this rank's snapshot to its buddy and receive its ward's (who names us buddy).
    Headers (names, shapes) go first with all_gather_object: the state differs by stage."""
    import torch
    import torch.distributed as dist

    buddy, ward = cfg["buddy"], cfg["ward"]
    header = [(name, off, tuple(t.shape), str(t.dtype).removeprefix("torch."))
              for name, b in state.items() for off, t in b.pieces.items()]
    headers: list[Any] = [None] * cfg["world"]
    dist.all_gather_object(headers, header)
    recv = {}
    works = []
    for name, off, shape, dtype in headers[ward]:
        buf = torch.empty(shape, dtype=getattr(torch, dtype))
        recv[(name, off)] = buf
        works.append(dist.irecv(buf, src=ward))
    for b in state.values():
        for t in b.pieces.values():
            works.append(dist.isend(t.contiguous(), dst=buddy))
    for w in works:
        w.wait()
    return {"step": step, "rank": ward, "state": recv}
