"""Multi-level checkpointing for one worker: memory every `memory_every` steps, a buddy's
memory every `peer_every`, disk every `disk_every` (the newest memory snapshot, persisted in
the background). Called by the worker after each step; never decides about recovery.

Level by level:
- memory: `HostSnapshot` copies the state into shared host buffers while the next step
  runs; the next optimizer step waits for the copy (its pre-step hook).
- peer and disk: the persister process (`persister.py`) sends the snapshot to the
  buddy's persister, or writes it as a verified DCP checkpoint, while training goes on.

Every decision here is a function of the step, identical on every rank, because the
persisters' saves and exchanges are collectives among themselves: a rank that skipped a
save another rank made would pair different steps' collectives. When every buffer set is
in use (the disk is slower than the snapshot cadence), the snapshot waits rather than
skipping, and that wait counts as blocking time.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phalanx.checkpoint import store
from phalanx.checkpoint.reshard import checkpoint_meta
from phalanx.checkpoint.snapshot import HostSnapshot
from phalanx.checkpoint.state import trainer_state

log = logging.getLogger("phalanx.checkpoint")

__all__ = ["CheckpointManager", "buddy_of", "peer_dir"]


def peer_dir(root: str | Path) -> Path:
    """Where persisters keep their buddy copies: host memory (tmpfs) where the machine has
    one, named after the checkpoint root so that runs do not share it."""
    import hashlib
    import tempfile

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return base / f"phalanx-peer-{os.getuid()}-{tag}"


def buddy_of(rank: int, world: int, *, ranks_per_node: int, ranks_per_stage: int = 1) -> int:
    """The rank that keeps `rank`'s snapshot: on the next node when there is one (a node's
    loss never takes both copies), else in the next pipeline stage's block of ranks, else
    the next rank. Every rank is some rank's buddy exactly once (a rotation)."""
    if world <= 1:
        return rank
    shift = ranks_per_node if world > ranks_per_node else max(1, ranks_per_stage)
    if shift % world == 0:
        shift = 1
    return (rank + shift) % world


class CheckpointManager:
    def __init__(self, run: Any, trainer: Any, *, root: str | Path, rank: int, world: int,
                 token: str | None, events: Callable[[dict[str, Any]], None],
                 generation: int = 0, host: str | None = None, port: int | None = None,
                 ranks_per_node: int | None = None, instance: int = 0) -> None:
        """`generation` and `instance` name the persisters' store prefix: a second persister
        world on the same keys would rendezvous with the first one's stale entries, so each
        generation (and each manager of one generation, e.g. in tests) gets its own."""
        ck = run.checkpoint
        self.instance = instance
        self.run, self.trainer, self.rank, self.world = run, trainer, rank, world
        self.root, self.token, self.events = Path(root), token, events
        self.memory_every = ck.memory_every or min(e for e in (ck.disk_every, ck.peer_every,
                                                                 10**9) if e)
        if self.memory_every == 10**9:
            self.memory_every = 0
        self.disk_every, self.peer_every = ck.disk_every, ck.peer_every if world > 1 else 0
        self.snap: HostSnapshot | None = None
        self.proc: mp.process.BaseProcess | None = None
        self.in_use: dict[int, int] = {}  # buffer set -> commands on it the persister still runs
        self.saved: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.peer_steps: list[int] = []
        # The newest buddy copy this worker's persister holds: {"step", "from_rank", "path"}.
        self.peer_copy: dict[str, Any] | None = None
        # The buffer set holding this rank's own snapshot of the newest peer step: kept until
        # the next peer exchange, because a peer recovery rolls every survivor back to it.
        self._peer_set: int | None = None
        self._persist_dead = False
        if not self.memory_every:
            return
        live = trainer_state(trainer, step=0)
        # A third set when snapshots are taken between peer steps: one pinned for recovery,
        # one being written, one holding the newest complete snapshot.
        pin = bool(self.peer_every) and self.memory_every < self.peer_every
        self.snap = HostSnapshot(live, n_sets=3 if pin else 2)
        # The optimizer must not change what is being copied: its step waits for the copy.
        trainer.optimizer.register_step_pre_hook(lambda *_a, **_k: self.snap.wait())
        if self.disk_every or self.peer_every:
            self._start_persister(generation, host or os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                  port or int(os.environ["MASTER_PORT"]),
                                  ranks_per_node or world)

    # -- persister ----------------------------------------------------------------------
    def _start_persister(self, generation: int, host: str, port: int, per_node: int) -> None:
        from phalanx.checkpoint import persister

        stage_block = getattr(self.trainer.layout, "dp", 1) * getattr(self.trainer.layout, "tp", 1)
        buddy = buddy_of(self.rank, self.world, ranks_per_node=per_node,
                         ranks_per_stage=stage_block)
        ward = next(r for r in range(self.world)
                    if buddy_of(r, self.world, ranks_per_node=per_node,
                                ranks_per_stage=stage_block) == self.rank)
        ck = self.run.checkpoint
        cfg = {"host": host, "port": port, "rank": self.rank,
               "prefix": f"g{generation}/persist{self.instance}",
               "world": self.world, "token": self.token, "root": str(self.root),
               "keep_last": ck.keep_last, "keep_every": ck.keep_every,
               "timeout_s": ck.persist_timeout_s, "buddy": buddy, "ward": ward,
               "peer_dir": str(peer_dir(self.root))}
        ctx = mp.get_context("spawn")
        self.cmds, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=persister.main, name=f"phalanx-persister-{self.rank}",
                                args=(cfg, self.snap.sets, self.cmds, self.replies), daemon=True)
        self.proc.start()
        self.buddy, self.ward = buddy, ward

    def poll(self, block_s: float = 0.0) -> None:
        """Take the persister's replies: free buffer sets, record and report results."""
        if self.proc is None:
            return
        deadline = time.monotonic() + block_s
        while True:
            try:
                if block_s:
                    kind, idx, info = self.replies.get(
                        timeout=max(0.01, deadline - time.monotonic()))
                else:
                    kind, idx, info = self.replies.get_nowait()
            except queue.Empty:
                if self.in_use and self.proc is not None and not self.proc.is_alive():
                    self._lost_persister()
                return
            self._release(idx)
            if kind == "saved":
                self.saved.append(info)
                self.events({"event": "checkpoint_saved", "rank": self.rank, **info})
            elif kind == "peer":
                self._took_peer(idx, info)
            elif kind == "failed":
                self.failed.append(info)
                self.events({"event": "checkpoint_failed", "rank": self.rank,
                             **{k: v for k, v in info.items() if k != "trace"}})
                log.warning("checkpoint %s at step %s failed: %s", info["command"],
                            info["step"], info["error"])
            if block_s and not self.in_use:
                return

    def _release(self, idx: int | None) -> None:
        if idx is not None and idx in self.in_use:
            self.in_use[idx] -= 1
            if not self.in_use[idx]:
                del self.in_use[idx]

    def _lost_persister(self) -> None:
        if not self._persist_dead:
            self._persist_dead = True
            code = self.proc.exitcode if self.proc is not None else None
            self.events({"event": "checkpoint_failed", "rank": self.rank, "command": "persister",
                         "error": f"persister process exited ({code}); disk and peer levels off "
                                  "for this worker, training continues", "step": None})
            log.warning("persister process of rank %d exited (%s)", self.rank, code)
        self.in_use.clear()

    def _free_set(self) -> int:
        """A buffer set the persister is not reading, waiting for one if all are in use (but
        not for ever: a persister silent for persist_timeout_s is given up)."""
        assert self.snap is not None
        deadline = time.monotonic() + self.run.checkpoint.persist_timeout_s
        while True:
            if time.monotonic() > deadline and self.proc is not None:
                self.proc.kill()
                self.proc.join(timeout=10)
                self._lost_persister()
            self.poll()
            free = [i for i in range(len(self.snap.sets)) if i not in self.in_use]
            if free:
                latest, _ = self.snap.latest()
                # Keep the newest complete snapshot, and the one a peer recovery would roll
                # back to, intact when another set is free.
                others = [i for i in free if i not in (latest, self._peer_set)]
                others = others or [i for i in free if i != latest]
                return (others or free)[0]
            self.poll(block_s=1.0)

    # -- per step -------------------------------------------------------------------------
    def after_step(self, completed: int, *, final: bool = False) -> None:
        """Called after `completed` optimizer steps (the state now is the state after them).
        `final`: the last step of the run (every rank knows it): disk gets it too."""
        if self.snap is None:
            return
        self.poll()
        disk = (bool(self.disk_every) and (completed % self.disk_every == 0 or final)
                and not self._persist_dead)
        if completed % self.memory_every and not disk:
            return
        peer = bool(self.peer_every) and completed % self.peer_every == 0 and not self._persist_dead
        target = self._free_set()
        if disk or peer:
            self.in_use[target] = int(disk) + int(peer)
        meta = checkpoint_meta(self.trainer, completed) if disk else None
        path = str(store.step_dir(self.root, completed))

        def handoff(idx: int, step: int) -> None:
            # In the copy thread, the moment the buffers are complete.
            if peer:
                self.cmds.put(("peer", idx, step))
            if disk:
                self.cmds.put(("save", idx, step, path, meta))

        self.snap.start(trainer_state(self.trainer, step=completed), step=completed,
                        target=target, on_done=handoff if (disk or peer) else None)

    def memory_copy(self) -> tuple[int | None, dict[str, Any] | None]:
        """(step, buffers) of the newest complete local snapshot."""
        if self.snap is None:
            return None, None
        self.snap.wait()
        idx, step = self.snap.latest()
        return step, (self.snap.sets[idx] if idx is not None else None)

    def dump_peer(self, path: str | Path, timeout_s: float = 60) -> None:
        """Write the buddy copy this worker's persister holds (tests, diagnostics)."""
        self.cmds.put(("dump_peer", str(path)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            kind, idx, info = self.replies.get(timeout=max(0.1, deadline - time.monotonic()))
            self._release(idx)
            if kind == "dumped":
                return
            if kind == "peer":
                self._took_peer(idx, info)
            if kind == "saved":
                self.saved.append(info)
        raise TimeoutError("persister did not dump its peer copy")

    def _took_peer(self, idx: int | None, info: dict[str, Any]) -> None:
        self.peer_steps.append(info["step"])
        self.peer_copy = {k: info[k] for k in ("step", "from_rank", "path")}
        self._peer_set = idx
        # Every rank reports what it holds: the controller picks a peer recovery from these.
        self.events({"event": "checkpoint_peer", "rank": self.rank, **info})

    def own_snapshot(self, step: int) -> dict[str, Any] | None:
        """This rank's complete snapshot of `step` (buffers keyed like trainer_state), if a
        set still holds it."""
        if self.snap is None:
            return None
        for i, held in enumerate(self.snap.step):
            if held == step:
                return self.snap.sets[i]
        return None

    def stats(self) -> dict[str, Any]:
        s = self.snap
        return {"snapshots": len(s.blocking_s) if s else 0,
                "blocking_s": list(s.blocking_s) if s else [],
                "copy_s": list(s.copy_s) if s else [], "state_bytes": s.nbytes if s else 0,
                "saved": self.saved, "failed": self.failed, "peer_steps": self.peer_steps}

    def abandon(self) -> None:
        """The generation ended under us: the persisters' world includes the lost rank, so
        stop this one now (a new generation starts a new persister world); the snapshot
        buffers stay readable until this manager is dropped."""
        if self.snap is not None:
            try:
                self.snap.wait()
            except RuntimeError:
                pass
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(timeout=10)
            self.proc = None

    def close(self, timeout_s: float | None = None) -> None:
        """Finish the copy, let the persister finish what it was given, stop it."""
        if self.snap is not None:
            self.snap.wait()
        if self.proc is None:
            return
        deadline = time.monotonic() + (timeout_s or self.run.checkpoint.persist_timeout_s)
        while self.in_use and self.proc.is_alive() and time.monotonic() < deadline:
            self.poll(block_s=min(1.0, max(0.0, deadline - time.monotonic())))
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc = None
        if self.peer_copy is not None:  # the run is over: nobody will recover from it
            Path(self.peer_copy["path"]).unlink(missing_ok=True)
            try:
                Path(self.peer_copy["path"]).parent.rmdir()
            except OSError:
                pass  # other ranks' copies are still there
