"""The rank layout: which worker holds which piece of the model.

Rank order, outer to inner, is `dp_replicate, pp, dp_shard, tp` (DESIGN.md): tp
innermost so a tensor-parallel group stays inside a node, replicas outermost so
they are the groups that may sit across slow links.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

AXES = ("dp_replicate", "pp", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    pp: int = 1
    tp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for axis in (*AXES, "vpp"):
            if getattr(self, axis) < 1:
                raise ValueError(f"Layout.{axis}={getattr(self, axis)} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.pp * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_model(self, *, num_layers: int, num_heads: int, num_kv_heads: int,
                    n_microbatches: int, schedule: str) -> None:
        """Raise ValueError, naming the dims and the fix, when the model cannot be laid out."""
        chunks = self.pp * self.vpp
        if num_layers % chunks:
            raise ValueError(
                f"model.num_hidden_layers={num_layers} cannot be cut into pp*vpp = {self.pp}*{self.vpp}"
                f" = {chunks} equal stages; choose pp*vpp dividing {num_layers}.")
        for name, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if n % self.tp:
                raise ValueError(f"model.{name}={n} is not divisible by parallel.tp={self.tp}; "
                                 f"tensor parallelism splits whole heads: use a tp dividing {n}.")
        if self.vpp > 1 and n_microbatches % self.pp:
            raise ValueError(
                f"interleaving (parallel.vpp={self.vpp}) needs the number of micro-batches "
                f"({n_microbatches} = global_batch / (dp x micro_batch_size)) to be a multiple of "
                f"parallel.pp={self.pp}; change trainer.global_batch or parallel.micro_batch_size.")
        if self.pp > 1 and n_microbatches < self.pp:
            raise ValueError(
                f"{n_microbatches} micro-batches cannot fill a pipeline of parallel.pp={self.pp} "
                f"stages ({schedule}); use at least {self.pp} (raise trainer.global_batch or lower "
                "parallel.micro_batch_size).")

    def _sizes(self) -> list[int]:
        return [getattr(self, a) for a in AXES]

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        out: dict[str, int] = {}
        for axis, size in zip(reversed(AXES), reversed(self._sizes()), strict=True):
            out[axis] = rank % size
            rank //= size
        return {a: out[a] for a in AXES}

    def rank_of(self, **coords: int) -> int:
        rank = 0
        for axis, size in zip(AXES, self._sizes(), strict=True):
            c = coords.get(axis, 0)
            if not 0 <= c < size:
                raise ValueError(f"{axis}={c} outside 0..{size - 1}")
            rank = rank * size + c
        return rank

    def group_ranks(self, rank: int, axes: tuple[str, ...]) -> list[int]:
        """Ranks that share every coordinate of `rank` except those on `axes`."""
        base = self.coords(rank)
        ranks = [r for r in range(self.world_size)
                 if all(self.coords(r)[a] == base[a] for a in AXES if a not in axes)]
        return ranks

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(**d)

