"""One step of a pipeline schedule, in torch.distributed.pipelining's action format.

The string form is torch's exactly (`2F0`, `1SEND_F0`, `1REDUCE_GRAD`), so a
schedule written here loads in torch's `_PipelineScheduleRuntime` and the other
way round, and golden files stay readable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

COMPUTE_KINDS = ("F", "B", "I", "W")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
ZERO_KINDS = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
KINDS = COMPUTE_KINDS + COMM_KINDS + ZERO_KINDS

# Longest alternatives first so `SEND_F` is not read as stage + `S`...; fullmatch rejects junk
# that torch's `re.match` would silently truncate.
_ACTION_RE = re.compile(
    r"(\d+)(" + "|".join(sorted(KINDS, key=len, reverse=True)) + r")(\d*)"
)


@dataclass(frozen=True)
class Action:
    stage: int
    kind: str
    mb: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.stage < 0:
            raise ValueError(f"action {self.kind}: stage {self.stage} must be >= 0")
        if self.kind in ZERO_KINDS:
            if self.mb is not None:
                raise ValueError(f"{self.kind} acts on a whole stage and takes no micro-batch")
        elif self.mb is None or self.mb < 0:
            raise ValueError(f"{self.kind} needs a micro-batch index >= 0, got {self.mb}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{'' if self.mb is None else self.mb}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"invalid action string {text!r}: expected [stage][kind][micro-batch], e.g. 2F0")
        stage, kind, mb = m.groups()
        return cls(int(stage), kind, int(mb) if mb else None)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    @property
    def is_backward(self) -> bool:
        """B or I: the actions that produce the gradient of the stage's input."""
        return self.kind in ("B", "I")

    def to_torch(self) -> Any:
        from torch.distributed.pipelining.schedules import _Action, _ComputationType

        return _Action(self.stage, _ComputationType(self.kind), self.mb)

    @classmethod
    def from_torch(cls, action: Any) -> Action:
        if getattr(action, "sub_actions", None) is not None:
            # OVERLAP_F_B bundles several actions; our runtime has no fused F+B kernel.
            raise ValueError(f"torch action {action!r} has sub-actions (OVERLAP_F_B); not supported")
        return cls(action.stage_index, action.computation_type.value, action.microbatch_index)
