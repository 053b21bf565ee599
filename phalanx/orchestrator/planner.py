"""The planner: enumerate valid layouts, drop those over the memory budget, rank by step time.

Every constraint the recipe validator enforces is enforced here too (the same
`Layout.check_model`, plus the backend rules), so a plan always runs. Ranking
uses closed-form bubbles over all candidates, then re-ranks the best
`resimulate` with the pipeline simulator (memoised per schedule, p, v, m).
Fixed dimensions (any `parallel.*` key the user set) are honoured exactly.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from phalanx.models.llama import LlamaConfig
from phalanx.orchestrator.candidate import Candidate
from phalanx.orchestrator.cost import ComputeModel, Hardware, StepCost, step_cost
from phalanx.orchestrator.memory import Dtypes, MemoryBreakdown, peak_memory
from phalanx.parallel.mesh import Layout

RECOMPUTE = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Scored:
    cand: Candidate
    cost: StepCost
    memory: MemoryBreakdown
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.cand.to_dict(), "short": self.cand.short(),
                "step_s": self.cost.total, "tokens_per_s": self.tokens_per_s,
                "cost": self.cost.to_dict(), "memory": self.memory.to_dict()}


@dataclass
class PlanResult:
    top: list[Scored]
    considered: int
    valid: int
    fits: int
    seconds: float
    rejected_memory: list[Scored] = field(default_factory=list)  # the smallest that did not fit
    fixed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"top": [s.to_dict() for s in self.top], "considered": self.considered,
                "valid": self.valid, "fits": self.fits, "seconds": self.seconds,
                "fixed": self.fixed,
                "closest_over_budget": [s.to_dict() for s in self.rejected_memory]}


def layout_error(config: LlamaConfig, c: Candidate, *, global_batch: int, seq_len: int,
                 devices_per_node: int) -> str | None:
    """Why `c` cannot run (the validator's rules), or None."""
    if global_batch % (c.dp * c.micro_batch_size):
        return "global batch not divisible by dp x micro_batch_size"
    if c.tp > devices_per_node or devices_per_node % c.tp:
        return "tensor parallel must stay inside a node"
    if (c.dp_shard > 1) != (c.zero_stage > 0):
        return "dp_shard > 1 exactly when ZeRO shards"
    if c.zero_stage and c.tp > 1:
        return "ZeRO with tensor parallel is not available"
    if c.sp and (c.tp == 1 or seq_len % c.tp):
        return "sequence parallel needs tp > 1 dividing seq_len"
    if (c.vpp > 1) != (c.schedule == "interleaved_1f1b"):
        return "virtual stages exactly with the interleaved schedule"
    if c.pp == 1 and c.schedule != "1f1b":
        return "one schedule suffices without a pipeline"
    try:
        Layout(dp_replicate=c.dp_replicate, dp_shard=c.dp_shard, pp=c.pp, tp=c.tp,
               vpp=c.vpp).check_model(num_layers=config.num_hidden_layers,
                                      num_heads=config.num_attention_heads,
                                      num_kv_heads=config.num_key_value_heads,
                                      n_microbatches=c.n_microbatches(global_batch),
                                      schedule=c.schedule)
    except ValueError as e:
        return str(e)
    return None


def candidates(config: LlamaConfig, *, world: int, global_batch: int, seq_len: int,
               devices_per_node: int, fixed: Mapping[str, Any] | None = None,
               max_vpp: int = 4) -> Iterator[Candidate]:
    """Every layout of `world` ranks the validator accepts, honouring `fixed` keys
    (Candidate field names: tp, pp, vpp, dp_replicate, dp_shard, micro_batch_size,
    zero_stage, recompute, sp, schedule)."""
    fixed = dict(fixed or {})

    def choices(name: str, options: list[Any]) -> list[Any]:
        return [fixed[name]] if name in fixed else options

    for tp in choices("tp", [d for d in _divisors(devices_per_node) if d <= 8]):
        for pp in choices("pp", _divisors(config.num_hidden_layers)):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for vpp in choices("vpp", [v for v in _divisors(config.num_hidden_layers // pp)
                                       if v <= max_vpp] if pp > 1 else [1]):
                scheds = (["interleaved_1f1b"] if vpp > 1 else
                          ["1f1b", "zb_h1"] if pp > 1 else ["1f1b"])
                for schedule in choices("schedule", scheds):
                    for dp_shard in choices("dp_shard", _divisors(dp)):
                        if dp % dp_shard:
                            continue
                        zeros = [0] if dp_shard == 1 else [1, 2, 3]
                        for zero in choices("zero_stage", zeros):
                            if zero and tp > 1:
                                continue  # layout_error refuses it: skip its mbs x recompute
                            per = global_batch // dp if global_batch % dp == 0 else 0
                            for mbs in choices("micro_batch_size",
                                               [d for d in _divisors(per) if d <= 64] if per else []):
                                for rc in choices("recompute", list(RECOMPUTE)):
                                    # SP is never worse for memory and costs the same bytes.
                                    for sp in choices("sp", [tp > 1]):
                                        c = Candidate(dp_replicate=dp // dp_shard,
                                                      dp_shard=dp_shard, tp=tp, pp=pp, vpp=vpp,
                                                      micro_batch_size=mbs, zero_stage=zero,
                                                      recompute=rc, sp=sp, schedule=schedule)
                                        if c.dp_replicate * dp_shard != dp or c.world_size != world:
                                            continue
                                        if layout_error(config, c, global_batch=global_batch,
                                                        seq_len=seq_len,
                                                        devices_per_node=devices_per_node) is None:
                                            yield c


def plan(config: LlamaConfig, *, hw: Hardware, compute: ComputeModel, global_batch: int,
         seq_len: int, dtypes: Dtypes, fixed: Mapping[str, Any] | None = None, top_k: int = 10,
         resimulate: int = 20, tp_in_compute: bool = False, backend: str = "gloo") -> PlanResult:
    """`backend`: gloo stages collectives through full copies (CPU), NCCL does not (GPU)."""
    t0 = time.perf_counter()
    fits: list[Scored] = []
    over: list[Scored] = []
    n = 0
    with _gc_paused():
        for c in candidates(config, world=hw.world, global_batch=global_batch, seq_len=seq_len,
                            devices_per_node=hw.devices_per_node, fixed=fixed):
            n += 1
            mem = peak_memory(config, c, seq_len=seq_len, global_batch=global_batch,
                              dtypes=dtypes, backend=backend)
            cost = step_cost(config, c, seq_len=seq_len, global_batch=global_batch, hw=hw,
                             compute=compute, act_bytes=dtypes.activation,
                             tp_in_compute=tp_in_compute)
            s = Scored(c, cost, mem, global_batch * seq_len / cost.total)
            (fits if mem.total <= hw.memory_per_device else over).append(s)
        fits.sort(key=lambda s: s.cost.total)
        head = []
        for s in fits[:resimulate]:
            cost = step_cost(config, s.cand, seq_len=seq_len, global_batch=global_batch, hw=hw,
                             compute=compute, act_bytes=dtypes.activation, simulate_bubble=True,
                             tp_in_compute=tp_in_compute)
            head.append(Scored(s.cand, cost, s.memory, global_batch * seq_len / cost.total))
    head.sort(key=lambda s: s.cost.total)
    over.sort(key=lambda s: s.memory.total)
    return PlanResult(top=(head + fits[resimulate:])[:top_k], considered=n, valid=n,
                      fits=len(fits), seconds=time.perf_counter() - t0,
                      rejected_memory=over[:3], fixed=dict(fixed or {}))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector. Planning allocates hundreds of thousands of small
    objects that reference counting frees; they trigger full collections, and with torch
    imported each walks its whole object graph (~0.1 s each): a fifth of a big plan."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
