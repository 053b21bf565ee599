"""The cost model: predicted step time of a candidate layout, with a breakdown.

Compute comes from a calibrated profile of the real workers (`calibration.py`)
or, for clusters we cannot run on, from FLOPs at an assumed fraction of peak.
Communication uses the alpha-beta model per link class. The pipeline's bubble
comes from closed forms for ranking and from the simulator (the same one that
checks schedules before they run) for the final ordering.

What the model assumes about our implementation (so it predicts what runs):
- the pipeline runtime waits for each P2P transfer on the critical path
  (2 transfers per micro-batch and chunk: activation forward, gradient back);
- TP collectives sit inside the block (no overlap): 2 all-reduces per block in
  forward and 2 in backward, or all-gather + reduce-scatter pairs with SP;
- DP/ZeRO reductions happen at REDUCE_GRAD after a stage's last backward and
  are not hidden (only DDP, for pp = tp = 1 without ZeRO, overlaps its bucket
  all-reduce with backward, and only where communication has its own engine:
  on a CPU core gloo's copies and reductions run on the core the backward runs on);
- a calibrated profile's own fits of the collectives the trainers issue
  (all_reduce, reduce_scatter_tensor, all_gather_into_tensor) price DP/ZeRO
  within a machine: gloo on CPU copies and reduces on the CPU, nothing like a
  bandwidth-optimal ring over the P2P link;
- with more ranks than cores, a pipeline rank waiting in its bubble hands its
  core to another, so the bubble costs only what the sharing cannot fill
  (bench planner measured this; scaling idle time by the oversubscription
  factor over-predicted deep pipelines);
- ZeRO-1/2 all-gather the updated parameters after the optimizer step,
  ZeRO-3 gathers each stage's parameters at UNSHARD; offload is not modelled.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from phalanx.models.llama import LlamaConfig, _layer_matmul_params, num_params
from phalanx.orchestrator.candidate import Candidate


# ---------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Link:
    alpha_s: float  # latency per message
    bandwidth_Bps: float  # bytes per second per device

    def time(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Hardware:
    devices_per_node: int
    nodes: int
    memory_per_device: float  # bytes a rank may use
    intra: Link
    inter: Link
    cores_per_node: int = 0  # CPU clusters: ranks beyond this share cores
    oversubscription: float = 1.0  # measured slowdown of compute when ranks share cores

    @property
    def world(self) -> int:
        return self.devices_per_node * self.nodes

    def link(self, group_span: int) -> Link:
        """A group of `group_span` consecutive ranks stays intra-node while it fits in one."""
        return self.intra if group_span <= self.devices_per_node else self.inter


class ComputeModel(Protocol):
    """Seconds for one micro-batch of `mbs` sequences (each method returns (forward, backward))."""

    def block(self, mbs: int, *, tp: int, sp: bool, recompute: str) -> tuple[float, float]: ...

    def embed(self, mbs: int, *, tp: int) -> tuple[float, float]: ...

    def head(self, mbs: int, *, tp: int) -> tuple[float, float]: ...

    def optimizer(self, numel: float, *, tensors: int, sharded: bool) -> float: ...

    def collective(self, op: str, nbytes: float, n: int) -> float | None:
        """Measured seconds of `op` over `n` ranks of one machine, or None (use the link)."""
        ...

    @property
    def comm_overlaps_compute(self) -> bool: ...


@dataclass(frozen=True)
class FlopCompute:
    """Compute from FLOPs at `mfu` of peak: for clusters not calibrated (GPU presets)."""

    config: LlamaConfig
    seq_len: int
    peak_flops: float
    mfu: float
    optimizer_Bps: float = 1.0e12  # memory-bound AdamW: ~16 bytes read+written per parameter

    def _rate(self) -> float:
        return self.peak_flops * self.mfu

    def block(self, mbs: int, *, tp: int, sp: bool, recompute: str) -> tuple[float, float]:
        c, s = self.config, self.seq_len
        tokens = mbs * s
        matmul = 2 * _layer_matmul_params(c) * tokens / tp
        attn = 4 * c.hidden_size * s * tokens / tp  # QK^T and AV, not halved for causality
        fwd = (matmul + attn) / self._rate()
        bwd = 2 * fwd
        if recompute == "full":
            bwd += fwd
        elif recompute == "selective":
            bwd += (attn + 2 * c.hidden_size * (c.hidden_size + 2 * c.num_key_value_heads
                                                * c.head_dim) * tokens / tp) / self._rate()
        return fwd, bwd

    def embed(self, mbs: int, *, tp: int) -> tuple[float, float]:
        return 0.0, 0.0

    def head(self, mbs: int, *, tp: int) -> tuple[float, float]:
        fwd = 2 * self.config.vocab_size * self.config.hidden_size * mbs * self.seq_len / tp
        return fwd / self._rate(), 2 * fwd / self._rate()

    def optimizer(self, numel: float, *, tensors: int, sharded: bool) -> float:
        return 16 * numel / self.optimizer_Bps

    def collective(self, op: str, nbytes: float, n: int) -> float | None:
        return None

    @property
    def comm_overlaps_compute(self) -> bool:
        return True  # GPUs: NCCL runs on its own stream and SMs


@dataclass(frozen=True)
class ProfileCompute:
    """Compute measured on this machine's workers by `phalanx calibrate` (block times with
    TP include TP's collectives, as the workers run them)."""

    profile: Any  # phalanx.orchestrator.calibration.Profile

    def block(self, mbs: int, *, tp: int, sp: bool, recompute: str) -> tuple[float, float]:
        p = self.profile
        return (p.compute_time("block", "fwd", mbs, recompute=recompute, tp=tp, sp=sp),
                p.compute_time("block", "bwd", mbs, recompute=recompute, tp=tp, sp=sp))

    def _part(self, part: str, mbs: int, tp: int) -> tuple[float, float]:
        p = self.profile
        tp = tp if f"tp{tp}" in p.compute.get(part, {}) else 1
        return (p.compute_time(part, "fwd", mbs, tp=tp), p.compute_time(part, "bwd", mbs, tp=tp))

    def embed(self, mbs: int, *, tp: int) -> tuple[float, float]:
        return self._part("embedding", mbs, tp)

    def head(self, mbs: int, *, tp: int) -> tuple[float, float]:
        return self._part("head", mbs, tp)

    def optimizer(self, numel: float, *, tensors: int, sharded: bool) -> float:
        # Without ZeRO AdamW walks the parameter list (per-tensor cost); ZeRO steps one flat
        # shard, whose cost is not linear in size (interpolate the measured points). Clipping
        # is measured the same two ways.
        opt = self.profile.optimizer
        if sharded:
            return opt["adamw_flat"].interp(numel) + opt["clip_flat"].interp(numel)
        return opt["adamw"].time(numel, tensors) + opt["clip"].time(numel, tensors)

    def collective(self, op: str, nbytes: float, n: int) -> float | None:
        """The fit is of a 2-rank group; other sizes scale its per-byte term by the ring
        factor (bytes each rank moves relative to n = 2) and its latency by the steps."""
        if n <= 1:
            return 0.0
        fit = self.profile.collectives.get("intra", {}).get(op)
        if fit is None:
            return None
        ring = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
        base = 1.0 if op == "all_reduce" else 0.5
        return fit.alpha_s * (n - 1) + nbytes / fit.beta_bytes_per_s * ring / base

    @property
    def comm_overlaps_compute(self) -> bool:
        # A CPU rank (gloo) has no separate engine to overlap with; NCCL on a GPU does.
        return self.profile.machine.get("device") == "cuda"


# ---------------------------------------------------------------------------- collectives
def all_reduce(link: Link, nbytes: float, n: int) -> float:
    """Ring all-reduce: 2(n-1) steps of nbytes/n."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * (link.alpha_s + nbytes / n / link.bandwidth_Bps)


def all_gather(link: Link, nbytes: float, n: int) -> float:
    """nbytes is the gathered (full) size; reduce-scatter costs the same."""
    if n <= 1:
        return 0.0
    return (n - 1) * (link.alpha_s + nbytes / n / link.bandwidth_Bps)


reduce_scatter = all_gather


# ---------------------------------------------------------------------------- pipeline
# Largest pp * vpp * micro-batches simulated; beyond it the closed form stands (deep pipelines
# on thousands of GPUs: the simulator is exact but O(actions x placements) in Python).
SIM_BUDGET = 1024


@functools.lru_cache(maxsize=4096)
def simulated_bubble(schedule: str, pp: int, vpp: int, m: int, f: float = 1.0,
                     b: float = 2.0) -> float:
    """Bubble fraction from the schedule simulator (memoised by schedule, p, v, m, F:B).

    The idle time of these schedules is fill and drain: it does not grow with m once the
    steady state is reached, so large m is simulated at a few rounds of pp micro-batches
    and the idle time carried over (the simulator is O(m·p) per candidate placement).
    """
    m_sim = min(m, 2 * pp) if m % pp == 0 else min(m, 2 * pp + m % pp)
    if pp * vpp * m_sim > SIM_BUDGET:
        return closed_form_bubble(schedule, pp, vpp, m)
    frac = _simulated_fraction(schedule, pp, vpp, m_sim, f, b)
    if m_sim == m:
        return frac
    work = m_sim * (f + b)  # per rank, per unit of chunk work
    idle = work * frac / (1 - frac)
    return idle / (idle + m * (f + b))


@functools.lru_cache(maxsize=4096)
def _simulated_fraction(schedule: str, pp: int, vpp: int, m: int, f: float, b: float) -> float:
    # Memoised apart from simulated_bubble: candidates whose m differ often simulate the same
    # m_sim (every m that is a multiple of pp from 2 pp up), and one simulation costs more
    # than everything else the planner does for a candidate.
    from phalanx.parallel.pipeline.lowering import lower_simulated
    from phalanx.parallel.pipeline.schedules import build_schedule

    sched = build_schedule(schedule, pp=pp, vpp=vpp, n_microbatches=m)
    costs = {"F": f, "B": b, "I": b / 2, "W": b / 2}
    return lower_simulated(sched, costs=costs)[1].bubble_fraction


def closed_form_bubble(schedule: str, pp: int, vpp: int, m: int) -> float:
    """Bubble fraction of the pipeline's makespan, F:B = 1:2 (closed forms, for ranking)."""
    if pp == 1:
        return 0.0
    if schedule == "interleaved_1f1b":
        fill = (pp - 1) / vpp
    elif schedule == "zb_h1":
        fill = (pp - 1) / 3  # Qi et al. 2023: ZB-H1 keeps about a third of 1F1B's bubble
    else:
        fill = pp - 1
    return fill / (m + fill)


# ---------------------------------------------------------------------------- step time
@dataclass(frozen=True)
class StepCost:
    compute: float  # the slowest pipeline rank's busy time
    bubble: float  # idle time of the pipeline
    pp_comm: float
    tp_comm: float
    dp_comm: float
    optimizer: float
    bubble_fraction: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.pp_comm + self.tp_comm + self.dp_comm + self.optimizer

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _stage_layers(config: LlamaConfig, n_stages: int) -> int:
    return config.num_hidden_layers // n_stages


def step_cost(config: LlamaConfig, cand: Candidate, *, seq_len: int, global_batch: int,
              hw: Hardware, compute: ComputeModel, act_bytes: int = 4, grad_bytes: int = 4,
              simulate_bubble: bool = False, tp_in_compute: bool = False) -> StepCost:
    """Predicted seconds per optimizer step. `tp_in_compute`: the compute model's block times
    were measured with TP and already include its collectives (calibrated profiles)."""
    c, p, v, t = config, cand.pp, cand.vpp, cand.tp
    m = cand.n_microbatches(global_batch)
    n_stages = p * v
    layers = _stage_layers(c, n_stages)
    bf, bb = compute.block(cand.micro_batch_size, tp=t, sp=cand.sp, recompute=cand.recompute)
    ef, eb = compute.embed(cand.micro_batch_size, tp=t)
    hf, hb = compute.head(cand.micro_batch_size, tp=t)
    # Per micro-batch work of each pipeline rank (its v chunks); embedding on rank 0, head on
    # the rank of the last stage (p - 1 with loop placement).
    per_rank = [v * layers * (bf + bb) for _ in range(p)]
    per_rank[0] += ef + eb
    per_rank[-1] += hf + hb
    slowest = max(per_rank)
    compute_time = m * slowest
    if simulate_bubble and p > 1:
        ratio = round(4 * bb / bf) / 4 if bf else 2.0  # quarter steps: the memo hits
        frac = simulated_bubble(cand.schedule, p, v, m, 1.0, max(ratio, 0.25))
    else:
        frac = closed_form_bubble(cand.schedule, p, v, m)
    bubble = compute_time * frac / (1 - frac) if frac < 1 else math.inf

    tp_link = hw.link(t)
    act = cand.micro_batch_size * seq_len * c.hidden_size * act_bytes
    tp_comm = 0.0
    if t > 1 and not tp_in_compute:
        per_block = 2 * (2 * all_gather(tp_link, act, t) if cand.sp else all_reduce(tp_link, act, t))
        tp_comm = m * v * layers * per_block * 2 * (1.5 if cand.recompute == "full" else 1.0)
    pp_comm = 0.0
    if p > 1:
        pp_link = hw.link(t * cand.dp_shard * p)  # a pipeline spans tp*dp_shard*pp ranks
        msg = act / t if cand.sp else act
        transfers = 2 * v * m + 2 * (p - 1)  # per micro-batch and chunk, plus fill and drain
        pp_comm = transfers * pp_link.time(msg)

    # Parameters (and gradient bytes) per rank: the slowest rank holds embedding or head too.
    stage_params = v * layers * _layer_params(c) / t + max(c.vocab_size * c.hidden_size / t, 0)
    grad_b = stage_params * grad_bytes
    shard_link = hw.link(t * cand.dp_shard)
    rep_link = hw.link(cand.world_size)
    n, r = cand.dp_shard, cand.dp_replicate

    def coll(op: str, link: Link, nbytes: float, size: int) -> float:
        measured = compute.collective(op, nbytes, size) if link is hw.intra else None
        if measured is not None:
            return measured
        return (all_reduce if op == "all_reduce" else all_gather)(link, nbytes, size)

    if cand.zero_stage == 0:
        dp = coll("all_reduce", rep_link, grad_b, cand.dp)
        if p == 1 and t == 1 and compute.comm_overlaps_compute:
            dp = max(0.0, dp - 0.5 * m * slowest)  # DDP overlaps buckets with backward
    elif cand.zero_stage == 1:
        dp = (coll("all_reduce", shard_link, grad_b, n)
              + coll("all_gather_into_tensor", shard_link, grad_b, n))
    else:  # 2 and 3 reduce-scatter; 1-2 gather after the step, 3 at UNSHARD: once a step
        dp = (coll("reduce_scatter_tensor", shard_link, grad_b, n)
              + coll("all_gather_into_tensor", shard_link, grad_b, n))
    if cand.zero_stage and r > 1:
        dp += coll("all_reduce", rep_link, grad_b / n, r)
    opt_numel = stage_params / (n if cand.zero_stage else 1)
    over = _oversubscription(hw, cand)
    # Oversubscribed: ranks sharing a core fill each other's bubbles; only the idle time the
    # sharing cannot fill remains (total pinned time stretched to the shared cores' time).
    shared_bubble = (max(0.0, compute_time + bubble - compute_time * over) if over > 1
                     else bubble)
    return StepCost(compute=compute_time * over, bubble=shared_bubble, pp_comm=pp_comm,
                    tp_comm=tp_comm, dp_comm=dp, optimizer=compute.optimizer(
                        opt_numel, tensors=9 * v * layers + 3, sharded=cand.zero_stage > 0) * over,
                    bubble_fraction=frac)


def _layer_params(c: LlamaConfig) -> float:
    return _layer_matmul_params(c) + 2 * c.hidden_size


def _oversubscription(hw: Hardware, cand: Candidate) -> float:
    per_node = min(cand.world_size, hw.devices_per_node)
    if not hw.cores_per_node or per_node <= hw.cores_per_node:
        return 1.0
    return hw.oversubscription * per_node / hw.cores_per_node


def tokens_per_s(cost: StepCost, *, global_batch: int, seq_len: int) -> float:
    return global_batch * seq_len / cost.total


def mfu(cost: StepCost, config: LlamaConfig, *, global_batch: int, seq_len: int,
        world: int, peak_flops: float) -> float:
    from phalanx.models.llama import flops_per_token

    return flops_per_token(config, seq_len) * global_batch * seq_len / cost.total / (
        world * peak_flops)


__all__ = ["ComputeModel", "FlopCompute", "Hardware", "Link", "StepCost", "all_gather",
           "all_reduce", "closed_form_bubble", "num_params", "simulated_bubble", "step_cost",
           "tokens_per_s"]
