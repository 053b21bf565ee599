"""Moving live state into a rebuilt trainer after a change of generation.

A survivor rebuilds its trainer on the new generation's process groups and copies its own
state across (`carry_over`: memory to memory, same layout). A replacement worker receives
its state from a surviving data-parallel replica of the same shard (`replica_transfer`):
identical coordinates except `dp_replicate`, hence the identical set of tensors in the
identical order, sent point to point -- exact, no rollback (DESIGN.md invariant 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from phalanx.checkpoint.boxes import Boxes
from phalanx.checkpoint.state import restore_after_load, trainer_state

__all__ = ["carry_over", "replica_source", "replica_transfer", "state_digest"]


def state_digest(trainer: Any, *, step: int) -> str:
    """SHA-256 of this rank's parameters and optimizer state (not RNG): equal digests across
    data-parallel replicas are invariant 2, and equal to a failure-free run's, exactness."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(_tensors(trainer_state(trainer, step=step, with_rng=False)),
                          key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _tensors(state: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, v in state.items():
        if isinstance(v, Boxes):
            for off, t in v.pieces.items():
                yield f"{name}@{off}", t
        elif isinstance(v, DTensor):
            yield name, v.to_local()
        else:
            yield name, v


@torch.no_grad()
def carry_over(old: Any, new: Any, *, step: int) -> int:
    """Copy a survivor's state from its old trainer into the rebuilt one (same layout)."""
    src = dict(_tensors(trainer_state(old, step=step)))
    dst_state = trainer_state(new, step=step)
    for name, t in _tensors(dst_state):
        t.copy_(src[name])
    return restore_after_load(new, dst_state)


def replica_source(layout: Any, lost: int, alive: set[int]) -> int | None:
    """A live rank holding the same shard as `lost` (same coordinates but dp_replicate)."""
    want = {k: v for k, v in layout.coords(lost).items() if k != "dp_replicate"}
    for r in range(layout.world_size):
        if r != lost and r in alive and \
                {k: v for k, v in layout.coords(r).items() if k != "dp_replicate"} == want:
            return r
    return None


@torch.no_grad()
def replica_transfer(trainer: Any, *, rank: int, sources: dict[int, int], step: int) -> None:
    """Collective over the new generation: every `lost -> source` pair sends the source's
    whole state (parameters, optimizer moments and step) to the replacement."""
    state = trainer_state(trainer, step=step, with_rng=False)
    tensors = [t for _, t in _tensors(state)]
    if rank in sources:
        for t in tensors:
            dist.recv(t, src=sources[rank])
        restore_after_load(trainer, state)
    for lost, src in sorted(sources.items()):
        if src == rank:
            for t in tensors:
                dist.send(t.contiguous(), dst=lost)
