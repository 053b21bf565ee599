"""A candidate layout: every knob the planner turns, as one frozen value.

The memory model, the cost model and the search all speak in candidates; a
candidate becomes recipe overrides (`overrides()`) so the chosen layout runs
through the same validation as a hand-written one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    vpp: int
    micro_batch_size: int
    zero_stage: int
    recompute: str  # none | selective | full
    sp: bool
    schedule: str  # gpipe | 1f1b | interleaved_1f1b | zb_h1
    offload: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def n_microbatches(self, global_batch: int) -> int:
        """Micro-batches per pipeline per step (the gradient accumulation count)."""
        return global_batch // (self.dp * self.micro_batch_size)

    def overrides(self) -> list[str]:
        """Recipe overrides that select exactly this layout."""
        return [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
                f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}",
                f"parallel.micro_batch_size={self.micro_batch_size}",
                f"parallel.zero.stage={self.zero_stage}", f"parallel.recompute={self.recompute}",
                f"parallel.sp={str(self.sp).lower()}", f"parallel.schedule={self.schedule}",
                f"parallel.zero.offload={str(self.offload).lower()}"]

    def short(self) -> str:
        return (f"dp={self.dp_replicate}x{self.dp_shard} tp={self.tp} pp={self.pp} vpp={self.vpp} "
                f"mbs={self.micro_batch_size} zero={self.zero_stage} rc={self.recompute}"
                f"{' sp' if self.sp else ''} {self.schedule}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
