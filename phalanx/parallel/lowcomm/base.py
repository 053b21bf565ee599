"""What every outer optimizer shares: the parameters it owns, its link, its integration surface.

The trainer's whole contract (in the spirit of torchft's optimizer wrapper):

    outer = build_outer(run, named_params=..., link=...)   # once, after the inner optimizer
    ...
    inner_optimizer.step()                                  # every step, as before
    outer.after_inner_step(step, final=last_step)           # every step, skipped or not
    record.update(outer.take_metrics())                     # the step's bytes and waits

Between outer steps each replica trains alone with its own inner optimizer (and its own
inner optimizer state, never exchanged); the per-step data-parallel gradient all-reduce
across replicas is off. `step` is the global step index, so every replica (and a restarted
one) agrees on when to sync without talking.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from phalanx.parallel.lowcomm.link import Link

__all__ = ["OuterOptimizer", "local_view"]


def local_view(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of parameter `p` (its shard under tensor parallelism)."""
    return p._local_tensor if isinstance(p, DTensor) else p.data


def flat_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off = [], 0
    for t in like:
        out.append(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
    return out


class OuterOptimizer:
    """Base: `named` are this rank's (name, parameter) pairs, `link` its replicas' group."""

    method = "none"

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, link: Link) -> None:
        self.names = [n for n, _ in named]
        self.params = [local_view(p) for _, p in named]
        self._orig = [p for _, p in named]
        self.link = link

    def after_inner_step(self, step: int, *, final: bool = False) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def rejoin(self) -> None:
        """A newcomer (a lost replica's replacement, or a replica the run grows by) has its
        source replica's state, local model included; it starts from the global model
        instead, so that the source's drift since the last outer step is not counted twice
        at the next one (its samples are re-queued: lowcomm/requeue.py)."""
        self._take_global()

    def _take_global(self) -> None:
        """The local model becomes the outer (global) one, as after an outer step."""
        for p, g in zip(self.params, self.global_params, strict=True):
            p.copy_(g)

    def take_metrics(self) -> dict[str, Any]:
        return self.link.take_step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The outer state as live tensors under parameter names (`<kind>/<param>`), each
        shaped and placed like its parameter (a DTensor under tensor parallelism). The
        trainer's state (phalanx/checkpoint/state.py) carries them as lowcomm/..., so
        checkpoints, a survivor's carried state and a replica's transfer to a newcomer
        include the global model and the outer momentum."""
        raise NotImplementedError

    def _like_params(self, kind: str, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, p, t in zip(self.names, self._orig, tensors, strict=True):
            if isinstance(p, DTensor):
                t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            out[f"{kind}/{name}"] = t
        return out

    def digest(self) -> str | None:
        """SHA-256 of the outer state; equal on every replica of a shard when the method
        keeps one global model (DiLoCo, Streaming DiLoCo). None when replicas differ by
        design (NoLoCo)."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_tensors().items()):
            t = t.to_local() if isinstance(t, DTensor) else t
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        # The model itself: after the final sync every replica's parameters are the global ones.
        for name, p in zip(self.names, self.params, strict=True):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def _outer_sgd(tensors: list[torch.Tensor], *, lr: float, momentum: float,
                   nesterov: bool) -> torch.optim.SGD:
        """torch's SGD over the global copies, its momentum buffers made up front (zeros: the
        first step then gives exactly the buffer SGD would clone from the gradient), so that
        the state has tensors to carry or load before the first outer step."""
        opt = torch.optim.SGD(tensors, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        if momentum > 0:
            for g in tensors:
                opt.state[g]["momentum_buffer"] = torch.zeros_like(g)
        return opt

    def _global_state(self, global_params: list[torch.Tensor],
                      opt: torch.optim.SGD) -> dict[str, torch.Tensor]:
        out = self._like_params("global", global_params)
        bufs = [opt.state[g].get("momentum_buffer") for g in global_params]
        if all(b is not None for b in bufs):
            out.update(self._like_params("momentum", bufs))
        return out
