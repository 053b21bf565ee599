"""Host-memory snapshots of a trainer's state, copied while the next step computes.

Parameters and optimizer state do not change between one optimizer step and
the next, so the copy into host buffers runs in a thread while the next
forward/backward runs, and the next optimizer step waits for it (an optimizer
pre-step hook). The time the training loop actually waits -- the copy that the
forward/backward did not hide, plus the few microseconds of starting it -- is
the snapshot's blocking time, recorded per snapshot.

Buffers are allocated once, in shared memory, as `Boxes` keyed like
`state.trainer_state` (DTensors become the boxes of their local shards), so the
background persister process reads them without a copy and without meshes.
On a GPU the copy would be a device-to-host copy on a side stream; here it is a
memcpy that releases the GIL.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from phalanx.checkpoint.boxes import Boxes

__all__ = ["HostSnapshot", "as_boxes", "state_bytes"]


def as_boxes(value: Any) -> Boxes:
    """A live state value (tensor, DTensor, Boxes) as the boxes this rank holds."""
    if isinstance(value, Boxes):
        return value
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = value.to_local()
        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                           value.placements)
        return Boxes(tuple(value.shape), local.dtype, {tuple(int(o) for o in offsets): local})
    return Boxes.whole(value)


def state_bytes(state: dict[str, Boxes]) -> int:
    return sum(t.numel() * t.element_size() for b in state.values() for t in b.pieces.values())


def _alloc_like(live: dict[str, Any]) -> dict[str, Boxes]:
    out = {}
    for name, value in live.items():
        b = as_boxes(value)
        out[name] = Boxes(b.shape, b.dtype, {
            off: torch.empty(t.shape, dtype=t.dtype, device="cpu").share_memory_()
            for off, t in b.pieces.items()})
    return out


class HostSnapshot:
    """`n_sets` reusable buffer sets; one asynchronous copy in flight at a time."""

    def __init__(self, live: dict[str, Any], *, n_sets: int = 2) -> None:
        self.sets = [_alloc_like(live) for _ in range(n_sets)]
        self.step: list[int | None] = [None] * n_sets  # step each set holds (None: none/partial)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blocking_s: list[float] = []
        self.copy_s: list[float] = []

    @property
    def nbytes(self) -> int:
        return state_bytes(self.sets[0])

    def start(self, live: dict[str, Any], *, step: int, target: int,
              on_done: Any = None) -> None:
        """Copy `live` into set `target` in a thread; `on_done(target, step)` runs in that
        thread when the copy is complete."""
        t0 = time.perf_counter()
        self.wait()
        pairs = []
        dst = self.sets[target]
        self.step[target] = None
        for name, value in live.items():
            src = as_boxes(value)
            for off, t in src.pieces.items():
                pairs.append((dst[name].pieces[off], t))
        self._thread = threading.Thread(target=self._copy, args=(pairs, target, step, on_done),
                                        name="phalanx-snapshot", daemon=True)
        self._thread.start()
        self.blocking_s.append(time.perf_counter() - t0)

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], target: int, step: int,
              on_done: Any) -> None:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for dst, src in pairs:
                    dst.copy_(src.detach())
            self.step[target] = step
            self.copy_s.append(time.perf_counter() - t0)
            if on_done is not None:
                on_done(target, step)
        except BaseException as e:  # noqa: BLE001 - reported to the training thread in wait()
            self._error = e

    def wait(self) -> None:
        """Block until the copy in flight is complete (the optimizer's pre-step hook)."""
        th = self._thread
        if th is None:
            return
        t0 = time.perf_counter()
        th.join()
        self._thread = None
        if self.blocking_s:
            self.blocking_s[-1] += time.perf_counter() - t0
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"snapshot copy failed: {err}") from err

    def latest(self) -> tuple[int | None, int | None]:
        """(set index, step) of the newest complete snapshot."""
        done = [(s, i) for i, s in enumerate(self.step) if s is not None]
        if not done:
            return None, None
        s, i = max(done)
        return i, s
