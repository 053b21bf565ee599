"""What every trainer shares: the data split, the sampler, autocast, and the step's agreement.

A trainer (DDP, pipeline/TP/ZeRO, DeepSpeed) differs in how it computes
gradients; all of them read the same windows in the same order, scale the loss
the same way (token-summed / global token count) and end a step with the same
small all-reduce that makes every rank take the same loss, skip and stop decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from phalanx.config import RunConfig
from phalanx.data import GlobalBatchSampler, TokenWindows, train_val_split
from phalanx.parallel import waits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    step_time_s: float
    skipped: bool
    stop: bool
    sample_ids: list[int] = field(default_factory=list)


def seed_everything(seed: int, rank: int) -> None:
    # Per-rank streams (dropout, sampling) differ by rank; model init uses `seed` alone
    # so every replica starts identical without relying on a broadcast.
    torch.manual_seed(seed * 1_000_003 + rank)
    np.random.seed((seed * 1_000_003 + rank) % 2**32)


class TrainerBase:
    run: RunConfig
    device: torch.device
    # Set by the worker: called as gate(step, finite=...) after the agreement and before the
    # optimizer step; returns when the controller committed the step (DESIGN.md invariant 1)
    # and raises when the step is abandoned. None: no gate (tests, benchmarks).
    commit_gate: Callable[..., None] | None = None

    def _commit(self, step: int, skipped: bool) -> None:
        if self.commit_gate is not None:
            self.commit_gate(step, finite=not skipped)

    def _setup_data(self, run: RunConfig, tokens: np.ndarray) -> None:
        t = run.trainer
        (tr0, tr1), (va0, va1) = train_val_split(len(tokens), run.data.val_fraction, t.seq_len)
        self.train_windows = TokenWindows(tokens, t.seq_len, start=tr0, stop=tr1)
        self.val_windows = TokenWindows(tokens, t.seq_len, start=va0, stop=va1)
        self.sampler = GlobalBatchSampler(len(self.train_windows), t.global_batch, t.seed)
        self.global_tokens = t.global_batch * t.seq_len
        # Re-queued samples of a lost low-communication replica (set by the worker from the
        # recovery record; lowcomm/requeue.py). Only the data-parallel trainer deals them.
        self.requeue: list[dict] = []
        self.compute_dtype = DTYPES[run.precision.compute]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _all_reduce(self, t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        # NCCL reduces device tensors only; gloo takes them where they are.
        t = t.to(self.device)
        # Small scalar reductions (the step's agreement, evaluation): not a gradient
        # reduction, which is what fault injection's `allreduce` point means.
        waits.wait(dist.all_reduce(t, group=group, async_op=True), op="agree")
        return t.cpu()

    def _agree(self, loss_sum: float, finite: bool, stop_requested: bool,
               group: dist.ProcessGroup | None = None) -> tuple[float, bool, bool]:
        """One small all-reduce: the summed loss, whether any rank saw a non-finite gradient,
        whether any rank was asked to stop. Returns (mean token loss, skip, stop)."""
        stats = torch.tensor([loss_sum, 0.0 if finite else 1.0, 1.0 if stop_requested else 0.0],
                             dtype=torch.float64)
        stats = self._all_reduce(stats, group)
        return float(stats[0]) / self.global_tokens, bool(stats[1] > 0), bool(stats[2] > 0)
