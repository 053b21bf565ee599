"""One flat buffer for many tensors: a single collective or point-to-point message instead of
one per tensor (each gloo message pays its own latency), and the values copied back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["copy_back", "flatten"]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, concatenated (same dtype)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def copy_back(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` into `tensors`, in order (the inverse of `flatten`)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
