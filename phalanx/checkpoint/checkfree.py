"""CheckFree and CheckFree+: rebuild a pipeline stage that has no copy anywhere from its neighbours.

Blagoev, Ersoy and Chen, "All is Not Lost: LLM Recovery without Checkpoints" (arXiv 2506.15461),
read together with the authors' simulation code (github.com/gensyn-ai/CheckFree,
``simulate_training/convergence_training*.py``). What the paper does:

- **CheckFree.** When intermediate stage ``i`` is lost, its weights become the average of its two
  neighbours weighted by their gradient norms at the last optimizer step::

      W_i = (a * W_{i-1} + b * W_{i+1}) / (a + b),   a = |g_{i-1}| + 1e-4,   b = |g_{i+1}| + 1e-4

  The neighbour with the *larger* gradient norm weighs more; 1e-4 keeps two zero norms divisible.
  Stages are averaged key by key, i.e. the k-th layer of each neighbour makes the k-th layer of
  the lost stage. The rebuilt stage gets a fresh optimizer (no moments, step 0, so Adam's bias
  correction restarts) whose learning rate is ``LR_SCALE`` times the base rate from then on: the
  paper says 1.1 (the authors' 124M config uses 1.1, their 500M config 1.2). The scale is taken
  relative to the base rate, so a second recovery of the same stage does not compound it. The
  first and last stages have one neighbour and cannot be averaged (the authors fall back to a
  stale per-stage checkpoint for them).
- **CheckFree+.** Every other micro-batch (the odd ones) runs with the first two and the last two
  stages swapped, so stage 1 learns to do stage 0's job and stage n-2 stage n-1's. A lost end
  stage is then rebuilt by copying its swap partner; the (de)embedding, which the partner lacks,
  is kept as a copy on the neighbour ("mirrored"). Rebuilt stages get the same fresh optimizer.

Where phalanx differs, and why:

- **Layout.** The authors' stage 0 holds only the embedding and the head and never fails; here
  stage 0 is embedding + layers and stage n-1 is layers + final norm + ``lm_head``, so those two
  can fail too. The mirrors (``mirror_keys``) are the embedding on stage 1 and the final norm and
  head on stage n-2; ``copy_stage`` puts them back. A mirror holds weights only: the rebuilt stage
  still gets a fresh optimizer, as every rebuilt stage does in the paper.
- **Which stages copy.** The authors' CheckFree+ code copies the swap partner for stages 1 and
  n-2 as well; here (as the issue specifies) only the end stages copy and every intermediate
  stage is averaged (``recovery_plan``).
- **Gradient norm.** The authors clip each stage to norm 1 separately and weight by the clipped
  per-stage norm, which makes both weights 1 whenever both neighbours exceed 1. phalanx clips by
  the global norm, so the per-stage norm after clipping is the raw norm times one common factor:
  the two weights keep the ratio of the raw norms.
- **Names.** Stages hold Hugging Face names with *global* layer ids (``model.layers.5.mlp...``);
  the neighbours' layers are matched to the lost stage's by position within the stage.

Everything here is a pure function of tensors and plans, except ``fresh_optimizer_``, which edits
a torch optimizer (and LR scheduler) in place so that live views of its state stay valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "EMBED_KEYS",
    "HEAD_KEYS",
    "LR_SCALE",
    "NORM_EPS",
    "RecoveryPlan",
    "checkfree_plus_routes",
    "copy_stage",
    "fresh_optimizer_",
    "layer_ids_of",
    "mirror_holder",
    "mirror_keys",
    "neighbour_weights",
    "reconstruct_stage",
    "recovery_plan",
    "relabel_layers",
    "swap_partner",
]

LR_SCALE = 1.1  # the paper's learning-rate multiplier for a rebuilt stage
NORM_EPS = 1e-4  # added to each gradient norm (authors' code) so two zero norms still divide
EMBED_KEYS = ("model.embed_tokens.weight",)
HEAD_KEYS = ("model.norm.weight", "lm_head.weight")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
Params = Mapping[str, torch.Tensor]


def layer_ids_of(params: Params) -> list[int]:
    """The global layer ids present in a stage's state dict, ascending."""
    return sorted({int(m.group(1)) for name in params if (m := _LAYER.match(name))})


def relabel_layers(params: Params, dst_layer_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The layer tensors of `params` renamed position by position onto `dst_layer_ids` (the k-th
    layer of the source becomes layer ``dst_layer_ids[k]``), as new tensors. Non-layer entries
    (embedding, final norm, head) are left out."""
    src = layer_ids_of(params)
    if len(src) != len(dst_layer_ids):
        raise ValueError(f"cannot map {len(src)} layers {src} onto {len(dst_layer_ids)} layers "
                         f"{list(dst_layer_ids)}: CheckFree needs stages with equal layer counts")
    rename = dict(zip(src, dst_layer_ids, strict=True))
    out: dict[str, torch.Tensor] = {}
    for name, t in params.items():
        if m := _LAYER.match(name):
            out[f"model.layers.{rename[int(m.group(1))]}.{m.group(2)}"] = t.detach().clone()
    return out


def neighbour_weights(prev_grad_norm: float, next_grad_norm: float) -> tuple[float, float]:
    """Normalised CheckFree weights (of the previous, of the next stage): each neighbour weighs
    in proportion to its last gradient norm plus ``NORM_EPS``."""
    a, b = abs(float(prev_grad_norm)) + NORM_EPS, abs(float(next_grad_norm)) + NORM_EPS
    return a / (a + b), b / (a + b)


@torch.no_grad()
def reconstruct_stage(prev_params: Params, next_params: Params, prev_grad_norm: float,
                      next_grad_norm: float, lost_layer_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """CheckFree: the lost intermediate stage's layers as the gradient-norm-weighted average of
    its neighbours' layers, named with the lost stage's global layer ids.

    `prev_params` / `next_params` are the neighbours' state dicts (HF names, global ids; extra
    entries such as an embedding are ignored) and their gradient norms at the last optimizer
    step. Averaging is done in fp32 and cast back to each tensor's dtype."""
    wp, wn = neighbour_weights(prev_grad_norm, next_grad_norm)
    p = relabel_layers(prev_params, lost_layer_ids)
    n = relabel_layers(next_params, lost_layer_ids)
    if p.keys() != n.keys():
        raise ValueError(f"neighbour stages hold different tensors: {sorted(p.keys() ^ n.keys())}")
    out = {}
    for k in p:
        if p[k].shape != n[k].shape:
            raise ValueError(f"{k}: neighbour shapes differ ({tuple(p[k].shape)} vs {tuple(n[k].shape)})")
        out[k] = (wp * p[k].float() + wn * n[k].float()).to(p[k].dtype)
    return out


def swap_partner(stage: int, n_stages: int) -> int | None:
    """The stage that CheckFree+ swaps `stage` with (0<->1, n-2<->n-1), or None."""
    _check_plus(n_stages)
    return {0: 1, 1: 0, n_stages - 2: n_stages - 1, n_stages - 1: n_stages - 2}.get(stage)


def checkfree_plus_routes(n_microbatches: int, n_stages: int) -> tuple[tuple[int, ...], ...]:
    """Per-micro-batch stage order for CheckFree+: even micro-batches run 0..n-1, odd ones run
    with stages 0<->1 and n-2<->n-1 swapped (n_microbatches // 2 of them, as in the authors'
    code). A micro-batch embeds on the first stage of its route and meets the head on the last,
    which is why the embedding and head are mirrored on stage 1 and stage n-2."""
    _check_plus(n_stages)
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches={n_microbatches} must be >= 1")
    plain = tuple(range(n_stages))
    swapped = tuple(swap_partner(s, n_stages) if swap_partner(s, n_stages) is not None else s
                    for s in plain)
    return tuple(swapped if mb % 2 else plain for mb in range(n_microbatches))


def _check_plus(n_stages: int) -> None:
    # With 2 or 3 stages the two swaps overlap and the swapped order is no longer "the ends
    # exchanged with their neighbours".
    if n_stages < 4:
        raise ValueError(f"CheckFree+ swaps the first two and the last two stages, which needs at "
                         f"least 4 stages (got {n_stages}); use CheckFree or more stages")


def mirror_holder(stage: int, n_stages: int) -> int | None:
    """The stage that keeps a copy of `stage`'s embedding (stage 1 for 0) or head (n-2 for n-1)."""
    return {0: 1, n_stages - 1: n_stages - 2}.get(stage) if n_stages >= 2 else None


def mirror_keys(stage: int, n_stages: int) -> tuple[str, ...]:
    """Names of the tensors of `stage` that CheckFree+ mirrors on `mirror_holder(stage)`."""
    keys = ()
    if stage == 0:
        keys += EMBED_KEYS
    if stage == n_stages - 1:
        keys += HEAD_KEYS
    return keys


@torch.no_grad()
def copy_stage(src_params: Params, lost_layer_ids: Sequence[int],
               mirror: Params | None = None) -> dict[str, torch.Tensor]:
    """CheckFree+: a lost end stage as a copy of its swap partner's layers (renamed onto the lost
    stage's layer ids) plus the mirrored embedding or head tensors in `mirror`, copied as-is."""
    out = relabel_layers(src_params, lost_layer_ids)
    for k, t in (mirror or {}).items():
        out[k] = t.detach().clone()
    return out


@dataclass(frozen=True)
class RecoveryPlan:
    """How to rebuild a lost stage: ``kind`` is "average" (sources = (prev, next)), "copy"
    (sources = (partner,), plus the mirror held by ``mirror_from``) or "none" (CheckFree cannot
    rebuild an end stage: fall back to a checkpoint)."""

    kind: str
    sources: tuple[int, ...] = ()
    mirror_from: int | None = None


def recovery_plan(stage: int, n_stages: int, *, plus: bool) -> RecoveryPlan:
    """Which neighbours rebuild `stage` under CheckFree (`plus=False`) or CheckFree+."""
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} out of range [0, {n_stages})")
    if 0 < stage < n_stages - 1:
        return RecoveryPlan("average", (stage - 1, stage + 1))
    if not plus:
        return RecoveryPlan("none")
    partner = swap_partner(stage, n_stages)
    assert partner is not None
    return RecoveryPlan("copy", (partner,), mirror_from=mirror_holder(stage, n_stages))


@torch.no_grad()
def fresh_optimizer_(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *,
                     base_lr: float, lr_scale: float = LR_SCALE,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Give the rebuilt stage's parameters a fresh optimizer inside `optimizer`: every state
    tensor (moments, step) zeroed in place, and the learning rate of their parameter groups set
    to ``lr_scale * base_lr`` times the schedule's current factor (in `scheduler` too, so it
    stays that way). `base_lr` is the unscaled rate, so repeated recoveries do not compound.

    Every parameter group that holds one of `params` must hold only such parameters (the rate
    is per group): build the stage's groups apart from other stages'."""
    lost = {id(p) for p in params}
    for p in (q for g in optimizer.param_groups for q in g["params"] if id(q) in lost):
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                v.zero_()
    new_base = base_lr * lr_scale
    for i, g in enumerate(optimizer.param_groups):
        mine = [id(q) in lost for q in g["params"]]
        if not any(mine):
            continue
        if not all(mine):
            raise ValueError(f"parameter group {i} mixes parameters of the rebuilt stage with "
                             "others; give the stage its own parameter groups")
        old_base = scheduler.base_lrs[i] if scheduler is not None else g.get("initial_lr", g["lr"])
        g["lr"] = g["lr"] * new_base / old_base
        g["initial_lr"] = new_base
        if scheduler is not None:
            scheduler.base_lrs[i] = new_base
