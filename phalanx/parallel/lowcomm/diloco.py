"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): local inner steps, an outer step on the
replicas' averaged pseudo-gradient every H steps.

    every H-th inner step:   Δ_m = θ_global − θ_m                 (this replica's drift)
                             Δ = mean_m Δ_m                       (one all-reduce)
                             θ_global ← OuterSGD(θ_global, Δ)     (Nesterov, lr 0.7, mom 0.9)
                             θ_m ← θ_global

The outer optimizer is torch's SGD on fp32 copies of the global parameters, with Δ as their
gradient. The inner optimizer (AdamW) and its state stay per replica. On the last step
(`final`) a partial round still syncs, so the run ends with every replica on the global model.
"""

from __future__ import annotations

import torch

from phalanx.parallel.lowcomm.base import OuterOptimizer, flat_of, unflat
from phalanx.parallel.lowcomm.link import Link

__all__ = ["DiLoCo"]


class DiLoCo(OuterOptimizer):
    method = "diloco"

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, link: Link, sync_every: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 quantize: str = "none", quant_block: int = 128) -> None:
        super().__init__(named, link=link)
        self.sync_every = sync_every
        self.fmt, self.block = quantize, quant_block
        self.global_params = [p.detach().clone().float() for p in self.params]
        self.outer = self._outer_sgd(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=nesterov)

    @torch.no_grad()
    def after_inner_step(self, step: int, *, final: bool = False) -> None:
        if (step + 1) % self.sync_every == 0 or final:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        delta = flat_of(self.global_params) - flat_of(self.params)
        delta = self.link.mean(delta, fmt=self.fmt, block=self.block).wait()
        for g, d in zip(self.global_params, unflat(delta, self.global_params), strict=True):
            g.grad = d
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        self._take_global()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._global_state(self.global_params, self.outer)
