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
from phalanx.parallel.flat import copy_back, flatten

__all__ = ["carry_over", "checkfree_sources", "survivor_state", "checkfree_transfer", "peer_transfer",
           "replica_source",
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
    # Per parameter group: a stage rebuilt by CheckFree keeps its scaled rate for good.
    sched = getattr(trainer, "scheduler", None)
    if sched is not None and hasattr(sched, "base_lrs"):
        out["_base_lrs"] = torch.tensor(sched.base_lrs, dtype=torch.float64)
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
    base = src.get("_base_lrs")
    sched = getattr(new, "scheduler", None)
    if base is not None and sched is not None and len(base) == len(sched.base_lrs):
        sched.base_lrs = [float(b) for b in base]
        for g, b in zip(new.optimizer.param_groups, sched.base_lrs, strict=True):
            g["initial_lr"] = b
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
        for flat, members in _flat_groups(tensors, fill=False):
            dist.recv(flat, src=sources[rank])
            copy_back(flat, members)
        restore_after_load(trainer, state)
    for lost, src in sorted(sources.items()):
        if src == rank:
            for flat, _ in _flat_groups(tensors, fill=True):
                dist.send(flat, dst=lost)


def _flat_groups(tensors: list[torch.Tensor], *, fill: bool
                 ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """`tensors` as one flat buffer per dtype (in first-seen order): hundreds of point-to-point
    messages cost more in per-message latency than one copy into a buffer does. `fill`: the
    buffer holds the tensors' values (sender), else it is empty (receiver)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, members in by_dtype.items():
        if fill:
            flat = flatten(members)
        else:
            flat = torch.empty(sum(t.numel() for t in members), dtype=dtype, device=members[0].device)
        yield flat, members


def checkfree_sources(layout: Any, lost: int, alive: set[int], *,
                      plus: bool = False) -> tuple[int, ...] | None:
    """The ranks that rebuild `lost`'s stage (one stage per rank: vpp=1), or None: its
    (previous, next) stage ranks for an intermediate stage (CheckFree's average); with
    `plus`, an end stage's swap partner (CheckFree+'s copy)."""
    from phalanx.checkpoint.checkfree import recovery_plan

    c = layout.coords(lost)
    if layout.vpp != 1:
        return None
    how = recovery_plan(c["pp"], layout.pp, plus=plus)
    if how.kind == "none":
        return None
    out = []
    for s in how.sources:
        want = {**c, "pp": s}
        r = next((r for r in range(layout.world_size) if layout.coords(r) == want), None)
        if r is None or r not in alive:
            return None
        out.append(r)
    return tuple(out)


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


def _end_tensors(trainer: Any) -> list[tuple[str, torch.Tensor]]:
    """This rank's embedding / final norm / head parameters (owned or CheckFree+ mirrors),
    by name: the same names on both stages of a swap pair."""
    from phalanx.checkpoint.checkfree import EMBED_KEYS, HEAD_KEYS

    ends = set(EMBED_KEYS) | set(HEAD_KEYS)
    return sorted(((n, p) for m in trainer.stages.values() for n, p in m.named_parameters()
                   if n in ends), key=lambda np_: np_[0])


def _end_state(trainer: Any, tensors: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Weights, AdamW moments and step of `tensors`: what an exact copy of them needs."""
    from phalanx.checkpoint.state import optimizer_state_init

    optimizer_state_init(trainer.optimizer)
    out = []
    for _, p in tensors:
        st = trainer.optimizer.state[p]
        out += [p.data, st["exp_avg"], st["exp_avg_sq"], st["step"]]
    return out


@torch.no_grad()
def checkfree_transfer(trainer: Any, *, rank: int, rebuild: dict[int, tuple[int, ...]],
                       step: int, base_lr: float, init: str = "neighbours"
                       ) -> dict[str, Any] | None:
    """Collective over the new generation: each lost stage is rebuilt from the ranks in
    `rebuild` -- two neighbours (CheckFree: their layers averaged by `reconstruct_stage`,
    weighted by their last stage gradient norms) or its swap partner (CheckFree+: layers
    copied by `copy_stage`) -- with a fresh optimizer at LR_SCALE x the learning rate for the
    layers. Under CheckFree+ the stage's embedding / head tensors are restored exactly
    (weights, moments, step) from the swap partner, which holds the same tensors as owner or
    mirror. `init="random"` re-initialises the layers with fresh random weights instead (the
    baseline CheckFree is measured against). Returns, on a rebuilt rank, what was used."""
    from phalanx.checkpoint.checkfree import (
        copy_stage,
        fresh_optimizer_,
        layer_ids_of,
        reconstruct_stage,
        swap_partner,
    )

    lay = trainer.layout
    plus = getattr(trainer, "plus", False)
    n = lay.pp
    mine = _layer_tensors(trainer)
    ends = _end_tensors(trainer) if plus else []
    used = None
    for lost, srcs in sorted(rebuild.items()):
        lost_stage = lay.coords(lost)["pp"]
        partner = swap_partner(lost_stage, n) if plus else None
        for src in srcs:
            is_partner = partner is not None and lay.coords(src)["pp"] == partner
            if rank == src:
                dist.send(torch.tensor([trainer.last_stage_grad_norm], dtype=torch.float64),
                          dst=lost)
                if init != "random":
                    for _, t in mine:
                        dist.send(t.detach().contiguous(), dst=lost)
                if is_partner:
                    for t in _end_state(trainer, ends):
                        dist.send(t.contiguous(), dst=lost)
        if rank != lost:
            continue
        got, norms = {}, {}
        end_bufs = _end_state(trainer, ends)
        for src in srcs:
            nb = torch.zeros(1, dtype=torch.float64)
            dist.recv(nb, src=src)
            norms[src] = float(nb)
            if init != "random":
                bufs = {name: torch.empty_like(t) for name, t in mine}
                for name, _ in mine:
                    dist.recv(bufs[name], src=src)
                got[src] = bufs
            if partner is not None and lay.coords(src)["pp"] == partner:
                for t in end_bufs:  # filled in place: weights, moments and step
                    dist.recv(t, src=src)
        ids = layer_ids_of(dict(mine))
        if init == "random":
            how, new = "random", _random_layers(trainer, ids, seed=step)
        elif len(srcs) == 2:
            how = "average"
            new = reconstruct_stage(got[srcs[0]], got[srcs[1]], norms[srcs[0]], norms[srcs[1]], ids)
        else:
            how, new = "copy", copy_stage(got[srcs[0]], ids)
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
        used = {"how": how, "sources": list(srcs), "norms": [norms[r] for r in srcs],
                "layers": ids, "digest": tensors_digest({n_: t for n_, t in mine}),
                "end_tensors": [name for name, _ in ends if partner is not None]}
        if len(srcs) == 2:  # names of the CheckFree event before CheckFree+ existed
            used.update(prev_rank=srcs[0], next_rank=srcs[1], prev_grad_norm=norms[srcs[0]],
                        next_grad_norm=norms[srcs[1]])
    return used


def _random_layers(trainer: Any, layer_ids: list[int], *, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random weights for `layer_ids` (the init a new model gets, from a seed no
    training run used), named as the stage's."""
    from phalanx.models import LlamaForCausalLM
    from phalanx.parallel.data_parallel import model_config

    m = LlamaForCausalLM(model_config(trainer.run), layer_ids=layer_ids, has_embedding=False,
                         has_head=False)
    m.init_weights(trainer.run.trainer.seed + 7919 * (seed + 1))
    return {k: v for k, v in m.state_dict().items() if k.startswith("model.layers.")}


def _pieces(state: dict[str, Any]) -> list[tuple[tuple[str, tuple[int, ...]], torch.Tensor]]:
    """A trainer_state's tensors as ((name, offsets), piece), in the order a snapshot's boxes
    sort: the same order on the rank that lost its state and on the buddy holding it."""
    from phalanx.checkpoint.snapshot import as_boxes

    return sorted((((name, off), t) for name, v in state.items()
                   for off, t in as_boxes(v).pieces.items()), key=lambda kv: kv[0])


@torch.no_grad()
def peer_transfer(trainer: Any, *, rank: int, step: int, sources: dict[int, int],
                  own: dict[str, Any] | None, peer_file: str | None) -> int:
    """Collective over the new generation: every rank rolls back to its snapshot of `step` in
    host memory -- a survivor from its own (`own`: the buffers keyed like trainer_state), a
    lost rank's replacement from the buddy that holds its copy (`sources`: lost -> holder,
    which reads `peer_file`, the copy its persister kept, and sends it point to point).
    Exact: the same tensors the lost rank had at that step, RNG included. Returns `step`."""
    state = trainer_state(trainer, step=step)
    mine = _pieces(state)
    if rank in sources:
        for _, t in mine:
            dist.recv(t, src=sources[rank])
    else:
        if own is None:
            raise RuntimeError(f"rank {rank}: no snapshot of step {step} in memory for the peer "
                               "recovery")
        for (name, off), t in mine:
            if name != "trainer/step":
                t.copy_(own[name].pieces[off])
    for lost, holder in sorted(sources.items()):
        if holder != rank:
            continue
        if peer_file is None:
            raise RuntimeError(f"rank {rank} holds no buddy copy to send to rank {lost}")
        copy = torch.load(peer_file, mmap=True, weights_only=True)
        if (copy["rank"], copy["step"]) != (lost, step):
            raise RuntimeError(f"rank {rank}'s buddy copy is rank {copy['rank']}'s step "
                               f"{copy['step']}, not rank {lost}'s step {step}")
        for _, t in sorted(copy["state"].items(), key=lambda kv: kv[0]):
            dist.send(t.contiguous(), dst=lost)
    state["trainer/step"].fill_(step)
    return restore_after_load(trainer, state)
