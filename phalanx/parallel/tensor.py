"""Tensor parallelism (Megatron) and sequence parallelism, applied from outside the model.

``apply_tensor_parallel(model, tp_mesh, sequence_parallel=...)`` rewrites a
``LlamaForCausalLM`` (a whole model or one pipeline stage) in place with torch's
DTensor styles, in the order torchtitan's ``parallelize_llama`` uses; the model
file holds no parallelism code. Per decoder layer::

    q_proj, k_proj, v_proj, gate_proj, up_proj   ColwiseParallel  (weight Shard(0))
    o_proj, down_proj                            RowwiseParallel  (weight Shard(1))
    embed_tokens                                 RowwiseParallel on nn.Embedding (vocab-sharded)
    lm_head                                      ColwiseParallel, logits Shard(-1) (vocab) for loss_parallel

Attention keeps ``num_attention_heads / tp`` query heads and ``num_key_value_heads / tp``
kv heads per rank: rank r owns the contiguous heads ``[r * H / tp, (r + 1) * H / tp)``
and their kv heads, so HF's ``repeat_kv`` grouping (query head j reads kv head
``j // n_rep``) holds rank-locally. Both head counts must divide by tp.

Activations between the parallel regions (the residual stream):

- ``sequence_parallel=False``: plain tensors, full and identical on every TP rank.
  One all-reduce per attention and per MLP in forward (at o_proj / down_proj) and one
  in backward (where the layer's input gradient leaves the q/k/v or gate/up
  projections). RMSNorms run on the full activations; their weights are replicated
  DTensors (``_ReplicateParallel``) so that every parameter of a TP model is a DTensor.
- ``sequence_parallel=True``: ``DTensor`` sharded on the sequence dim (``Shard(1)``);
  RMSNorms run on the local sequence chunk (``SequenceParallel``: weights become
  replicated DTensors). The attention and MLP inputs are all-gathered
  (``PrepareModuleInput``, Shard(1) -> Replicate) and o_proj / down_proj
  reduce-scatter back to Shard(1); backward mirrors it (reduce-scatter, all-gather).
  The stream is a DTensor rather than a local chunk (torchtitan keeps local chunks)
  because ``LlamaModel`` sizes its RoPE tables from ``h.shape[1]``: a DTensor reports
  the global sequence length, so the model needs no change. The sequence length
  must divide by tp (checked on token input).

Pipeline stages: the tensors a stage takes and returns when it has no embedding /
no head, i.e. what the pipeline sends and receives. Always plain tensors; each TP rank
exchanges with the rank of the same tp coordinate in the neighbouring stage.

- without SP: the full hidden states ``[b, s, hidden]``, identical on every TP rank;
  the gradient that comes back is full and identical on every TP rank too.
- with SP: this rank's contiguous sequence chunk ``[b, s / tp, hidden]`` (positions
  ``r * s / tp .. (r + 1) * s / tp`` on tp rank r). Each P2P carries 1/tp of the
  activation and the stage boundary needs no gather or scatter (as in Megatron); the
  gradient that comes back is that chunk's.

Logits (a stage with the head) are a ``DTensor`` sharded on the vocab dim (uneven
shards are fine: 259 = 130 + 129); ``tp_loss_sum`` turns them into the summed
cross-entropy without gathering them.

Gradients: after each backward every parameter's ``.grad`` has the parameter's own
placements, so code that reads local shards (ZeRO, optimizers, checkpoints) sees the
right values. Autograd alone does not guarantee it: SP norm weights get ``Partial``
gradients, and the embedding's gradient arrives full-size (``Replicate``); a
post-accumulate-grad hook redistributes them (see ``_match_param_placements``).

Gradient norm: ``torch.nn.utils.clip_grad_norm_`` over a TP model's parameters does
give the global norm over tp (one all-reduce; it returns a replicated DTensor:
``.full_tensor()`` for the value) and clips every shard alike; a mix of plain and DTensor
gradients would make it fail, which is why the norms are DTensors without SP too. It
knows nothing of pipeline stages or ZeRO shards: ``global_grad_norm(params, groups=...)``
and ``clip_grad_norm_global_`` add those (pp, dp_shard) groups.

Initialise weights (``init_weights(seed)``) before ``apply_tensor_parallel``: every
rank builds the same model and keeps its shard (by default rank 0's weights are
scattered, so ranks that built different weights still agree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from phalanx.models.llama import LlamaConfig, LlamaForCausalLM
from phalanx.parallel import waits

__all__ = [
    "apply_tensor_parallel",
    "check_tensor_parallel",
    "clip_grad_norm_global_",
    "global_grad_norm",
    "tp_loss_sum",
]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(
    config: LlamaConfig, tp: int, *, sequence_parallel: bool = False, seq_len: int | None = None
) -> None:
    """Raise ``ValueError`` (which dims, and how to fix them) when ``config`` cannot run at ``tp``.

    Pure: the planner calls it before any worker starts; ``apply_tensor_parallel`` calls it too.
    """
    if tp < 1:
        raise ValueError(f"parallel.tp={tp} must be >= 1")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    bad = [(name, n) for name, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads))
           if n % tp != 0]
    if bad:
        dims = ", ".join(f"{name}={n}" for name, n in bad)
        ok = _divisors(math.gcd(heads, kv_heads))
        raise ValueError(
            f"parallel.tp={tp} must divide the head counts ({dims}): each tensor-parallel rank "
            f"holds whole query and key/value heads. Use parallel.tp in {ok}, or a model whose "
            f"num_attention_heads and num_key_value_heads are multiples of {tp}."
        )
    if sequence_parallel and seq_len is not None and seq_len % tp != 0:
        raise ValueError(
            f"trainer.seq_len={seq_len} must be divisible by parallel.tp={tp} with sequence "
            f"parallelism (parallel.sp=true): each rank holds seq_len / tp positions. Pick a "
            f"seq_len that is a multiple of {tp}, or set parallel.sp=false."
        )


def _match_param_placements(param: torch.Tensor) -> None:
    # AccumulateGrad stores whatever placement autograd produced, which is not always
    # the parameter's: a replicated norm weight applied to sequence-sharded activations
    # gets a Partial(sum) gradient (reduced here by an all-reduce; Megatron all-reduces
    # SP norm gradients too), and DTensor (torch 2.13) has no row-wise strategy for
    # embedding_dense_backward, so the vocab-sharded embedding's gradient arrives as a
    # full-size Replicate tensor (sliced here, no communication; the transient
    # vocab x hidden buffer is the price of using DTensor's embedding rather than a
    # hand-written vocab-parallel one). Code that reads local shards (ZeRO, the
    # optimizer, checkpoints) then sees the right values.
    grad = param.grad
    if isinstance(grad, DTensor) and grad.placements != param.placements:
        param.grad = grad.redistribute(param.device_mesh, param.placements)


class _ReplicateParallel(ParallelStyle):
    """Replicated DTensor weights on a module that runs on plain, full activations.

    For the RMSNorms when TP runs without SP (torchtitan's ``NoParallel``): every
    parameter of a TP model is then a DTensor on the tp mesh, so torch's
    ``clip_grad_norm_``, foreach optimizers and DCP see no mix of plain tensors and
    DTensors. The module's input and output stay plain tensors; the weight's gradient
    comes out Replicate with no communication.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(_name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for name, param in list(mod.named_parameters(recurse=False)):
                # Replicated by construction (same init on every rank, as SequenceParallel assumes).
                local = DTensor.from_local(param.detach(), mesh, (Replicate(),), run_check=False)
                mod.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))

        def to_dtensor(_mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return tuple(
                DTensor.from_local(t, mesh, (Replicate(),), run_check=False)
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t
                for t in inputs
            )

        def to_local(_mod: nn.Module, outputs: torch.Tensor, _mesh: DeviceMesh) -> torch.Tensor:
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, partition, to_dtensor, to_local)


def _check_seq_len_hook(tp: int):
    def hook(module: nn.Module, args: tuple) -> None:
        tokens = args[0]
        if not isinstance(tokens, DTensor) and tokens.dim() >= 2 and tokens.shape[1] % tp != 0:
            raise ValueError(
                f"sequence length {tokens.shape[1]} must be divisible by parallel.tp={tp} "
                f"with sequence parallelism"
            )
    return hook


def apply_tensor_parallel(
    model: LlamaForCausalLM,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool = False,
    src_data_rank: int | None = 0,
) -> None:
    """Shard ``model`` (a whole model or a pipeline stage) over the 1-D ``tp_mesh``, in place.

    ``src_data_rank``: the TP rank whose weights are scattered to the others (torch's
    default, 0); ``None`` keeps each rank's own values and skips that communication
    (valid when every rank initialised with the same seed). A mesh of size 1 leaves the
    model untouched.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (the tp axis), got a {tp_mesh.ndim}-D mesh")
    if getattr(model, "_phalanx_tp", None) is not None:
        raise ValueError("apply_tensor_parallel was already applied to this model")
    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp, sequence_parallel=sequence_parallel)
    if tp == 1:
        return
    model._phalanx_tp = (tp, sequence_parallel)
    sp = sequence_parallel
    # The residual stream (see the module docstring): with SP a DTensor sharded on the
    # sequence, without SP a plain full tensor (layers' outputs are made local).
    stream = Shard(1) if sp else Replicate()

    def put(module: nn.Module, plan) -> None:
        parallelize_module(module, tp_mesh, plan, src_data_rank=src_data_rank)

    inner = model.model
    if inner.embed_tokens is not None:
        put(inner.embed_tokens, RowwiseParallel(
            input_layouts=Replicate(), output_layouts=stream, use_local_output=not sp))
        if sp:
            inner.register_forward_pre_hook(_check_seq_len_hook(tp))
    elif sp:
        # A stage fed hidden states: its input is this rank's sequence chunk.
        put(inner, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=False))

    for layer in inner.layers.values():
        attn = layer.self_attn
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
        plan: dict[str, object] = {
            # All-gather (SP) or mark-as-replicated (TP) the input once for q, k and v:
            # then backward sums the three input gradients as one Partial DTensor and
            # does one reduce-scatter / all-reduce instead of three.
            "self_attn": PrepareModuleInput(
                input_layouts=(stream, None, None),
                desired_input_layouts=(Replicate(), None, None),
                use_local_output=False,
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(
                output_layouts=stream, use_local_output=not sp),
            "mlp": PrepareModuleInput(
                input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_output=False),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(
                output_layouts=stream, use_local_output=not sp),
        }
        norm_style = SequenceParallel if sp else _ReplicateParallel
        plan["input_layernorm"] = norm_style()
        plan["post_attention_layernorm"] = norm_style()
        put(layer, plan)

    if inner.norm is not None:
        put(inner.norm, SequenceParallel() if sp else _ReplicateParallel())
    if model.lm_head is not None:
        put(model.lm_head, ColwiseParallel(
            input_layouts=stream, output_layouts=Shard(-1), use_local_output=False))
    elif model.has_head:
        # Tied head: forward computes F.linear(h, embed_tokens.weight) with the
        # vocab-sharded weight; hand it a replicated DTensor so the logits come out
        # Shard(-1) like the untied head's.
        put(inner, PrepareModuleOutput(
            output_layouts=(stream,), desired_output_layouts=(Replicate(),), use_local_output=False))
    elif sp:
        # A stage without head returns its local sequence chunk (a plain tensor).
        put(inner, PrepareModuleOutput(
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True))

    for param in model.parameters():
        if isinstance(param, DTensor):
            param.register_post_accumulate_grad_hook(_match_param_placements)


def _vocab_parallel_ce_sum(local_logits: torch.Tensor, targets: torch.Tensor, mesh: DeviceMesh,
                           vocab: int) -> torch.Tensor:
    flat = local_logits.reshape(-1, local_logits.shape[-1])
    # Explicit global shape: the vocab shards may be uneven (259 = 130 + 129).
    dlogits = DTensor.from_local(flat, mesh, (Shard(1),), run_check=False,
                                 shape=torch.Size((flat.shape[0], vocab)), stride=(vocab, 1))
    with loss_parallel():
        loss = F.cross_entropy(dlogits, targets.reshape(-1), reduction="sum")
    return loss.to_local()  # Replicate: the full sum on every rank


class _LossParallelSum(torch.autograd.Function):
    """``loss_parallel`` cross-entropy whose backward runs wherever ``backward()`` is called.

    ``loss_parallel`` swaps in DTensor's vocab-parallel log-softmax / nll handlers only
    while its context is open, and the backward must run inside it too (outside it,
    ``nll_loss_backward`` fails with "got mixed torch.Tensor and DTensor"); a training
    loop calls ``backward()`` elsewhere. So the loss is built on a detached leaf here and
    its graph is run backward under the context in ``backward``.
    """

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, targets: torch.Tensor, mesh: DeviceMesh,
                vocab: int) -> torch.Tensor:
        with torch.enable_grad():
            leaf = local_logits.detach().requires_grad_()
            loss = _vocab_parallel_ce_sum(leaf, targets, mesh, vocab)
        ctx.leaf, ctx.loss = leaf, loss
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        leaf, loss = ctx.leaf, ctx.loss
        del ctx.leaf, ctx.loss
        with loss_parallel():
            (local_grad,) = torch.autograd.grad(loss, leaf, grad)
        return local_grad, None, None, None


def tp_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over tokens (``reduction="sum"``), as a plain fp32 scalar.

    ``logits`` ``[b, s, vocab]`` is the head's output: a DTensor sharded on the vocab
    dim (TP), or a plain tensor (no TP). ``targets`` ``[b, s]`` are the next tokens
    (already shifted, as ``TokenWindows`` yields them). With TP the result is equal on
    every TP rank and no rank ever holds the full logits; ``backward()`` works outside
    any context manager.
    """
    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum")
    if logits.device_mesh.ndim != 1 or logits.placements != (Shard(logits.ndim - 1),):
        raise ValueError(f"tp_loss_sum expects logits sharded on the vocab dim of a 1-D mesh, "
                         f"got placements {logits.placements} on a {logits.device_mesh.ndim}-D mesh")
    if isinstance(targets, DTensor):
        targets = targets.full_tensor()
    local = logits.to_local().float()
    vocab = logits.shape[-1]
    if not (torch.is_grad_enabled() and local.requires_grad):
        # Evaluation: nothing to run backward, so no wrapper and no second graph.
        return _vocab_parallel_ce_sum(local.detach(), targets, logits.device_mesh, vocab)
    return _LossParallelSum.apply(local, targets, logits.device_mesh, vocab)


def _grad_power_sum(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    g = grad.detach().float()
    if math.isinf(norm_type):
        return g.abs().max() if g.numel() else torch.zeros((), dtype=torch.float32, device=g.device)
    return g.abs().pow(norm_type).sum()


@torch.no_grad()
def global_grad_norm(
    params: Iterable[torch.Tensor],
    *,
    groups: Sequence[dist.ProcessGroup | None] = (),
    norm_type: float = 2.0,
) -> torch.Tensor:
    """The norm of the whole model's gradient, of which ``params`` are this rank's part.

    DTensor gradients count each shard once over their own mesh (tp): a replicated one is
    counted by the mesh's first rank only, a Partial one is reduced first. Plain
    gradients count as this rank's own. The per-rank sums are then added over each
    process group in ``groups``: the groups across which ranks hold *different*
    parameters or shards, i.e. pp and ZeRO's dp_shard; never tp (DTensor covers it) nor
    data-parallel replicas (that would count a copy twice). Returns a plain fp32 scalar,
    equal on every rank that took part. One collective per distinct mesh and per group.
    """
    inf = math.isinf(norm_type)
    plain: list[torch.Tensor] = []
    by_mesh: dict[DeviceMesh, list[torch.Tensor]] = {}
    device = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            device = device or g.to_local().device
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl
                                                   for pl in g.placements])
            coord = g.device_mesh.get_coordinate()
            # A replicated mesh dim holds copies: count them on coordinate 0 only.
            if coord is not None and all(c == 0 for c, pl in zip(coord, g.placements, strict=True)
                                         if pl.is_replicate()):
                by_mesh.setdefault(g.device_mesh, []).append(_grad_power_sum(g.to_local(), norm_type))
            else:
                by_mesh.setdefault(g.device_mesh, [])
        else:
            device = device or g.device
            plain.append(_grad_power_sum(g, norm_type))
    device = device or torch.device("cpu")

    def combine(values: list[torch.Tensor]) -> torch.Tensor:
        if not values:
            return torch.zeros((), dtype=torch.float32, device=device)
        stacked = torch.stack([v.to(device) for v in values])
        return stacked.max() if inf else stacked.sum()

    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    total = combine(plain)
    for mesh, values in by_mesh.items():
        part = combine(values)
        for dim in range(mesh.ndim):
            waits.wait(dist.all_reduce(part, op=op, group=mesh.get_group(dim), async_op=True),
                       op="norm")
        total = torch.maximum(total, part) if inf else total + part
    for group in groups:
        # Through `waits`: a peer that left the generation must not keep this rank here.
        waits.wait(dist.all_reduce(total, op=op, group=group, async_op=True), op="norm")
    return total if inf else total.pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_global_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    *,
    groups: Sequence[dist.ProcessGroup | None] = (),
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Scale gradients in place so their ``global_grad_norm`` is at most ``max_norm``.

    Returns the norm before clipping (plain fp32 scalar, equal on all ranks); a
    non-finite norm leaves the gradients untouched (the step is skipped anyway).
    """
    params = list(params)
    total = global_grad_norm(params, groups=groups, norm_type=norm_type)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0 and math.isfinite(float(total)):
        for p in params:
            if p.grad is not None:
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                local.mul_(coef)
    return total
