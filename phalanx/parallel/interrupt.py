"""Leave an abandoned step at the next layer boundary instead of at its next collective.

When the controller publishes a new generation, a survivor in the middle of its forward or
backward would otherwise compute the rest of a step whose gradients can never be reduced
(a peer is gone) before its next wait notices (`waits`): up to a whole step of recovery time.
Every decoder layer gets a forward pre-hook that asks the worker's abort check (the same one
`waits` polls) and raises `StepAborted`, and a hook on its input's gradient that asks again
during the backward; raising there ends `backward()` with that error (autograd propagates
exceptions from hooks). The check is a dict lookup kept current by the worker's generation
watch thread: the hooks cost nothing measurable per layer.

Installed only where a check is set (workers); tests and benchmarks without one run plain.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from phalanx.parallel import waits

__all__ = ["install"]


def _stop_if_aborted() -> None:
    if waits.aborting():
        raise waits.StepAborted("a new generation started: this step is abandoned")


def _forward_pre(_module: nn.Module, args: tuple) -> None:
    _stop_if_aborted()
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad:
        x.register_hook(_backward)


def _backward(grad: torch.Tensor) -> None:
    _stop_if_aborted()


def install(modules: Iterable[nn.Module]) -> int:
    """Hook every decoder layer of `modules` (no-op without an abort check). Returns how many
    layers were hooked."""
    if not waits.has_abort_check():
        return 0
    from phalanx.models.llama import LlamaDecoderLayer

    n = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, LlamaDecoderLayer):
                m.register_forward_pre_hook(_forward_pre)
                n += 1
    return n
