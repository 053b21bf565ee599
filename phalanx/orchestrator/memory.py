"""Memory model: bytes per rank, per category, for a candidate layout (planner input).

Everything here is arithmetic on the model config and a `Candidate`; no tensor is built.
The formulas describe *our* implementation -- `phalanx.models.llama` run by
`phalanx.parallel` (ZeRO in `zero.py`, the pipeline runtime, DTensor TP/SP, recompute
by `torch.utils.checkpoint`) -- not a generic GPT, and tests/test_memory_model.py checks
them against what autograd really saves, the pipeline simulator, and DeepSpeed's own
estimator.

Categories (per rank, device memory unless "host"):

- **params / grads / optimizer** (`model_state_bytes`): the model states at a step
  boundary. fp32 + Adam, our ZeRO within `dp_shard` = N:
  stage 0: 16Ψ, stage 1: 8Ψ + 8Ψ/N, stage 2: 4Ψ + 12Ψ/N, stage 3: 16Ψ/N
  (no fp32 master: the fp32 parameters are the master). With bf16 parameters and an fp32
  master (the ZeRO paper's mixed precision) the same code gives 16Ψ, 4Ψ + 12Ψ/N,
  2Ψ + 14Ψ/N, 16Ψ/N. Ψ is what the rank holds: its `vpp` stages, each `stage_numel`.
- **activations**: the step's peak above the model states while forward and backward
  run: what autograd and our pipeline runtime keep between a forward and its backward
  (per layer `activation_bytes_per_layer`, per stage the embedding / head / loss extras,
  times the micro-batches in flight: `inflight_microbatches`, which `memory_per_rank`
  gets by walking the rank's action list, as the simulator's `peak_inflight` does), plus
  the runtime's held tensors and the working set of the forward / backward running at
  that moment (see `memory_per_rank`).
- **buffers**: communication / temporary buffers alive *during* forward/backward, i.e.
  on top of the activation peak (ZeRO-2's full flat gradient, ZeRO-3's gathered
  parameters and full flat gradient, DDP's accumulation copy).
- **step_buffers**: temporaries of the end of the step, when activations are gone (the
  data-parallel all-reduce's flat copy of the gradients, ZeRO's gathers and reductions,
  optimizer / clipping temporaries); the peak takes the larger of the two phases.
- **host**: bytes offloaded to host memory (ZeRO-Offload).

`MemoryBreakdown.total` = params + grads + optimizer + max(activations + buffers,
step_buffers): the peak of one training step on that rank.

Checked against real steps (fp32 and bf16 autocast on CPU, gloo): the allocator's peak
over one training step (torch profiler memory events, every rank of 1-4 rank worlds: DDP,
ZeRO 1-3, pp 2 with gpipe / 1f1b / zb_h1 / interleaved, tp 2 with and without SP,
recompute none / selective / full) lands within 5% of `total - model_states` in nearly
every case, and the model states match to the byte. tests/test_memory_model.py runs a
fast version of that check on torch's fake process group.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from phalanx.models.llama import LlamaConfig
from phalanx.orchestrator.candidate import Candidate

__all__ = [
    "Dtypes",
    "MemoryBreakdown",
    "activation_bytes_per_layer",
    "deepspeed_estimate",
    "embedding_activation_bytes",
    "head_activation_bytes",
    "inflight_microbatches",
    "memory_per_rank",
    "model_state_bytes",
    "peak_memory",
    "stage_numel",
]

_BYTES = {"fp32": 4, "bf16": 2}
_RECOMPUTE = ("none", "selective", "full")
_INDEX = 8  # int64 token ids / targets
# DeepSpeed's default reduce_bucket_size (elements): its gradient bucket under offload.
_DS_BUCKET = 500_000_000


# ------------------------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of each kind of state.

    param: the parameters as the model holds them. grad: their gradients (same dtype).
    master: an fp32 master copy per parameter (0 when the parameters are fp32: they are
    the master). grad_master: an extra fp32 gradient copy per parameter (DeepSpeed keeps
    one per partition; 0 for us). optimizer: optimizer state per parameter (Adam m + v in
    fp32: 8). activation: the compute dtype's element. stream: the residual stream's
    element -- the parameter dtype under autocast (hidden states, norms and the pipeline's
    P2P buffers stay fp32 when only the compute is bf16).
    """

    param: int = 4
    grad: int = 4
    master: int = 0
    grad_master: int = 0
    optimizer: int = 8
    activation: int = 4
    stream: int = 4

    @property
    def autocast(self) -> bool:
        """Compute narrower than the weights: torch.autocast casts inputs and weights."""
        return self.activation < self.param

    @classmethod
    def from_precision(cls, param: str, compute: str) -> Dtypes:
        """The recipe's `precision.param` / `precision.compute` (fp32 | bf16), with AdamW."""
        for key, value in (("param", param), ("compute", compute)):
            if value not in _BYTES:
                raise ValueError(f"precision.{key}={value!r}: choose one of {', '.join(_BYTES)}")
        p, c = _BYTES[param], _BYTES[compute]
        if c > p:
            raise ValueError(f"precision.compute={compute} is wider than precision.param={param}: "
                             "compute in the parameter dtype or narrower (autocast)")
        return cls(param=p, grad=p, master=0 if p == 4 else 4, grad_master=0, optimizer=8,
                   activation=c, stream=p)

    @classmethod
    def deepspeed(cls) -> Dtypes:
        """DeepSpeed's estimator's assumptions (`estimate_zero{2,3}_model_states_mem_needs`):
        16-bit parameters and gradients, an fp32 master, an fp32 gradient partition and
        Adam's fp32 m and v: 2 + 2 + 4 + 4 + 8 = 20 bytes, of which 18 are partitioned."""
        return cls(param=2, grad=2, master=4, grad_master=4, optimizer=8, activation=2, stream=2)


# ------------------------------------------------------------------------- model states


def model_state_bytes(*, numel: int, zero_stage: int, dp_shard: int, dtypes: Dtypes,
                      offload: bool = False, offload_params: bool = False) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer states for `numel` parameters.

    Device memory in "params", "grads", "optimizer" (master copy included, as the ZeRO
    paper counts it: K = 12 = 4 master + 8 Adam); host memory in "host"; "device" is
    their sum. `dp_shard` (N) is the ZeRO group: stage 1 shards the optimizer states,
    stage 2 also the gradients, stage 3 also the parameters. Ours is exactly this at a
    step boundary (tests/test_parallel_parity.py measures it); the transient full flat
    gradient / gathered parameters are `MemoryBreakdown.buffers`.

    `offload` is ZeRO-Offload as DeepSpeed runs it (phalanx offloads through the DeepSpeed
    backend only): the CPU optimizer updates an fp32 master partition on the host and
    gradients are streamed to an fp32 host partition, so the host holds
    (4 master + 4 grad + optimizer) Ψ/N whatever the parameter dtype, and the device
    keeps only the parameters (gradients pass through buckets: buffers).
    `offload_params` (ZeRO-3 only; DeepSpeed's offload_param, which phalanx does not run)
    moves the parameter partition to the host too.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: choose 0, 1, 2 or 3")
    if dp_shard < 1:
        raise ValueError(f"dp_shard={dp_shard} must be >= 1")
    if offload and zero_stage == 0:
        raise ValueError("offload needs ZeRO (zero_stage 1, 2 or 3): the offloaded optimizer "
                         "states are a ZeRO partition")
    if offload_params and not (offload and zero_stage == 3):
        raise ValueError("offload_params needs offload=True and zero_stage=3")
    psi = float(numel)
    n = dp_shard if zero_stage > 0 else 1
    part = psi / n
    params = dtypes.param * (part if zero_stage == 3 else psi)
    if offload:
        host = (max(dtypes.master, 4) + max(dtypes.grad_master, 4) + dtypes.optimizer) * part
        if offload_params:
            host += params
            params = 0.0
        return {"params": params, "grads": 0.0, "optimizer": 0.0, "host": host,
                "device": params}
    grads = dtypes.grad * (part if zero_stage >= 2 else psi) + dtypes.grad_master * part
    optimizer = (dtypes.master + dtypes.optimizer) * part
    return {"params": params, "grads": grads, "optimizer": optimizer, "host": 0.0,
            "device": params + grads + optimizer}


def deepspeed_estimate(*, total_params: int, zero_stage: int, num_gpus_per_node: int = 1,
                       num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = False,
                       largest_layer_params: int = 0, zero_init: bool = True,
                       additional_buffer_factor: float = 1.5) -> tuple[float, float]:
    """(cpu bytes per node, gpu bytes per device) as DeepSpeed's
    `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`
    compute them, built from `model_state_bytes(dtypes=Dtypes.deepspeed())` plus
    DeepSpeed's three extra assumptions:

    - ZeRO-3 keeps one gathered layer on the device: its 16-bit parameters and gradients,
      (2 + 2) x largest_layer_params, and no 16-bit gradient partition (ZeRO-2 keeps one);
    - every process first loads the model in fp32 on the host (4 Ψ each; with ZeRO-3's
      zero_init only the largest layer at a time), so a node's host needs the larger of
      that and its ranks' offloaded partitions;
    - host memory gets `additional_buffer_factor` on top.

    One DeepSpeed quirk is kept: for ZeRO-2 with offload it sizes the host from the total
    GPU count and a 16 Ψ floor, not per node (the same as ours on one node).
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"DeepSpeed's estimators cover ZeRO-2 and ZeRO-3, got {zero_stage}")
    total_gpus = num_gpus_per_node * num_nodes
    d = Dtypes.deepspeed()
    # ZeRO-3 reduce-scatters a layer's 16-bit gradients straight into the fp32 partition:
    # no resident 16-bit gradient partition (18 = 2 + 4 + 4 + 8 Ψ/N), only the gathered
    # layer's. ZeRO-2 keeps both partitions (2 Ψ + (2 + 4 + 4 + 8) Ψ/N).
    state = model_state_bytes(numel=total_params, zero_stage=zero_stage, dp_shard=total_gpus,
                              dtypes=replace(d, grad=0) if zero_stage == 3 else d,
                              offload=cpu_offload, offload_params=cpu_offload and cpu_offload_params)
    gpu = state["device"]
    if zero_stage == 3:
        gpu += (d.param + d.grad) * largest_layer_params
    load = 4.0 * (largest_layer_params if zero_stage == 3 and zero_init else total_params)
    if zero_stage == 2 and cpu_offload:
        # DeepSpeed: total_params * max(4 * total_gpus, 16): the whole cluster's fp32 loads,
        # and the offloaded state of one full model.
        cpu = max(load * total_gpus, state["host"] * total_gpus)
    elif cpu_offload and not zero_init:
        cpu = max(load * num_gpus_per_node, state["host"] * num_gpus_per_node)
    elif cpu_offload:
        cpu = state["host"] * num_gpus_per_node
    else:
        cpu = load * num_gpus_per_node
    return cpu * additional_buffer_factor, gpu


# ------------------------------------------------------------------------------ stages


def _layers_per_stage(config: LlamaConfig, n_stages: int) -> int:
    if n_stages < 1 or config.num_hidden_layers % n_stages:
        raise ValueError(f"model.num_hidden_layers={config.num_hidden_layers} cannot be cut into "
                         f"{n_stages} equal stages (pp*vpp); choose pp*vpp dividing it")
    return config.num_hidden_layers // n_stages


def _layer_matmul_numel(config: LlamaConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size


def _vocab_shard(config: LlamaConfig, tp: int) -> int:
    # DTensor shards unevenly with the larger shards first (259 = 130 + 129): the worst rank.
    return math.ceil(config.vocab_size / tp)


def stage_numel(config: LlamaConfig, *, stage: int, n_stages: int, tp: int) -> int:
    """Parameters one rank holds for pipeline stage `stage` of `n_stages` (= pp * vpp).

    Layers are cut evenly (`pipeline_trainer.stage_layers`); the embedding is on stage 0,
    the final norm and lm_head on the last stage. TP divides every matrix by tp (the
    vocab-sharded embedding / head: the largest shard, ceil(V / tp) rows); the RMSNorm
    weights are replicated. A tied embedding is counted once, on stage 0: our model
    needs the embedding and the head in one module when tied, so a tied model runs with
    one stage only (`memory_per_rank` refuses tied + several stages; counting it here
    keeps the sum over stages equal to `num_params`).
    """
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} outside 0..{n_stages - 1}")
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1")
    h = config.hidden_size
    per_layer = _layer_matmul_numel(config) // tp + 2 * h
    numel = _layers_per_stage(config, n_stages) * per_layer
    vocab = _vocab_shard(config, tp) * h
    if stage == 0:
        numel += vocab
    if stage == n_stages - 1:
        numel += h + (0 if config.tie_word_embeddings else vocab)
    return numel


# ------------------------------------------------------------------------- activations


def _check_recompute(recompute: str) -> None:
    if recompute not in _RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: choose one of {', '.join(_RECOMPUTE)}")


def _shapes(config: LlamaConfig, seq_len: int, micro_batch: int, tp: int, sp: bool
            ) -> tuple[float, float, float]:
    """(tokens b*s, fraction of the residual stream on a rank, fraction of heads/FFN on a rank)."""
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1")
    if config.num_attention_heads % tp or config.num_key_value_heads % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={config.num_attention_heads} "
                         f"and num_key_value_heads={config.num_key_value_heads}")
    if sp and tp > 1 and seq_len % tp:
        raise ValueError(f"seq_len={seq_len} must be divisible by tp={tp} with sequence parallelism")
    return float(micro_batch * seq_len), (1.0 / tp if sp else 1.0), 1.0 / tp


def _norm_bytes(h: int, dtypes: Dtypes) -> float:
    # RMSNorm as autograd sees it: pow and x * rsqrt save x in fp32 (the fp32 stream itself,
    # or its fp32 up-cast), the weight multiply saves the normalised x (stream dtype), and
    # rsqrt keeps one fp32 per token.
    return h * (4 + dtypes.stream) + 4


def activation_bytes_per_layer(config: LlamaConfig, *, seq_len: int, micro_batch: int, tp: int = 1,
                               sp: bool = False, recompute: str = "none", dtypes: Dtypes) -> float:
    """Bytes one decoder layer keeps for backward, for one micro-batch, on one TP rank.

    Counted from what `LlamaDecoderLayer` saves under autograd (tests check it with
    `saved_tensors_hooks`, dedup by storage). Per token, with h = hidden, I = FFN size,
    H = query heads, t = tp, S = stream bytes, C = compute bytes (fp32: S = C = 4)::

        norms       2 x (h (4 + S) + 4)       x in fp32 and x*rsqrt per RMSNorm, rsqrt   [/t with SP]
        attention   h S                       norm output, the q/k/v projections' input  [full even with SP]
                    (4 h C + 4 H) / t         SDPA (CPU and CUDA flash kernels) saves q, k, v and
                                              out (out is o_proj's input: same storage) and an
                                              fp32 logsumexp per head
        MLP         h S                       norm output, gate/up input                 [full even with SP]
                    4 I C / t                 gate, up, silu(gate), silu*up (down_proj's input)

    so fp32 without TP: 4 b s (10 h + 4 I + H + 2) bytes. Under bf16 autocast (S = 4,
    C = 2) each projection casts its input itself -- the attention input is saved as
    3 bf16 copies (q, k, v) and the MLP input as 2 (gate, up), h C each instead of one
    h S -- and every weight's bf16 copy (autocast's cache lives one forward) is saved:
    + C x (layer matrices / t) bytes per micro-batch.

    selective (the attention sub-block is checkpointed): norms + h S (the checkpoint's
    input) + the MLP. full (the block is checkpointed): the block input only, h S
    [/t with SP]. What recompute re-materialises during backward is the transient
    working set, counted once per rank by `memory_per_rank`.

    Against Korthikanti et al. 2022, sbh (34 + 5 a s / h) bytes for GPT in fp16 with
    dropout (11 attention + 19 MLP + 4 LayerNorm, in 2-byte elements 17 + 2.5 a s / h):
    - fp32: 4 bytes per element, not 2;
    - no dropout: no masks (their 2 sbh + a s^2 b) and no dropout outputs;
    - fused (flash) SDPA: no s^2 term (their 5 a s^2 b); 4 b s H bytes of logsumexp instead;
    - SwiGLU: 4 tensors of I (gate, up, silu, product) where GeLU keeps 2 of 4h
      (for Llama's I = 8h/3: 10.7 h per token instead of 8 h);
    - RMSNorm unfused in Python saves x *and* x*rsqrt (2 h per norm, 1 h for a fused
      LayerNorm), so norms cost 4 h per token, not 2 h;
    - GQA saves nothing: repeat_interleave materialises k and v at H heads and SDPA saves
      those (SDPA's own enable_gqa would save H_kv heads);
    - RoPE saves nothing (multiplies by constant tables); its outputs are SDPA's q and k;
    - TP without SP: Korthikanti's sbh (10 + 24 / t); ours replicates norms and both
      linear inputs: 6 h full + (4 h + 4 I + H) / t elements per token;
    - SP: Megatron saves the linear inputs' local shard and all-gathers again in
      backward (34 / t); DTensor's SP saves the all-gathered input, so 2 h per token
      stay full: 2 h + (8 h + 4 I + H + 2) / t elements;
    - selective: Korthikanti recompute only the s^2 core (34 sbh left); our selective
      recomputes the whole attention sub-block and keeps only its input (h).
    In elements per token, no TP: ours 10 h + 4 I + H + 2 vs their 17 h + 2.5 a s; in
    bytes, ours 4 sbh (10 + 4 I / h + (H + 2) / h), i.e. 82.7 sbh for I = 8h/3, vs their
    sbh (34 + 5 a s / h).
    """
    _check_recompute(recompute)
    e, n, q = _shapes(config, seq_len, micro_batch, tp, sp)
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    S, C = dtypes.stream, dtypes.activation
    if recompute == "full":
        return e * n * h * S
    norms = 2 * n * _norm_bytes(h, dtypes)
    mlp_in = h * (2 * C if dtypes.autocast else S)
    mlp = mlp_in + q * 4 * inter * C
    d = config.head_dim
    w_attn = (2 * h * heads * d + 2 * h * config.num_key_value_heads * d) / tp
    w_mlp = 3 * h * inter / tp
    weights_mlp = C * w_mlp if dtypes.autocast else 0.0
    if recompute == "selective":
        return e * (norms + h * S + mlp) + weights_mlp
    attn_in = h * (3 * C if dtypes.autocast else S)
    attn = attn_in + q * (4 * h * C + 4 * heads)
    weights_attn = C * w_attn if dtypes.autocast else 0.0
    return e * (norms + attn + mlp) + weights_mlp + weights_attn


def embedding_activation_bytes(config: LlamaConfig, *, seq_len: int, micro_batch: int, tp: int = 1,
                               sp: bool = False, dtypes: Dtypes) -> float:
    """Stage 0's extra per micro-batch: the embedding saves only its token ids (the
    input tensor itself without TP, so nothing new; a masked int64 copy with TP)."""
    e, _, _ = _shapes(config, seq_len, micro_batch, tp, sp)
    return e * _INDEX if tp > 1 else 0.0


def head_activation_bytes(config: LlamaConfig, *, seq_len: int, micro_batch: int, tp: int = 1,
                          sp: bool = False, dtypes: Dtypes) -> float:
    """The last stage's extra per micro-batch: final RMSNorm, lm_head, loss.

    Our loss is `cross_entropy(logits.float(), reduction="sum")`: log_softmax saves its
    fp32 output, b s V x 4 bytes (the logits themselves are not saved; this term
    dominates small models with a big vocabulary). Final norm as in a layer; lm_head saves
    its input (h S, or its bf16 cast under autocast, plus the bf16 weight copy V h C).
    With TP the loss is vocab-parallel (V / t per rank) and `_LossParallelSum` also keeps
    the local fp32 logits (its detached leaf) and an int64 target copy.
    """
    e, n, _ = _shapes(config, seq_len, micro_batch, tp, sp)
    h, vt = config.hidden_size, _vocab_shard(config, tp)
    C, S = dtypes.activation, dtypes.stream
    out = e * n * _norm_bytes(h, dtypes)
    out += e * h * (C if dtypes.autocast else S)
    if dtypes.autocast:
        out += C * vt * h
    out += e * vt * 4
    if tp > 1:
        out += e * vt * 4 + e * _INDEX
    return out


# ------------------------------------------------------------------------------ schedule


def inflight_microbatches(schedule: str, *, pp: int, vpp: int, n_microbatches: int,
                          pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its worst moment,
    in units of the rank's whole share of layers (a chunk of an interleaved schedule holds
    1 / vpp of it): the simulator's `peak_inflight[pp_rank] / vpp`.

    - gpipe: m (every forward before any backward).
    - 1f1b: min(m, pp - r): r's warm-up is pp - 1 - r forwards, the steady state adds one
      before each backward (the first stage holds pp).
    - zb_h1: min(m, pp) on every rank: 1F1B's warm-up with I in place of B, and rank r
      defers r W's (a micro-batch's activations live until its W).
    - interleaved_1f1b: warm-up (v - 1) p + 2 (p - 1 - r) chunk forwards, + 1 in the steady
      state, at most m v chunks: min((v - 1) p + 2 (p - 1 - r) + 1, m v) / v. For the
      first rank that is p + (p - 1) / v = p (1 + (p - 1) / (p v)) micro-batches, Narayanan
      et al.'s factor over 1F1B's p. vpp = 1 is 1f1b.
    - zb_v (2 chunks per rank): min(2 p, m + 1 + r, 2 m) / 2, read off the simulator.
    """
    p, v, m, r = pp, vpp, n_microbatches, pp_rank
    if p < 1 or v < 1 or m < 1:
        raise ValueError(f"pp={p}, vpp={v}, n_microbatches={m} must all be >= 1")
    if not 0 <= r < p:
        raise ValueError(f"pp_rank={r} outside 0..{p - 1}")
    if schedule == "interleaved_1f1b" and v == 1:
        schedule = "1f1b"
    if schedule != "interleaved_1f1b" and schedule != "zb_v" and v != 1:
        raise ValueError(f"schedule {schedule!r} runs one stage per rank, got vpp={v}")
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - r))
    if schedule == "zb_h1":
        return float(min(m, p))
    if schedule == "interleaved_1f1b":
        return min((v - 1) * p + 2 * (p - 1 - r) + 1, m * v) / v
    if schedule == "zb_v":
        if v != 2:
            raise ValueError(f"zb_v places 2 stages per rank, got vpp={v}")
        return min(2 * p, m + 1 + r, 2 * m) / 2
    raise ValueError(f"unknown pipeline schedule {schedule!r}; valid: gpipe, 1f1b, "
                     "interleaved_1f1b, zb_h1, zb_v")


# ----------------------------------------------------------------------------- per rank


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one rank (device unless `host`); see the module docstring for categories."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    host: float = 0.0
    step_buffers: float = 0.0
    pp_rank: int = 0

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        """The step's device peak: model states + the larger of (forward/backward:
        activations + buffers) and (end of step: step_buffers)."""
        return self.model_states + max(self.activations + self.buffers, self.step_buffers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


# One run of a rank's compute order: a block of (kind, stage) actions and how many times it
# repeats back to back.
_Run = tuple[tuple[tuple[str, int], ...], int]


def _schedule_runs(cand: Candidate, m: int) -> tuple[tuple[int, ...], tuple[tuple[_Run, ...], ...]]:
    """(stage -> rank, per rank run-length encoded compute order) of the run's schedule."""
    return _compute_runs(cand.schedule, cand.pp, cand.vpp, m)


@functools.lru_cache(maxsize=1024)
def _compute_orders(schedule: str, pp: int, vpp: int,
                    m: int) -> tuple[tuple[int, ...], list[list[tuple[str, int]]]]:
    """(stage -> rank, per rank [(kind, stage)] compute order), from the schedule itself."""
    from phalanx.parallel.pipeline.schedules import build_schedule

    s = build_schedule(schedule, pp=pp, vpp=vpp, n_microbatches=m)
    return s.stage_to_rank, [[(a.kind, a.stage) for a in acts] for acts in s.actions]


@functools.lru_cache(maxsize=1024)
def _compute_runs(schedule: str, pp: int, vpp: int,
                  m: int) -> tuple[tuple[int, ...], tuple[tuple[_Run, ...], ...]]:
    """`_compute_orders` run-length encoded (blocks of actions with repeat counts).

    Memoised: the planner asks for the same (schedule, p, v, m) for thousands of candidates.
    The schedules the planner enumerates (1F1B, ZB-H1, interleaved 1F1B) are written down
    here as runs, without building the schedule: deep pipelines with hundreds of
    micro-batches have O(p m v) actions but O(p + m v) runs in all, and building them was
    most of the planner's time. Their expansion is the schedule's own compute order
    (tests/test_memory_model.py checks it against `schedules.build_schedule`); any other
    schedule (and any invalid one, for build_schedule's error) comes from the schedule.
    """
    if schedule == "interleaved_1f1b" and vpp == 1:
        schedule = "1f1b"  # build_schedule runs plain 1F1B then
    if schedule == "1f1b" and vpp == 1:
        return tuple(range(pp)), tuple(_merge(_runs_1f1b(r, pp, m)) for r in range(pp))
    if schedule == "zb_h1" and vpp == 1:
        return tuple(range(pp)), tuple(_merge(_runs_zb_h1(r, pp, m)) for r in range(pp))
    if schedule == "interleaved_1f1b" and m % pp == 0:
        return (tuple(s % pp for s in range(pp * vpp)),
                tuple(_merge(_runs_interleaved(r, pp, vpp, m)) for r in range(pp)))
    stage_to_rank, orders = _compute_orders(schedule, pp, vpp, m)
    return stage_to_rank, tuple(_merge([((a,), 1) for a in acts]) for acts in orders)


def _merge(runs: list[_Run]) -> tuple[_Run, ...]:
    """Drop empty runs and join neighbours that repeat the same block."""
    out: list[_Run] = []
    for block, n in runs:
        if n <= 0:
            continue
        if out and out[-1][0] == block:
            out[-1] = (block, out[-1][1] + n)
        else:
            out.append((block, n))
    return tuple(out)


def _runs_1f1b(r: int, pp: int, m: int) -> list[_Run]:
    # schedules.one_f_one_b: warm-up forwards, (F, B) pairs, cool-down backwards.
    warmup = min(pp - 1 - r, m)
    f, b = ("F", r), ("B", r)
    return [((f,), warmup), ((f, b), m - warmup), ((b,), warmup)]


def _runs_zb_h1(r: int, pp: int, m: int) -> list[_Run]:
    # schedules.zb_h1: warm-up forwards; step i runs F (while forwards are left), I, and W
    # once i >= r; the deferred W's last. The step's block changes only at i = m - warmup
    # (forwards run out) and i = r (W's start).
    warmup = min(pp - 1 - r, m)
    f, i_, w = ("F", r), ("I", r), ("W", r)
    last_f = m - warmup
    cuts = sorted({0, last_f, min(r, m), m})
    out: list[_Run] = [((f,), warmup)]
    for lo, hi in itertools.pairwise(cuts):
        block = ((f,) if lo < last_f else ()) + (i_,) + ((w,) if lo >= r else ())
        out.append((block, hi - lo))
    return [*out, ((w,), min(r, m))]


def _runs_interleaved(r: int, pp: int, vpp: int, m: int) -> list[_Run]:
    # schedules.interleaved_1f1b: the i-th forward (backward) of rank r runs chunk
    # (i // pp) % vpp (counted from the last chunk for backwards), so the stage changes only
    # where i crosses a multiple of pp. Warm-up forwards, (F, B) pairs, cool-down backwards.
    total = m * vpp
    warmup = min((vpp - 1) * pp + 2 * (pp - 1 - r), total)

    def f(i: int) -> tuple[str, int]:
        return "F", ((i // pp) % vpp) * pp + r

    def b(i: int) -> tuple[str, int]:
        return "B", (vpp - 1 - (i // pp) % vpp) * pp + r

    def next_cut(i: int) -> int:  # the next multiple of pp after i
        return (i // pp + 1) * pp

    out: list[_Run] = []
    lo = 0
    while lo < warmup:
        hi = min(next_cut(lo), warmup)
        out.append(((f(lo),), hi - lo))
        lo = hi
    pairs, lo = total - warmup, 0
    while lo < pairs:
        hi = min(next_cut(lo), next_cut(warmup + lo) - warmup, pairs)
        out.append(((f(warmup + lo), b(lo)), hi - lo))
        lo = hi
    while lo < total:
        hi = min(next_cut(lo), total)
        out.append(((b(lo),), hi - lo))
        lo = hi
    return out


@dataclass(frozen=True)
class _StageBytes:
    """Per micro-batch bytes of one stage, as the walk over a rank's actions uses them."""

    held: float  # kept from F to B (to W after an I)
    fwd_work: float  # transient while F runs
    bwd_work: float  # transient while B / I runs (on top of `held`)
    grad_in: float  # input gradient, kept by the runtime until the step ends
    w_pending: float  # kept from I to W (the weight gradient's inputs)


def _walk(actions: list[tuple[str, int]], stages: dict[int, _StageBytes],
          late_grads: dict[int, float]) -> tuple[float, float]:
    """(peak, bytes still held at the end: the input gradients) of the activation bytes over
    a rank's compute order; in micro-batches the peak is the simulator's `peak_inflight`.

    `late_grads[s]`: gradient bytes of stage s that do not exist until its first backward
    (our runtime without ZeRO frees them at the step start): until then the peak has their
    room. A backward frees its stage's activations as it goes while the gradients it
    produces appear, so the start of a stage's first backward still has that room. Stage
    0's I is empty (token ids have no gradient): its W is the whole backward.
    """
    cur, peak, _ = _steps(actions, stages, dict(late_grads), 0.0, 0.0, sum(late_grads.values()))
    return peak, cur


def _walk_runs(runs: tuple[_Run, ...], stages: dict[int, _StageBytes],
               late_grads: dict[int, float]) -> tuple[float, float]:
    """`_walk` over a run-length encoded compute order, in O(runs) instead of O(actions).

    A block repeated n times is walked as is once (its backwards may bring late gradients
    back), then once more from zero for its net change and its rise above its start: the
    repeats after the first are that same walk started `net` higher each time (no late
    gradient is left to come back in them), so the last one (net > 0) or the second one
    holds their peak. Equal to `_walk` on the expansion up to float rounding.
    """
    pending = dict(late_grads)
    missing = sum(late_grads.values())
    cur = peak = 0.0
    for block, n in runs:
        cur, peak, missing = _steps(block, stages, pending, cur, peak, missing)
        if n > 1:
            net, rise, _ = _steps(block, stages, pending, 0.0, -math.inf, missing)
            peak = max(peak, cur + rise + (n - 2) * max(net, 0.0))
            cur += (n - 1) * net
    return peak, cur


def _steps(actions: tuple[tuple[str, int], ...] | list[tuple[str, int]],
           stages: dict[int, _StageBytes], pending: dict[int, float], cur: float, peak: float,
           missing: float) -> tuple[float, float, float]:
    """`_walk`'s loop from a given state: (cur, peak, missing) after `actions`; pops the
    stages whose late gradients came back from `pending`."""
    for kind, s in actions:
        st = stages[s]
        if kind == "F":
            peak = max(peak, cur + st.held + st.fwd_work - missing)
            cur += st.held
        elif kind == "I" and s == 0:
            continue
        elif kind in ("B", "I") or (kind == "W" and s == 0):
            peak = max(peak, cur + st.bwd_work - missing)
            missing -= pending.pop(s, 0.0)
            cur += st.grad_in
            cur -= st.held if kind != "I" else -st.w_pending
        else:  # W after a real I
            cur -= st.held + st.w_pending
        peak = max(peak, cur - missing)
    return cur, peak, missing


def memory_per_rank(config: LlamaConfig, cand: Candidate, *, seq_len: int, global_batch: int,
                    dtypes: Dtypes, backend: str = "gloo") -> list[MemoryBreakdown]:
    """One `MemoryBreakdown` per pipeline rank (a rank holds `vpp` stages), for the worst
    rank of its tp / dp group (TP's larger vocab shard; ZeRO shards are even).

    The runtime that runs the candidate decides the in-flight micro-batches: pp = tp = 1
    with ZeRO 0 runs torch DDP, and ZeRO-Offload runs DeepSpeed's engine (sharding over all
    dp ranks), both one micro-batch at a time; everything else runs our pipeline runtime
    with the named schedule (even at pp = 1, where gpipe holds every micro-batch).
    `backend` is the collectives' library: gloo (CPU) stages all_gather_into_tensor and
    reduce_scatter_tensor through full-size copies, nccl does not.

    activations -- the step's peak above the model states while forward/backward run, by
    walking the rank's compute order (its micro-batch count is the simulator's
    `peak_inflight`, see `inflight_microbatches`). Per in-flight (stage, micro-batch):
    layers x `activation_bytes_per_layer`, `embedding_activation_bytes` on stage 0,
    `head_activation_bytes` on the last stage, and on the other stages the output the
    runtime keeps until the backward (b s h S, /t with SP). Held besides:
    - each backward's input gradient (b s h x 4, /t with SP; stages > 0): the runtime keeps
      it in `grad_in` until the step ends;
    - after an I (zb_h1), the gradients torch's split backward keeps for W: each
      projection's output gradient and the norms' (the micro-batch's activations stay too);
    - every micro-batch's token ids and targets (built up front).
    Working sets: a backward adds the received output gradient and the larger of one
    layer's backward (re-materialised activations under recompute, the incoming residual
    gradient, the MLP's two widest gradients) and a weight gradient before it is added to
    `.grad` (the embedding's, dense, once the layers' activations are freed; with TP it
    arrives full size); the last stage's backward starts with the loss's two fp32 b s V
    gradients beside the saved log-probabilities. A forward adds the logits (last stage)
    and, under autocast, the bf16 weight copies recompute does not save (autocast caches
    them until the forward ends). Without ZeRO our runtime frees the gradients at the step
    start (zero_grad(set_to_none)) and a stage's first backward brings its own back, so a
    peak reached before (GPipe, a short interleaved step) has their room.

    buffers -- alive during forward/backward, on top of the activation peak:
    - ZeRO-2: the full flat gradient that backward accumulates into, grad x Ψ (1 - 1/N)
      above the resident shard gradient that replaces it at REDUCE_GRAD;
    - ZeRO-3: that, plus the stage's parameters gathered at UNSHARD, param x Ψ (every
      stage of an interleaved rank is unsharded at once);
    - DDP with gradient accumulation (m > 1): zero_grad(set_to_none) drops the bucket
      views, so the no_sync micro-batches accumulate into fresh gradients beside the
      buckets until the last backward copies them in: grad x Ψ;
    - offload: DeepSpeed's gradient bucket (its default 5e8 elements, at most Ψ).
    ZeRO-1's full flat gradient is its resident gradient (no buffer).

    step_buffers -- the largest end-of-step phase (activations freed; the peak is the
    larger of the two phases):
    - no ZeRO, dp > 1: REDUCE_GRAD all-reduces a flat copy of each stage's gradients,
      grad x Ψ (DDP needs none: its gradients are views of its buckets);
    - ZeRO-1: begin_step allocates the new flat gradient while the old one lives (grad x Ψ);
      end_step all-gathers a clone of the shard into the full parameters (param x Ψ/N,
      + param x Ψ staging with gloo);
    - ZeRO-2: REDUCE_GRAD holds the flat gradient (+ gloo's copy of it); end_step as ZeRO-1;
    - ZeRO-3: UNSHARD's gathered parameters (+ gloo's staging copy); REDUCE_GRAD's gathered
      parameters, flat gradient (+ gloo's copy);
    - AdamW (foreach is off on CPU) and clipping: two temporaries of the largest tensor
      they update (a flat ZeRO shard, or a matrix).
    """
    zero = cand.zero_stage
    own_runtime = not (cand.offload or (cand.pp == 1 and cand.tp == 1 and zero == 0))
    # DDP and DeepSpeed run the whole model as one module, whatever vpp says.
    n_stages = cand.pp * cand.vpp if own_runtime else 1
    if config.tie_word_embeddings and n_stages > 1:
        raise ValueError("model.tie_word_embeddings=true needs the embedding and the head in one "
                         f"stage, but pp*vpp = {n_stages}: untie the embeddings or use "
                         "parallel.pp=1 with parallel.vpp=1")
    m = cand.n_microbatches(global_batch)
    if m < 1:
        raise ValueError(f"global_batch={global_batch} is smaller than dp*micro_batch_size = "
                         f"{cand.dp}*{cand.micro_batch_size}")
    tp, sp = cand.tp, cand.sp and cand.tp > 1
    b = cand.micro_batch_size
    e, n, q = _shapes(config, seq_len, b, tp, sp)
    h, inter = config.hidden_size, config.intermediate_size
    vt = _vocab_shard(config, tp)
    S, C, G, P = dtypes.stream, dtypes.activation, dtypes.grad, dtypes.param
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: choose gloo or nccl")
    gloo = 1.0 if backend == "gloo" else 0.0
    per_layers = _layers_per_stage(config, n_stages)
    shard = cand.dp if cand.offload else cand.dp_shard
    if own_runtime:
        stage_to_rank, runs = _schedule_runs(cand, m)
    else:
        one_at_a_time: tuple[_Run, ...] = (((("F", 0), ("B", 0)), 1),)
        stage_to_rank, runs = (0,), (one_at_a_time,)

    kw = dict(seq_len=seq_len, micro_batch=b, tp=tp, sp=sp, dtypes=dtypes)
    layer = activation_bytes_per_layer(config, recompute=cand.recompute, **kw)
    rematerialised = activation_bytes_per_layer(config, recompute="none", **kw) - layer
    head = head_activation_bytes(config, **kw)
    grad_bytes = e * n * h * 4  # P2P buffers and input gradients are fp32
    last = n_stages - 1
    kv = config.num_key_value_heads * config.head_dim
    hq = config.num_attention_heads * config.head_dim
    largest_matrix = max(h * inter, h * hq) / tp
    # One layer's backward. Its MLP part: the two widest gradients (product, silu / up), or
    # one beside a weight gradient before it is added to .grad. Full recompute
    # re-materialises the whole layer before that; selective re-materialises the attention
    # after the MLP's backward is done, beside the attention's q / k / v / out gradients.
    mlp_work = max(2 * e * q * inter * C, e * q * inter * C + G * largest_matrix)
    if cand.recompute == "full":
        layer_work = rematerialised + mlp_work
    elif cand.recompute == "selective":
        layer_work = max(mlp_work, rematerialised + 4 * e * q * hq * C)
    else:
        layer_work = mlp_work
    # After an I (ZB-H1), torch's split backward keeps the gradients at the points where the
    # weight path leaves the input path: each projection's output, the norms' products.
    w_layer = e * ((2 * n + 1) * h * 4 + q * (hq + 2 * kv + 2 * inter) * C)

    layer_matrices = _layer_matmul_numel(config) / tp
    attn_matrices = (2 * h * hq + 2 * h * kv) / tp
    unsaved_casts = 0.0
    if dtypes.autocast and cand.recompute != "none":
        unsaved_casts = C * (layer_matrices if cand.recompute == "full" else attn_matrices)
    stages: dict[int, _StageBytes] = {}
    for s in range(n_stages):
        layers_held = held = per_layers * layer
        # Backward working set on top of the stage's held activations: the received output
        # gradient and one layer's backward.
        work = layer_work
        if s == 0:
            held += embedding_activation_bytes(config, **kw)
            # The embedding's dense gradient comes last, once the layers' activations are
            # freed; with TP it arrives full size and is sliced to the shard (tensor.py).
            emb_grad = vt if tp == 1 else config.vocab_size + vt
            work = max(work, G * emb_grad * h - layers_held)
        if s != last and cand.pp > 1:
            held += e * n * h * S  # the output, kept by the runtime until this stage's backward
        inner = (0.0 if s == last else grad_bytes) + work
        # autocast caches every weight's bf16 copy until the stage's forward ends, saved by
        # autograd or not: the ones recompute does not save are a transient of F.
        fwd_work = per_layers * unsaved_casts
        w_pending = per_layers * w_layer
        if s == last:
            held += head
            # logits (and their fp32 copy under autocast) while log_softmax runs
            fwd_work += e * vt * (C + (4 if C != 4 else 0))
            # the loss's fp32 b s V gradients beside the saved log-probabilities (one more in
            # the vocab-parallel loss); lm_head's weight gradient beside the logits' gradient;
            # the layers' backward starts once the head's saved tensors are freed
            loss_work = (2 + (tp > 1)) * e * vt * 4
            inner = max(loss_work, e * vt * 4 + G * vt * h, inner - head)
            w_pending += e * (vt * 4 + n * h * 4)
        stages[s] = _StageBytes(held=held, fwd_work=fwd_work, bwd_work=inner,
                                grad_in=grad_bytes if s > 0 else 0.0, w_pending=w_pending)
    ids = m * e * 2 * _INDEX  # every micro-batch's inputs and targets, built up front

    # Per stage, then per distinct stage size: the middle stages of a deep pipeline are alike.
    numels = _stage_numels(config, n_stages, tp)
    state_of = {x: model_state_bytes(numel=x, zero_stage=zero, dp_shard=shard, dtypes=dtypes,
                                     offload=cand.offload) for x in set(numels)}
    out = []
    for r, mine in enumerate(_rank_stages(stage_to_rank, cand.pp)):
        psi = [numels[s] for s in mine]
        psi_r = float(sum(psi))
        states = [state_of[x] for x in psi]
        params = sum(st["params"] for st in states)
        grads = sum(st["grads"] for st in states)
        optimizer = sum(st["optimizer"] for st in states)
        host = sum(st["host"] for st in states)

        # Without ZeRO our runtime's zero_grad(set_to_none) frees the gradients at the step
        # start; each stage's first backward brings its own back.
        late = {s: st["grads"] for s, st in zip(mine, states, strict=True)} \
            if own_runtime and zero == 0 else {}
        peak, end = _walk_runs(runs[r], stages, late)
        acts = peak + ids

        # AdamW (foreach is off on CPU) and clipping: two temporaries of the largest tensor
        # they update: a flat ZeRO shard, or a matrix.
        if zero > 0 or cand.offload:
            largest_tensor = max(psi) / shard
        else:
            largest_tensor = max(largest_matrix, vt * h if (0 in mine or last in mine) else 0)
        step = 0.0 if cand.offload else 2 * 4 * largest_tensor
        buffers = 0.0
        if cand.offload:
            buffers = G * min(psi_r, _DS_BUCKET)
        elif not own_runtime:
            if m > 1:
                # DDP: zero_grad(set_to_none) drops the bucket views, so the no_sync
                # micro-batches accumulate into fresh gradients beside the buckets until the
                # last backward copies them in (gradient_as_bucket_view: views again).
                buffers = G * psi_r
        elif zero == 0:
            if cand.dp > 1:
                step = max(step, G * psi_r + end)  # flat all-reduce copies, at REDUCE_GRAD
        else:
            # end_step (stages 1-2): all_gather of a clone of the shard into the full buffer
            gather = P * psi_r / shard + gloo * P * psi_r
            if zero == 1:
                # begin_step allocates the new flat gradient while the old one is alive
                step = max(step, G * psi_r, gather)
            elif zero == 2:
                buffers = G * psi_r * (1 - 1 / shard)
                # REDUCE_GRAD: the flat gradient and gloo's copy of it for reduce_scatter
                step = max(step, G * psi_r * (1 + gloo) + end, gather)
            else:
                buffers = P * psi_r + G * psi_r * (1 - 1 / shard)
                # UNSHARD: the gathered parameters (and gloo's staging copy); REDUCE_GRAD:
                # gathered parameters, flat gradient, gloo's copy of it
                step = max(step, P * psi_r * (1 + gloo),
                           P * psi_r + G * psi_r * (1 + gloo) + end)

        out.append(MemoryBreakdown(params=float(params), grads=float(grads),
                                   optimizer=float(optimizer), activations=float(acts),
                                   buffers=float(buffers), host=float(host),
                                   step_buffers=float(step), pp_rank=r))
    return out


def _stage_numels(config: LlamaConfig, n_stages: int, tp: int) -> list[int]:
    """`stage_numel` of every stage: the first and the last differ, the rest are alike."""
    middle = stage_numel(config, stage=1, n_stages=n_stages, tp=tp) if n_stages > 2 else 0
    return [stage_numel(config, stage=s, n_stages=n_stages, tp=tp) if s in (0, n_stages - 1)
            else middle for s in range(n_stages)]


@functools.lru_cache(maxsize=1024)
def _rank_stages(stage_to_rank: tuple[int, ...], pp: int) -> tuple[tuple[int, ...], ...]:
    """The stages each of `pp` ranks holds, in stage order (memoised: a scan per rank of a
    deep pipeline's stages costs O(stages x ranks) per candidate)."""
    held: list[list[int]] = [[] for _ in range(pp)]
    for s, r in enumerate(stage_to_rank):
        if r < pp:
            held[r].append(s)
    return tuple(tuple(stages) for stages in held)


def peak_memory(config: LlamaConfig, cand: Candidate, *, seq_len: int, global_batch: int,
                dtypes: Dtypes, backend: str = "gloo") -> MemoryBreakdown:
    """The rank with the highest `total` of `memory_per_rank`."""
    ranks = memory_per_rank(config, cand, seq_len=seq_len, global_batch=global_batch, dtypes=dtypes,
                            backend=backend)
    return max(ranks, key=lambda r: r.total)
