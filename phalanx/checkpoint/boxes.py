"""Pieces of global tensors as n-D boxes, and the DCP planners that save and load them.

DCP describes a tensor on disk as chunks (boxes: offsets + sizes) of its global
shape and reshards on load by intersecting the boxes a rank wants with the
boxes that were saved. Our ZeRO keeps each rank's share as a flat 1-D range
across a group of parameters, which is not a box of any one parameter; but a
contiguous flat range of a row-major tensor is a union of at most a few boxes
(`flat_range_boxes`). Saving those boxes under the parameters' own names and
shapes keeps the checkpoint a plain DCP checkpoint (any DCP tool reads it, at
any layout), and lets a load onto another ZeRO split, dp size or pipeline cut
ask for exactly the boxes it needs.

Plain tensors (replicated, deduplicated by DCP's planner) and DTensors (TP)
take DCP's own path; only `Boxes` needs the two small planners below, because
DCP finds a rank's pieces by isinstance checks on tensor types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_read_items,
    _create_write_items,
    create_read_items_for_chunk_list,
)

__all__ = ["BoxLoadPlanner", "BoxSavePlanner", "Boxes", "flat_range_boxes"]


def flat_range_boxes(shape: Sequence[int], lo: int, hi: int
                     ) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The flat row-major range [lo, hi) of a tensor of `shape` as boxes:
    [(offsets, sizes, flat start)], in flat order. Each box is contiguous in flat
    order (its sizes are 1,...,1,k,full,...,full), so its data is flat[a:a+numel].view(sizes)."""
    shape = tuple(int(d) for d in shape)
    if lo >= hi:
        return []
    if not shape:
        return [((), (), 0)]
    if len(shape) == 1:
        return [((lo,), (hi - lo,), lo)]
    inner = math.prod(shape[1:])
    out: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def row(r: int, a: int, b: int) -> None:
        for off, size, start in flat_range_boxes(shape[1:], a, b):
            out.append(((r, *off), (1, *size), r * inner + start))

    r0, r_last = lo // inner, (hi - 1) // inner
    if r0 == r_last:
        if lo % inner == 0 and hi - lo == inner:
            return [((r0,) + (0,) * (len(shape) - 1), (1, *shape[1:]), lo)]
        row(r0, lo - r0 * inner, hi - r0 * inner)
        return out
    first_full = r0
    if lo % inner:
        row(r0, lo % inner, inner)
        first_full = r0 + 1
    end_full = hi // inner
    if end_full > first_full:
        out.append(((first_full,) + (0,) * (len(shape) - 1),
                    (end_full - first_full, *shape[1:]), first_full * inner))
    if hi % inner:
        row(end_full, 0, hi % inner)
    return out


@dataclass
class Boxes:
    """This rank's pieces (boxes) of one global tensor: what it saves, or where a load goes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # offsets -> data

    @classmethod
    def from_flat(cls, shape: Sequence[int], flat: torch.Tensor, lo: int) -> Boxes:
        """`flat` holds elements [lo, lo + len(flat)) of the tensor (views, not copies)."""
        b = cls(tuple(shape), flat.dtype)
        for off, size, start in flat_range_boxes(shape, lo, lo + flat.numel()):
            b.pieces[off] = flat[start - lo:start - lo + math.prod(size)].view(size)
        return b

    @classmethod
    def whole(cls, t: torch.Tensor) -> Boxes:
        return cls(tuple(t.shape), t.dtype, {(0,) * t.dim(): t})

    def piece(self, offsets: Sequence[int]) -> torch.Tensor:
        return self.pieces[tuple(int(o) for o in offsets)]

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.size())
                for o, t in self.pieces.items()]


class BoxSavePlanner(DefaultSavePlanner):
    """DCP's planner, plus `Boxes` values written as shards of their global tensor.
    The state dict is flat (string keys): no flattening, so keys are the names on disk."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        for fqn, obj in self.state_dict.items():
            if not isinstance(obj, Boxes):
                items += _create_write_items(fqn, obj)
                continue
            for off, t in obj.pieces.items():
                offsets = torch.Size(off)
                items.append(WriteItem(
                    index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=t.size()),
                        properties=TensorProperties.create_from_tensor(t),
                        size=torch.Size(obj.shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):  # noqa: ANN201 - DCP's signature
        obj = self.state_dict[write_item.index.fqn]
        if isinstance(obj, Boxes):
            return obj.piece(write_item.index.offset)
        return super().resolve_data(write_item)


class BoxLoadPlanner(DefaultLoadPlanner):
    """Reads into `Boxes` (and plain tensors / DTensors) in place; every key must exist."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:  # noqa: ANN001
        self.state_dict, self.original_state_dict = state_dict, state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        saved = self.metadata.state_dict_metadata
        missing = sorted(k for k in self.state_dict if k not in saved)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        reads = []
        for fqn, obj in self.state_dict.items():
            if isinstance(obj, Boxes):
                md = saved[fqn]
                if tuple(md.size) != obj.shape:
                    raise ValueError(f"{fqn}: checkpoint shape {tuple(md.size)} != {obj.shape}")
                reads += create_read_items_for_chunk_list(fqn, md, obj.chunks())
            else:
                reads += _create_read_items(fqn, saved[fqn], obj)
        self.plan = LoadPlan(reads)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, Boxes):
            return obj.piece(index.offset)
        return super().lookup_tensor(index)
