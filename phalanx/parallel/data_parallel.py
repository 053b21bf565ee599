"""Data-parallel training of a whole model per worker (torch DDP), one optimizer step at a time.

Gradient scale: each micro-batch's loss is summed over its tokens and multiplied
by dp / global_tokens before backward. DDP averages over the dp ranks, so the
reduced gradient is (sum over every token of the global batch) / global_tokens:
the same whatever the world size and accumulation (DESIGN.md invariant 5).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from phalanx.config import RunConfig
from phalanx.models import LlamaConfig, LlamaForCausalLM
from phalanx.parallel import interrupt, waits
from phalanx.parallel.mesh import Layout
from phalanx.parallel.optim import build_adamw, build_scheduler
from phalanx.parallel.recompute import apply_recompute
from phalanx.parallel.trainer_base import StepResult, TrainerBase, seed_everything

__all__ = ["DataParallelTrainer", "StepResult", "model_config", "seed_everything"]

_DDP_ARGS = inspect.signature(DDP.__init__).parameters


def model_config(run: RunConfig) -> LlamaConfig:
    m = run.model
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=m.tie_word_embeddings,
        init_std=m.init_std)


class DataParallelTrainer(TrainerBase):
    def __init__(self, run: RunConfig, *, rank: int, layout: Layout, tokens: np.ndarray,
                 device: torch.device, group: dist.ProcessGroup | None = None,
                 init_sync: bool = True) -> None:
        """`init_sync=False`: skip DDP's broadcast of rank 0's parameters at construction,
        for a trainer whose state is about to be overwritten anyway (a recovery)."""
        self.run, self.rank, self.layout, self.device = run, rank, layout, device
        self.group = group
        self.dp_rank, self.dp_size = layout.dp_rank(rank), layout.dp
        t = run.trainer
        seed_everything(t.seed, rank)
        model = LlamaForCausalLM(model_config(run))
        model.init_weights(t.seed)
        model.to(device)
        apply_recompute(model, run.parallel.recompute)
        interrupt.install([model])
        self.model = model
        device_ids = [device.index] if device.type == "cuda" else None
        # Buffers (rotary tables) are deterministic, so broadcasting them every forward is waste.
        # Gradients as views of DDP's buckets: one copy of the gradients, not two (16Ψ, not 20Ψ).
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                else {"broadcast_buffers": False})  # torch < 2.13 knows only the old name
        # lowcomm.method: replicas train alone between outer steps (no per-step all-reduce,
        # so no DDP); the outer optimizer syncs them over a group of its own.
        self.lowcomm = None
        self.ddp = model if run.lowcomm.method != "none" else DDP(
            model, device_ids=device_ids, process_group=group, gradient_as_bucket_view=True,
            init_sync=init_sync, **sync)
        if self.ddp is model:
            from phalanx.parallel.lowcomm import build_outer, replica_link

            self.lowcomm = build_outer(run.lowcomm, named_params=list(model.named_parameters()),
                                       link=replica_link(layout, rank), seed=t.seed,
                                       num_layers=run.model.num_hidden_layers)
        elif run.precision.reduce == "bf16":
            self.ddp.register_comm_hook(group, default_hooks.bf16_compress_hook)
        else:
            self.ddp.register_comm_hook(group, _AbortableAllReduce(lambda: self.commit_gate).hook)
        self.optimizer = build_adamw(model, run.optim)
        self.scheduler = build_scheduler(self.optimizer, run.optim, t.steps)
        self._setup_data(run, tokens)

    def _loss_sum(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = module(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="sum")

    def train_step(self, step: int, *, stop_requested: bool = False) -> StepResult:
        """One optimizer step. All ranks return the same loss, norm, skip and stop decision."""
        t0 = time.perf_counter()
        mbs = self.sampler.micro_batches(step, self.dp_rank, self.dp_size,
                                         self.run.parallel.micro_batch_size)
        regular = len(mbs)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.dp_size / self.global_tokens
        if self.requeue:  # a lost replica's re-queued samples (lowcomm/requeue.py)
            from phalanx.parallel.lowcomm.requeue import extra_micro_batches

            mbs = mbs + extra_micro_batches(self.requeue, step, self.dp_rank)
            scale = 1.0 / (sum(len(m) for m in mbs) * self.run.trainer.seq_len)
        loss_acc = torch.zeros((), dtype=torch.float64)
        for i, ids in enumerate(mbs):
            x, y = self.train_windows.batch(ids)
            x, y = x.to(self.device), y.to(self.device)
            # Reduce gradients once per step, on the last micro-batch's backward.
            last = i == len(mbs) - 1 or self.lowcomm is not None
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with sync:
                loss_sum = self._loss_sum(self.ddp, x, y)
                (loss_sum * scale).backward()
            if i < regular:  # the step's loss is its global batch's
                loss_acc += loss_sum.detach().double().cpu()
        clip = self.run.trainer.grad_clip if self.run.trainer.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss, skipped, stop = self._agree(loss_acc.item(), bool(torch.isfinite(grad_norm)),
                                          stop_requested, self.group)
        self._commit(step, skipped)
        lr = self.optimizer.param_groups[0]["lr"]
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.lowcomm is not None:  # every step, skipped or not: replicas keep one schedule
            self.lowcomm.after_inner_step(step, final=stop or step + 1 == self.run.trainer.steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(
            step=step, loss=loss, grad_norm=float(grad_norm), lr=lr, tokens=self.global_tokens,
            step_time_s=time.perf_counter() - t0, skipped=skipped, stop=stop,
            sample_ids=[int(i) for ids in mbs for i in ids])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss (nats) over the held-out validation windows, across ranks."""
        n = min(len(self.val_windows), self.run.trainer.eval_batches * self.run.trainer.global_batch)
        mine = np.array_split(np.arange(n), self.dp_size)[self.dp_rank]
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        mbs = self.run.parallel.micro_batch_size
        for i in range(0, len(mine), mbs):
            x, y = self.val_windows.batch(mine[i:i + mbs])
            total[0] += self._loss_sum(self.model, x.to(self.device), y.to(self.device)).double().cpu()
            total[1] += y.numel()
        self.model.train()
        total = self._all_reduce(total, self.group)
        return float(total[0] / total[1])


class _AbortableAllReduce:
    """DDP comm hook: DDP's own averaging all-reduce of a gradient bucket (divide by the group
    size, sum), whose future fails as soon as the controller starts a new generation.

    When one rank dies inside a ring all-reduce, only its neighbours see the connection drop;
    they leave the generation, abandoning (not closing) their gloo groups, and a rank further
    round the ring keeps waiting on a neighbour that is alive but gone -- until the
    collective timeout (fault.collective_timeout_s, 300 s by default). With 2 ranks there is
    no such bystander; from 3 on there is one in every failure. Here the reducer waits on a
    future that a watcher thread fails with GenerationChanged when the generation moves on
    (checked every `poll_s` while a bucket is in flight), so backward raises and the rank
    joins the next generation at once. The abandoned all-reduce stays with the abandoned
    group. Without a commit gate (tests, benchmarks) it is DDP's default hook.

    For fault tolerance it also reports to `waits`: the all-reduce is a fault-injection
    point ("allreduce", fired right after it is issued), a failed or abandoned one is noted,
    and the last bucket's time in flight counts as time waited on peers (DDP issues it when
    backward is done, so the reducer is blocked on it until it completes)."""

    def __init__(self, gate: Any, poll_s: float = 0.05) -> None:
        self.gate, self.poll_s = gate, poll_s
        self._lock = threading.Lock()
        self._pending: list[torch.futures.Future] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # Registered as a bound method (DDP wants a __name__). No annotations: DDP checks them
    # against the real classes, and this module's are strings.
    def hook(self, group, bucket):  # noqa: ANN001, ANN201
        tensor = bucket.buffer()
        size = dist.get_world_size(group)
        fire = waits.fault_point("allreduce")
        t0, last = time.perf_counter(), bucket.is_last()
        work = dist.all_reduce(tensor.div_(size), group=group, async_op=True).get_future()
        if fire is not None:
            fire()  # fault injection: the all-reduce is in flight, peers are inside it

        def account(_f: torch.futures.Future) -> None:
            if last:
                waits.add_waited(time.perf_counter() - t0)

        gate = self.gate()
        if gate is None:
            work.add_done_callback(account)
            return work.then(lambda f: f.value()[0])
        out: torch.futures.Future = torch.futures.Future()

        def finish(f: torch.futures.Future) -> None:
            account(f)
            with self._lock:
                if out.done():  # already failed by the watcher
                    return
                try:
                    out.set_result(f.value()[0])
                except Exception as e:  # noqa: BLE001 - the all-reduce's own error
                    waits.note_aborted("allreduce")
                    out.set_exception(e)

        with self._lock:
            self._pending.append(out)
        work.add_done_callback(finish)
        self._watch(gate)
        return out

    def _watch(self, gate: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(gate,), daemon=True,
                                            name="ddp-generation-watch")
            self._thread.start()
        self._wake.set()

    def _run(self, gate: Any) -> None:
        from phalanx.orchestrator.commit import GenerationChanged, current_generation

        while True:
            self._wake.wait()
            with self._lock:
                self._pending = [f for f in self._pending if not f.done()]
                if not self._pending:
                    self._wake.clear()
                    continue
            time.sleep(self.poll_s)
            try:
                gen = current_generation(gate.run_cp)
            except Exception:  # noqa: BLE001 - a lost controller is the heartbeat's business
                continue
            if gen > gate.cp.generation:
                with self._lock:
                    for f in self._pending:
                        if not f.done():
                            waits.note_aborted("allreduce")
                            f.set_exception(GenerationChanged(gen))
                    self._pending = []
                return

