"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): DiLoCo one fragment at a time,
overlapped with training, quantized on the wire.

- Fragments. The model's blocks are dealt out strided, block i to fragment i mod P (the
  paper's better pattern: every fragment spans the depth); the embedding goes with block 0,
  the final norm and the head with the last block. A rank holds the fragments of its own
  layers only (a pipeline stage); an exchange it has nothing for is skipped, and so it is
  on its replicas, which hold the same layers.
- Schedule. Each fragment syncs once every H inner steps, staggered: with h = H / P, a
  fragment completes an outer step every h steps, in turn 0, 1, ..., P-1, so the bytes of
  one sync are ~1/P of DiLoCo's.
- Overlap. A fragment's pseudo-gradient Δ = θ_global − θ_local is taken τ steps before its
  sync (`overlap_steps`) and its average goes out asynchronously; τ more inner steps run
  meanwhile; then the outer step (Nesterov SGD) updates the fragment's global parameters and
  the local ones are merged: θ_local ← α θ_local + (1 − α) θ_global (α = `mixing`; 0 takes
  the global parameters, as DiLoCo does).
- Quantization. Δ crosses the link as int8/fp8/fp4 with per-block scales and is summed in
  fp32 (`Link.mean`).

With P = 1, τ = 0, α = 0 and no quantization this is DiLoCo step for step (a test holds it).
On the last step (`final`) the fragment in flight completes early and every fragment that
did not just sync does a last blocking sync (one exchange each: the peak stays a
fragment's), with α = 0, so the run ends with every replica on the global model.
"""

from __future__ import annotations

import re

import torch

from phalanx.parallel.lowcomm.base import OuterOptimizer, flat_of, unflat
from phalanx.parallel.lowcomm.link import Link, Pending

__all__ = ["StreamingDiLoCo", "fragment_of"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def fragment_of(name: str, *, num_layers: int, fragments: int) -> int:
    """Fragment of a parameter by its name: block i -> i mod P; embedding -> block 0's;
    everything after the blocks (final norm, head) -> the last block's."""
    m = _LAYER.search(name)
    if m:
        layer = int(m.group(1))
    elif "embed" in name:
        layer = 0
    else:
        layer = num_layers - 1
    return layer % fragments


class StreamingDiLoCo(OuterOptimizer):
    method = "streaming_diloco"

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, link: Link, sync_every: int,
                 fragments: int, num_layers: int, overlap_steps: int = 0, mixing: float = 0.0,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 quantize: str = "none", quant_block: int = 128) -> None:
        super().__init__(named, link=link)
        if sync_every % fragments:
            raise ValueError(f"sync_every={sync_every} must be a multiple of fragments={fragments}")
        self.every = sync_every // fragments  # h: steps between two fragments' syncs
        if not 0 <= overlap_steps < self.every:
            raise ValueError(f"overlap_steps={overlap_steps} must be in [0, sync_every/fragments"
                             f" = {self.every}): a fragment completes before the next one starts")
        self.n_fragments, self.overlap, self.mixing = fragments, overlap_steps, mixing
        self.fmt, self.block = quantize, quant_block
        frag = [fragment_of(n, num_layers=num_layers, fragments=fragments) for n in self.names]
        self.members = [[i for i, f in enumerate(frag) if f == k] for k in range(fragments)]
        self.global_params = [p.detach().clone().float() for p in self.params]
        self.outer = self._outer_sgd(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=nesterov)
        self.pending: tuple[int, Pending | None] | None = None  # (fragment, exchange in flight)
        self.last_sync = [-1] * fragments  # the step count n at each fragment's last sync

    def _fragment_for(self, n: int) -> int:
        """The fragment whose sync completes at inner step count n (a multiple of h)."""
        return (n // self.every - 1) % self.n_fragments

    @torch.no_grad()
    def after_inner_step(self, step: int, *, final: bool = False) -> None:
        n = step + 1
        if (n + self.overlap) % self.every == 0:
            self._start(self._fragment_for(n + self.overlap))
        if n % self.every == 0 and self.pending is None:
            # The exchange started before a recovery rebuilt this optimizer was abandoned
            # with the old groups: redo it now, without overlap.
            self._start(self._fragment_for(n))
        if n % self.every == 0 or (final and self.pending is not None):
            self._complete(n, mixing=0.0 if final else self.mixing)
        if final:
            for k in range(self.n_fragments):
                if self.last_sync[k] != n:
                    self._start(k)
                    self._complete(n, mixing=0.0)

    def _start(self, k: int) -> None:
        assert self.pending is None, "one fragment in flight at a time"
        idx = self.members[k]
        if not idx:
            self.pending = (k, None)  # nothing of fragment k on this rank (nor its replicas)
            return
        delta = (flat_of([self.global_params[i] for i in idx])
                 - flat_of([self.params[i] for i in idx]))
        self.pending = (k, self.link.mean(delta, fmt=self.fmt, block=self.block))

    def _complete(self, n: int, *, mixing: float) -> None:
        assert self.pending is not None
        k, exchange = self.pending
        self.pending = None
        self.last_sync[k] = n
        if exchange is None:
            return
        idx = self.members[k]
        gp = [self.global_params[i] for i in idx]
        for g, d in zip(gp, unflat(exchange.wait(), gp), strict=True):
            g.grad = d
        self.outer.step()  # parameters of other fragments have no gradient: untouched
        self.outer.zero_grad(set_to_none=True)
        for i in idx:
            p, g = self.params[i], self.global_params[i]
            if mixing:
                p.mul_(mixing).add_(g, alpha=1.0 - mixing)
            else:
                p.copy_(g)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._global_state(self.global_params, self.outer)
