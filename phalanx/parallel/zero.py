"""ZeRO stages 1-3 for one pipeline stage's module, within its `dp_shard` group.

Why our own and not FSDP2 / ZeroRedundancyOptimizer: FSDP2 always reshards
parameters after backward, so it has no ZeRO-1/2 (full parameters at rest) and
its memory would not match the stage the user asked for; it also reduces
gradients inside backward, where our pipeline runtime reduces once per step at
the schedule's REDUCE_GRAD action and unshards at UNSHARD/RESHARD, exactly the
points torch.distributed.pipelining defines for FSDP. ZeroRedundancyOptimizer
covers stage 1 only and assigns whole tensors to ranks, so per-rank bytes are
uneven and not re-shardable by offset. Flat buffers (DeepSpeed's approach) give
all three stages, even shards, and a (name -> offsets) view for checkpoints.

Per parameter group (weight decay on / off) the stage's parameters live in one
flat fp32 buffer padded to a multiple of the shard group size N; rank r owns
the contiguous slice r. Model states per rank at a step boundary, fp32 + Adam:
  stage 1: params full, grads full, optimizer states 1/N     -> 8Ψ + 8Ψ/N
  stage 2: params full, grads 1/N, optimizer states 1/N      -> 4Ψ + 12Ψ/N
  stage 3: params 1/N (gathered at UNSHARD, freed at RESHARD), grads 1/N, states 1/N -> 16Ψ/N
With HSDP (dp_replicate > 1) the reduced shard gradient is then all-reduced
over the replicas of the same shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from phalanx.parallel import waits


@dataclass(frozen=True)
class ShardSlice:
    """Which part of a named parameter a rank's shard holds (for checkpoints, resharding)."""

    name: str
    shape: tuple[int, ...]
    start: int  # flat offset inside the parameter
    stop: int
    shard_offset: int  # where that part starts inside this rank's shard


class _FlatGroup:
    """One flat buffer of parameters sharing an optimizer setting."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], *, rank: int, size: int,
                 stage: int) -> None:
        self.named, self.rank, self.size, self.zero_stage = named, rank, size, stage
        # Recorded now: under stage 3 a parameter's own shape is (0,) between steps.
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numel = sum(p.numel() for _, p in named)
        self.shard_numel = math.ceil(self.numel / size) if self.numel else 0
        total = self.shard_numel * size
        p0 = named[0][1]
        full = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        off = 0
        for _, p in named:
            full[off:off + p.numel()].copy_(p.detach().reshape(-1))
            off += p.numel()
        lo = rank * self.shard_numel
        if stage == 3:
            # The shard is the only resident copy; the full buffer exists between UNSHARD
            # and RESHARD only.
            self.shard = nn.Parameter(full[lo:lo + self.shard_numel].clone())
            self.full: torch.Tensor | None = None
            for _, p in named:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        else:
            self.full = full
            # A view: the optimizer updates the full buffer's own slice in place, so the
            # shard costs no extra bytes.
            self.shard = nn.Parameter(full[lo:lo + self.shard_numel])
            self._bind(full)
        self.flat_grad: torch.Tensor | None = None

    def _views(self, flat: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        off = 0
        for (_, p), shape in zip(self.named, self.shapes, strict=True):
            n = math.prod(shape)
            yield p, flat[off:off + n].view(shape)
            off += n

    def _bind(self, full: torch.Tensor) -> None:
        for p, view in self._views(full):
            p.data = view

    def slices(self) -> list[ShardSlice]:
        lo, hi = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        out, off = [], 0
        for (name, _), shape in zip(self.named, self.shapes, strict=True):
            n = math.prod(shape)
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                out.append(ShardSlice(name=name, shape=shape, start=a - off, stop=b - off,
                                      shard_offset=a - lo))
            off += n
        return out

    # -- the step's phases, driven by the pipeline runtime's actions -----------------------
    def unshard(self, group: dist.ProcessGroup | None) -> None:
        full = torch.empty(self.shard_numel * self.size, dtype=self.shard.dtype,
                           device=self.shard.device)
        dist.all_gather_into_tensor(full, self.shard.detach(), group=group)
        self.full = full
        self._bind(full)

    def reshard(self) -> None:
        if self.zero_stage != 3 or self.full is None:
            return
        for _, p in self.named:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.full = None

    def prepare_grads(self) -> None:
        """Give every parameter a gradient that is a view of one flat buffer, so the
        reduction needs no copy and autograd accumulates micro-batches in place."""
        self.flat_grad = torch.zeros(self.shard_numel * self.size, dtype=self.shard.dtype,
                                     device=self.shard.device)
        for p, view in self._views(self.flat_grad):
            p.grad = view

    def reduce(self, shard_group: dist.ProcessGroup | None,
               replica_group: dist.ProcessGroup | None) -> None:
        assert self.flat_grad is not None, "prepare_grads() before backward"
        lo = self.rank * self.shard_numel
        # Issued asynchronously and waited on through `waits` (DESIGN.md: nothing blocks for
        # ever): a generation change ends the wait; the time counts as waiting on peers.
        if self.zero_stage == 1:
            if self.size > 1:
                waits.wait(dist.all_reduce(self.flat_grad, group=shard_group, async_op=True),
                           op="allreduce")
            grad = self.flat_grad[lo:lo + self.shard_numel]
        else:
            grad = torch.empty(self.shard_numel, dtype=self.flat_grad.dtype,
                               device=self.flat_grad.device)
            # A gradient reduction like stage 1's all-reduce (fault injection's `allreduce`).
            waits.wait(dist.reduce_scatter_tensor(grad, self.flat_grad, group=shard_group,
                                                  async_op=True), op="allreduce")
            for _, p in self.named:
                p.grad = None
            self.flat_grad = None
        if replica_group is not None:
            waits.wait(dist.all_reduce(grad, group=replica_group, async_op=True), op="allreduce")
        self.shard.grad = grad

    def gather_params(self, group: dist.ProcessGroup | None) -> None:
        """After the optimizer step: every rank's full parameters from the updated shards."""
        if self.zero_stage == 3 or self.size == 1:
            return
        assert self.full is not None
        waits.wait(dist.all_gather_into_tensor(self.full, self.shard.detach().clone(), group=group,
                                               async_op=True), op="allgather")


class ZeroStage:
    """ZeRO for one stage module: its parameters as flat shards, one group per weight decay."""

    def __init__(self, module: nn.Module, *, zero_stage: int, shard_group: dist.ProcessGroup | None,
                 replica_group: dist.ProcessGroup | None) -> None:
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage {zero_stage}: use 1, 2 or 3 (0 is plain data parallel)")
        self.zero_stage = zero_stage
        self.shard_group, self.replica_group = shard_group, replica_group
        rank, size = dist.get_rank(shard_group), dist.get_world_size(shard_group)
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            # Same split as build_adamw: matrices decay, norm gains do not.
            (decay if p.ndim >= 2 else no_decay).append((name, p))
        self.groups = [(_FlatGroup(g, rank=rank, size=size, stage=zero_stage), wd)
                       for g, wd in ((decay, True), (no_decay, False)) if g]
        self._training = False

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": [g.shard], "weight_decay": weight_decay if wd else 0.0}
                for g, wd in self.groups]

    def shard_params(self) -> Iterator[nn.Parameter]:
        for g, _ in self.groups:
            yield g.shard

    def begin_step(self) -> None:
        """Before a training step's first action (stages 1-2 have their parameters bound)."""
        self._training = True
        if self.zero_stage < 3:
            for g, _ in self.groups:
                g.prepare_grads()

    def unshard(self) -> None:
        for g, _ in self.groups:
            if self.zero_stage == 3 and g.full is None:
                g.unshard(self.shard_group)
                if self._training:
                    g.prepare_grads()

    def reshard(self) -> None:
        for g, _ in self.groups:
            g.reshard()

    def reduce_grads(self) -> None:
        for g, _ in self.groups:
            g.reduce(self.shard_group, self.replica_group)

    def end_step(self) -> None:
        """After the optimizer step: stages 1-2 gather the updated shards into full parameters."""
        self._training = False
        for g, _ in self.groups:
            g.gather_params(self.shard_group)

    def shard_slices(self) -> list[tuple[str, ShardSlice]]:
        """(group name, slice) for every piece of a named parameter this rank's shards hold:
        what a checkpoint saves, with the offsets it needs to load into another dp size."""
        return [(f"{'decay' if wd else 'no_decay'}", s) for g, wd in self.groups for s in g.slices()]
