"""The step commit protocol (DESIGN.md invariant 1): ranks vote, the controller alone commits.

After a step's gradients are reduced and its small agreement all-reduce is done, each rank
writes `g{G}/vote/{step}/{rank}` and waits for `g{G}/commit/{step}`; no rank steps its
optimizer before that key exists. The controller writes it once every member of the
generation has voted. A rank that dies before every vote is in leaves the step
uncommitted everywhere: the survivors see the generation change instead of the commit and
abandon the step, so their state is the state after the last committed step and a
replica's copy equals it. A failure after the commit is written changes nothing for the
step: survivors find the commit and step; the lost rank's replica stepped as well.

Both sides wait in short blocking store waits (TCPStore.wait) rather than polling, so a
step pays two store round trips, not a polling period.
"""

from __future__ import annotations

import collections
import threading
import time
from datetime import timedelta
from typing import Any

from phalanx.orchestrator.control_plane import ControlPlane

RUN = -1  # the generation number of run-global control-plane keys (current generation, hb)

__all__ = ["RUN", "CommitGate", "Committer", "GenerationChanged"]


class GenerationChanged(RuntimeError):
    """The controller started a new generation while this rank waited: abandon the step."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"generation {generation} started")
        self.generation = generation


def current_generation(run_cp: ControlPlane) -> int:
    cur = run_cp.get("current")
    return int(cur["generation"]) if cur else 0


class CommitGate:
    """Worker side: vote, then wait for the commit or a new generation."""

    def __init__(self, cp: ControlPlane, run_cp: ControlPlane, *, rank: int,
                 slice_s: float = 0.2) -> None:
        self.cp, self.run_cp, self.rank, self.slice_s = cp, run_cp, rank, slice_s
        self.wait_s = 0.0
        # {"step": k, "s": seconds}: this rank's busy time in step k (its wall time minus the
        # time blocked on peers), sent with the next vote for straggler detection.
        self.busy: dict[str, float] | None = None

    def __call__(self, step: int, *, finite: bool) -> None:
        t0 = time.perf_counter()
        vote: dict[str, Any] = {"finite": finite}
        if self.busy is not None:
            vote["busy"] = self.busy
        self.cp.set(f"vote/{step}/{self.rank}", vote)
        key = self.cp._full(f"commit/{step}")
        store = self.cp.store
        while True:
            try:
                store.wait([key], timedelta(seconds=self.slice_s))
                if self.cp.get(f"commit/{step}") is not None:
                    break
            except Exception:  # noqa: BLE001 - TCPStore.wait raises on its timeout
                pass
            gen = current_generation(self.run_cp)
            if gen > self.cp.generation:
                # One last look: a commit written before the failure still holds.
                if self.cp.get(f"commit/{step}") is not None:
                    break
                raise GenerationChanged(gen)
        self.wait_s += time.perf_counter() - t0


class Committer(threading.Thread):
    """Controller side, one per generation: commit each step once all members voted."""

    def __init__(self, cp: ControlPlane, *, ranks: list[int], first_step: int,
                 slice_s: float = 0.2) -> None:
        super().__init__(daemon=True, name=f"committer-g{cp.generation}")
        self.cp, self.ranks, self.step, self.slice_s = cp, ranks, first_step, slice_s
        self.first_step = first_step
        self.committed: int = first_step - 1  # last committed step
        self.nonfinite: list[int] = []
        # (step, {rank: busy seconds}) for steps every member reported (votes carry them).
        self.busy: collections.deque[tuple[int, dict[int, float]]] = collections.deque()
        self._halt = threading.Event()

    def run(self) -> None:
        store = self.cp.store
        while not self._halt.is_set():
            keys = [self.cp._full(f"vote/{self.step}/{r}") for r in self.ranks]
            try:
                store.wait(keys, timedelta(seconds=self.slice_s))
            except Exception:  # noqa: BLE001 - timeout: look at the stop flag, wait again
                continue
            votes: list[Any] = [self.cp.get(f"vote/{self.step}/{r}") for r in self.ranks]
            if any(v is None for v in votes):  # unsigned / forged vote: not a vote
                continue
            if not all(v["finite"] for v in votes):
                self.nonfinite.append(self.step)
            busy = [v.get("busy") for v in votes]
            if all(isinstance(b, dict) for b in busy) and len({b["step"] for b in busy}) == 1:
                self.busy.append((int(busy[0]["step"]),
                                  {r: float(b["s"]) for r, b in zip(self.ranks, busy, strict=True)}))
            self.cp.set(f"commit/{self.step}", {"t": time.time()})
            for r in self.ranks:
                self.cp.delete(f"vote/{self.step}/{r}")
            self.committed = self.step
            self.step += 1

    def stop(self) -> None:
        """Stop and join: a thread left inside a store wait at interpreter exit aborts it."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5 * self.slice_s + 1)
