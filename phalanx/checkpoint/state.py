"""A trainer's state under layout-free names: what a checkpoint saves and a load fills.

Names are the model's own (Hugging Face Llama names, global layer ids) so that
the same checkpoint loads onto any dp / pp / tp / ZeRO layout:

    model/<param>                       parameter
    optim/<param>/exp_avg, exp_avg_sq   AdamW moments
    optim/step                          AdamW's step count (all parameters step together)
    trainer/step                        optimizer steps completed (= next step to run)
    rng/rank<r>                         torch's CPU RNG state of rank r (same layout only)
    model/mirror.<param>, optim/mirror.<param>/...
                                        CheckFree+ mirrors of the embedding / head held by
                                        stage 1 / S-2 (equal to the owner's tensors)
    lowcomm/<kind>/<param>              the outer optimizer's state (lowcomm.method):
                                        global/ and momentum/ (DiLoCo, Streaming DiLoCo),
                                        phi/ and delta/ (NoLoCo)

The values are live tensors (views, no copies): plain tensors where this rank
holds the whole parameter (DDP, pipeline stages, ZeRO-1/2 parameters), DTensors
under tensor parallelism (DCP's own resharding), and `Boxes` for the ZeRO
shards, which are flat ranges across a group of parameters. The learning-rate
schedule is a pure function of the step and is rebuilt from `trainer/step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from phalanx.checkpoint.boxes import Boxes

__all__ = ["MIRROR_PREFIX", "STEP_KEY", "optimizer_state_init", "restore_after_load", "trainer_state"]

STEP_KEY = "trainer/step"
MIRROR_PREFIX = "mirror."


def _adam_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    st = opt.state[p]
    if not st:
        raise RuntimeError("optimizer state not initialised: call optimizer_state_init first")
    return st


def optimizer_state_init(opt: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state (zeros, step 0) as its first step would, so a load
    has tensors to fill in place and a snapshot before the first step has something to copy."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _named_modules(trainer: Any) -> Iterator[nn.Module]:
    if hasattr(trainer, "stages"):
        yield from trainer.stages.values()
    else:
        yield trainer.model


def trainer_state(trainer: Any, *, step: int, with_rng: bool = True) -> dict[str, Any]:
    """The state of a DataParallelTrainer or PipelineTrainer (torch backend) as live views."""
    opt = trainer.optimizer
    optimizer_state_init(opt)
    out: dict[str, Any] = {}
    zero = getattr(trainer, "zero", {}) or {}
    step_src: torch.Tensor | None = None
    for s, module in (trainer.stages.items() if hasattr(trainer, "stages")
                      else [(None, trainer.model)]):
        z = zero.get(s) if s is not None else None
        if z is None:
            mirrors = getattr(module, "mirror_names", ())
            for name, p in module.named_parameters():
                st = _adam_state(opt, p)
                # A CheckFree+ mirror is a second copy of another stage's tensor: its own
                # name keeps the two apart in a checkpoint (export leaves mirrors out).
                name = f"{MIRROR_PREFIX}{name}" if name in mirrors else name
                out[f"model/{name}"] = p.data if not isinstance(p, DTensor) else p.detach()
                out[f"optim/{name}/exp_avg"] = st["exp_avg"]
                out[f"optim/{name}/exp_avg_sq"] = st["exp_avg_sq"]
                step_src = st["step"]
            continue
        for g, _wd in z.groups:
            st = _adam_state(opt, g.shard)
            step_src = st["step"]
            for sl in g.slices():
                part = slice(sl.shard_offset, sl.shard_offset + sl.stop - sl.start)
                if z.zero_stage == 3:
                    out[f"model/{sl.name}"] = Boxes.from_flat(sl.shape, g.shard.data[part], sl.start)
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"optim/{sl.name}/{key}"] = Boxes.from_flat(sl.shape, st[key][part], sl.start)
            if z.zero_stage < 3:
                # Parameters are whole on every rank (views of the full buffer).
                for (name, p), _shape in zip(g.named, g.shapes, strict=True):
                    out[f"model/{name}"] = p.data
    out["optim/step"] = step_src if step_src is not None else torch.tensor(0.0)
    lowcomm = getattr(trainer, "lowcomm", None)
    if lowcomm is not None:
        out.update({f"lowcomm/{k}": v for k, v in lowcomm.state_tensors().items()})
    out[STEP_KEY] = torch.tensor(step, dtype=torch.int64)
    if with_rng:
        out[f"rng/rank{trainer.rank}"] = torch.get_rng_state()
    return out


def restore_after_load(trainer: Any, state: dict[str, Any]) -> int:
    """After `state` (from `trainer_state`) was filled by a load: spread the optimizer step to
    every parameter, restore RNG, rebuild the LR schedule; ZeRO-3 needs nothing else (its
    shards were filled in place) and ZeRO-1/2 parameters are whole. Returns the step."""
    step = int(state[STEP_KEY])
    opt = trainer.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["step"].copy_(state["optim/step"])
    rng = state.get(f"rng/rank{trainer.rank}")
    if rng is not None:
        torch.set_rng_state(rng)
    sched = trainer.scheduler
    sched.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        sched.step()
    return step
