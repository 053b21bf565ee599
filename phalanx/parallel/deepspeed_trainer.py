"""The DeepSpeed trainer: `DataParallelTrainer`'s interface on a DeepSpeed engine.

The config, the user's zero_optimization mapping and the JIT-op handling live in
`deepspeed_backend.py` (importable without torch, for recipe validation); this
module runs the engine. Gradient scale and the loss are the native trainers'
(see deepspeed_backend's docstring for how DeepSpeed's own scaling is undone).
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from phalanx.config import RunConfig
from phalanx.models import LlamaForCausalLM
from phalanx.parallel.data_parallel import model_config
from phalanx.parallel.deepspeed_backend import (
    _select_accelerator,
    deepspeed_config,
    load_cpu_adam,
    optimizer_param_groups,
)
from phalanx.parallel.mesh import Layout
from phalanx.parallel.optim import build_adamw, build_scheduler
from phalanx.parallel.recompute import apply_recompute
from phalanx.parallel.trainer_base import StepResult, TrainerBase, seed_everything


class DeepSpeedTrainer(TrainerBase):
    """`DataParallelTrainer`'s interface on a DeepSpeed engine (ZeRO stage 1-3, offload)."""

    def __init__(self, run: RunConfig, *, rank: int, layout: Layout, tokens: np.ndarray,
                 device: torch.device) -> None:
        if layout.pp != 1 or layout.tp != 1 or layout.dp_shard != 1:
            raise ValueError(f"the DeepSpeed backend runs plain data-parallel layouts; got {layout}")
        _select_accelerator(device.type)
        import deepspeed

        self.run, self.rank, self.layout, self.device = run, rank, layout, device
        self.dp_rank, self.dp_size = layout.dp_rank(rank), layout.dp
        t, o, z = run.trainer, run.optim, run.parallel.zero
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # DeepSpeed prints its whole config and per-op notes at INFO on every rank.
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed calls collectives that torch 2.13 deprecates: not actionable by a user.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                                r"(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        # The worker's default process group is already up: DeepSpeed adopts it (its
        # TorchBackend skips init_process_group when torch.distributed is initialized).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        assert deepspeed.comm.get_world_size() == dist.get_world_size() == self.dp_size

        seed_everything(t.seed, rank)
        model = LlamaForCausalLM(model_config(run))
        model.init_weights(t.seed)
        model.to(device)
        apply_recompute(model, run.parallel.recompute)
        self.model = model
        if z.offload:
            load_cpu_adam()
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(optimizer_param_groups(model, o.weight_decay), lr=o.lr,
                                         betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        else:
            optimizer = build_adamw(model, o)
        scheduler = build_scheduler(optimizer, o, t.steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ds_config = deepspeed_config(run, dp_size=self.dp_size)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self._setup_data(run, tokens)

    def _loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.engine(x)  # the engine autocasts when the config's torch_autocast says so
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="sum")

    def train_step(self, step: int, *, stop_requested: bool = False) -> StepResult:
        """One optimizer step. All ranks return the same loss, norm, skip and stop decision."""
        t0 = time.perf_counter()
        mbs = self.sampler.micro_batches(step, self.dp_rank, self.dp_size,
                                         self.run.parallel.micro_batch_size)
        # See the module docstring: DeepSpeed averages over dp, and we skip its 1/gas.
        scale = self.dp_size / self.global_tokens
        loss_acc = torch.zeros((), dtype=torch.float64)
        for i, ids in enumerate(mbs):
            x, y = self.train_windows.batch(ids)
            # Set explicitly rather than counted by the engine: the last micro-batch reduces
            # (and steps), whatever happened on earlier steps.
            self.engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            loss_sum = self._loss_sum(x.to(self.device), y.to(self.device))
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            loss_acc += loss_sum.detach().double().cpu()
        # Before the optimizer step: whether any rank's loss is non-finite, and whether any
        # rank was asked to stop.
        loss, nonfinite, stop = self._agree(loss_acc.item(), bool(torch.isfinite(loss_acc)),
                                            stop_requested)
        lr = self.optimizer.param_groups[0]["lr"]
        # DeepSpeed's step computes the global gradient norm (all-reduced over the dp group, so
        # the same on every rank), clips to trainer.grad_clip, and skips the update -- dropping
        # the reduced gradients -- when the norm is not finite. A non-finite loss anywhere makes
        # the summed gradient non-finite everywhere, so every rank skips together.
        self.engine.step()
        skipped = not self.engine.was_step_applied()
        if nonfinite and not skipped:
            raise RuntimeError(f"step {step}: a rank's loss is not finite but DeepSpeed applied "
                               "the update; replicas may now disagree")
        if skipped:
            # DeepSpeed advances the LR schedule only on applied steps; the native trainer
            # advances it on every step, so the schedule stays a function of the step.
            self.scheduler.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(
            step=step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=self.global_tokens,
            step_time_s=time.perf_counter() - t0, skipped=skipped, stop=stop,
            sample_ids=[int(i) for ids in mbs for i in ids])

    def evaluate(self) -> float:
        """Mean next-token loss (nats) over the held-out validation windows, across ranks."""
        t = self.run.trainer
        n = min(len(self.val_windows), t.eval_batches * t.global_batch)
        mine = np.array_split(np.arange(n), self.dp_size)[self.dp_rank]
        mbs = self.run.parallel.micro_batch_size
        # Every rank runs the same number of forwards: under ZeRO-3 each forward gathers
        # parameters collectively. A rank whose share ran out repeats a window, uncounted.
        rounds = math.ceil(math.ceil(n / self.dp_size) / mbs)
        total = torch.zeros(2, dtype=torch.float64)
        self.engine.eval()
        with torch.no_grad():
            for i in range(rounds):
                ids = mine[i * mbs:(i + 1) * mbs]
                x, y = self.val_windows.batch(ids if len(ids) else np.arange(min(mbs, n)))
                loss = self._loss_sum(x.to(self.device), y.to(self.device))
                if len(ids):
                    total[0] += loss.double().cpu()
                    total[1] += y.numel()
        self.engine.train()
        total = self._all_reduce(total)
        return float(total[0] / total[1])
