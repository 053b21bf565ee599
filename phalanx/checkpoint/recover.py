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

__all__ = ["carry_over", "checkfree_sources", "survivor_state", "checkfree_transfer", "replica_source",
           "replica_transfer", "state_digest", "tensors_digest"]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


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


def survivor_state(trainer: Any, *, step: int) -> dict[str, torch.Tensor]:
    """A survivor's state as plain local tensors (views of its live parameters and moments):
    nothing in it refers to the old trainer or its process groups, so those can be dropped at
    once -- which closes the old group's connections and releases peers still blocked on a
    receive from this rank."""
    out = dict(_tensors(trainer_state(trainer, step=step)))
    # Not state a checkpoint keeps, but what CheckFree weighs this stage by if a neighbour
    # must be rebuilt in the next generation.
    out["_last_stage_grad_norm"] = torch.tensor(getattr(trainer, "last_stage_grad_norm", 0.0))
    return out


@torch.no_grad()
def carry_over(old: Any, new: Any, *, step: int) -> int:
    """Copy a survivor's state (`survivor_state`, or its old trainer) into the rebuilt
    trainer (same layout)."""
    src = old if isinstance(old, dict) else survivor_state(old, step=step)
    dst_state = trainer_state(new, step=step)
    for name, t in _tensors(dst_state):
        if name != "trainer/step":  # the step is the controller's (the committed count)
            t.copy_(src[name])
    if "_last_stage_grad_norm" in src:
        new.last_stage_grad_norm = float(src["_last_stage_grad_norm"])
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


def checkfree_sources(layout: Any, lost: int, alive: set[int]) -> tuple[int, int] | None:
    """(previous-stage rank, next-stage rank) that can rebuild `lost`'s intermediate stage by
    CheckFree (one stage per rank: vpp=1), or None."""
    c = layout.coords(lost)
    if layout.vpp != 1 or not 0 < c["pp"] < layout.pp - 1:
        return None
    out = []
    for s in (c["pp"] - 1, c["pp"] + 1):
        want = {**c, "pp": s}
        r = next((r for r in range(layout.world_size) if layout.coords(r) == want), None)
        if r is None or r not in alive:
            return None
        out.append(r)
    return out[0], out[1]


def _layer_tensors(trainer: Any) -> list[tuple[str, torch.Tensor]]:
    """This rank's transformer-layer parameters ordered by position in the stage, then name:
    the same order on every stage (stages differ in global layer ids only)."""
    from phalanx.checkpoint.checkfree import _LAYER

    named = [(n, p) for m in trainer.stages.values() for n, p in m.named_parameters()
             if _LAYER.match(n)]
    ids = sorted({int(_LAYER.match(n).group(1)) for n, _ in named})
    pos = {i: k for k, i in enumerate(ids)}
    return sorted(named, key=lambda np_: (pos[int(_LAYER.match(np_[0]).group(1))],
                                          _LAYER.match(np_[0]).group(2)))


@torch.no_grad()
def checkfree_transfer(trainer: Any, *, rank: int, rebuild: dict[int, tuple[int, int]],
                       step: int, base_lr: float) -> dict[str, float] | None:
    """Collective over the new generation: each lost intermediate stage is rebuilt from its two
    neighbours (their layer weights and last stage gradient norms, sent point to point) by
    `checkfree.reconstruct_stage`, with a fresh optimizer at LR_SCALE x the learning rate.
    Returns, on a rebuilt rank, the neighbour norms used (for the event log)."""
    from phalanx.checkpoint.checkfree import fresh_optimizer_, reconstruct_stage

    mine = _layer_tensors(trainer)
    used = None
    for lost, (prev, nxt) in sorted(rebuild.items()):
        if rank in (prev, nxt):
            dist.send(torch.tensor([trainer.last_stage_grad_norm], dtype=torch.float64), dst=lost)
            for _, t in mine:
                dist.send(t.detach().contiguous(), dst=lost)
        if rank != lost:
            continue
        got, norms = {}, {}
        for src in (prev, nxt):
            n = torch.zeros(1, dtype=torch.float64)
            dist.recv(n, src=src)
            bufs = {name: torch.empty_like(t) for name, t in mine}
            for name, _ in mine:
                dist.recv(bufs[name], src=src)
            got[src], norms[src] = bufs, float(n)
        from phalanx.checkpoint.checkfree import layer_ids_of

        ids = layer_ids_of(dict(mine))
        new = reconstruct_stage(got[prev], got[nxt], norms[prev], norms[nxt], ids)
        for name, t in mine:
            t.copy_(new[name])
        fresh_optimizer_(trainer.optimizer, [t for _, t in mine], base_lr=base_lr,
                         scheduler=trainer.scheduler)
        sched = trainer.scheduler
        sched.last_epoch = step - 1
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
        used = {"prev_rank": prev, "next_rank": nxt, "prev_grad_norm": norms[prev],
                "next_grad_norm": norms[nxt], "layers": ids,
                "digest": tensors_digest({n: t for n, t in mine})}
    return used
