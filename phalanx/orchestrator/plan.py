"""A plan: what the controller publishes for one generation, as data.

Workers build everything from the plan and the recipe; tests golden it; later
issues add pipeline schedules and recovery sources to it (new keys only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from phalanx.config import RunConfig
from phalanx.parallel.mesh import Layout
from phalanx.parallel.pipeline.schedules import build_schedule


@dataclass(frozen=True)
class Member:
    rank: int
    node: int
    local_rank: int


@dataclass(frozen=True)
class Plan:
    generation: int
    layout: Layout
    members: tuple[Member, ...]
    backend: str
    global_batch: int
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    threads_per_worker: int
    # The token file every worker reads; the controller builds it once before launch.
    corpus: dict[str, Any] = field(default_factory=dict)
    # The pipeline schedule (Schedule.to_dict: per-rank action lists and per-micro-batch
    # routes) when the layout runs the pipeline runtime (pp, tp or ZeRO); None for DDP.
    schedule: dict[str, Any] | None = None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Plan:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["layout"] = Layout.from_dict(d["layout"])
        d["members"] = tuple(Member(**m) for m in d["members"])
        return cls(**d)


def plan_single_node(run: RunConfig, *, generation: int, backend: str, cores: int,
                     corpus: dict[str, Any]) -> Plan:
    """The generation's plan for a validated recipe on one node."""
    p = run.parallel
    assert p.dp_replicate is not None, "validate() fills dp_replicate"
    layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, vpp=p.vpp)
    n = run.cluster.devices_per_node
    threads = run.cluster.threads_per_worker or max(1, cores // n)
    schedule = None
    # DeepSpeed's ZeRO (pp=1, tp=1) runs its own engine, not the pipeline runtime.
    if p.pp > 1 or p.tp > 1 or (p.zero.stage > 0 and p.zero.backend == "torch"):
        schedule = build_schedule(p.schedule, pp=p.pp, vpp=p.vpp,
                                  n_microbatches=run.grad_accum).to_dict()
    return Plan(
        generation=generation,
        layout=layout,
        members=tuple(Member(rank=r, node=0, local_rank=r) for r in range(layout.world_size)),
        backend=backend,
        global_batch=run.trainer.global_batch,
        micro_batch_size=p.micro_batch_size,
        grad_accum=run.grad_accum,
        seq_len=run.trainer.seq_len,
        threads_per_worker=threads,
        corpus=corpus,
        schedule=schedule,
    )
