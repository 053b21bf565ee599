"""Activation recomputation per decoder block (`parallel.recompute=none|selective|full`).

full: a block keeps only its input; everything inside is recomputed in backward.
selective: only the attention sub-block is recomputed (Korthikanti et al. 2022 recompute
the attention core, whose activations grow with seq_len^2 without a fused kernel).
Forwards are wrapped in place rather than with `checkpoint_wrapper` so parameter
names stay Hugging Face's (checkpoints and tests key on them).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from phalanx.models.llama import LlamaDecoderLayer

MODES = ("none", "selective", "full")


def _wrap(module: nn.Module) -> None:
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def apply_recompute(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    for block in model.modules():
        if isinstance(block, LlamaDecoderLayer):
            _wrap(block if mode == "full" else block.self_attn)
