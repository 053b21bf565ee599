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
        self.link = link

    def after_inner_step(self, step: int, *, final: bool = False) -> None:
        raise NotImplementedError

    def take_metrics(self) -> dict[str, Any]:
        return self.link.take_step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The outer state (names -> tensors) that replicas hold in common."""
        raise NotImplementedError

    def digest(self) -> str | None:
        """SHA-256 of the outer state; equal on every replica of a shard when the method
        keeps one global model (DiLoCo, Streaming DiLoCo). None when replicas differ by
        design (NoLoCo)."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_tensors().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        # The model itself: after the final sync every replica's parameters are the global ones.
        for name, p in zip(self.names, self.params, strict=True):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def _momentum(self, opt: torch.optim.Optimizer, tensors: list[torch.Tensor],
                  prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, g in zip(self.names, tensors, strict=True):
            buf = opt.state.get(g, {}).get("momentum_buffer")
            out[f"{prefix}/{name}"] = buf if buf is not None else torch.zeros_like(g)
        return out
