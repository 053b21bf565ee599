"""3D-parallel training step: pipeline stages (our runtime) x tensor parallel (DTensor) x data parallel.

Parallelism is applied from outside the model in a fixed order (torchtitan's):
cut the model into this rank's stages, shard each over tp, run the schedule,
reduce each stage's gradients over dp as soon as its last backward is done,
clip by the norm over the whole model, step. Gradient scale is the same as the
data-parallel trainer's: token-summed loss / global token count, dp SUM.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from phalanx.config import RunConfig
from phalanx.data import TokenWindows
from phalanx.models import LlamaForCausalLM
from phalanx.parallel import interrupt, waits
from phalanx.parallel.data_parallel import model_config
from phalanx.parallel.flat import copy_back, flatten
from phalanx.parallel.mesh import AXES, Layout
from phalanx.parallel.optim import adamw, build_adamw, build_scheduler
from phalanx.parallel.pipeline.actions import Action
from phalanx.parallel.pipeline.lowering import lower
from phalanx.parallel.pipeline.runtime import PipelineRuntime
from phalanx.parallel.pipeline.schedules import Schedule, ScheduleError, build_schedule
from phalanx.parallel.pipeline.simulator import Event, simulate
from phalanx.parallel.recompute import apply_recompute
from phalanx.parallel.tensor import apply_tensor_parallel, clip_grad_norm_global_, tp_loss_sum
from phalanx.parallel.trainer_base import StepResult, TrainerBase, seed_everything
from phalanx.parallel.zero import ZeroStage

log = logging.getLogger("phalanx.pipeline")


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, tuple(getattr(layout, a) for a in AXES),
                            mesh_dim_names=AXES)


def stage_layers(stage: int, *, n_stages: int, num_layers: int) -> range:
    per = num_layers // n_stages
    return range(stage * per, (stage + 1) * per)


def forward_only_actions(schedule: Schedule, pp_rank: int) -> list[Action]:
    """Evaluation order: micro-batch by micro-batch along its route, forward only.

    Rare (every eval_every steps), so simplicity beats overlap here.
    """
    mine = schedule.rank_stages(pp_rank)
    out: list[Action] = [Action(s, "UNSHARD") for s in mine]
    for mb, route in enumerate(schedule.routes):
        for i, s in enumerate(route):
            here = schedule.stage_to_rank[s] == pp_rank
            if here and i > 0 and schedule.stage_to_rank[route[i - 1]] != pp_rank:
                out.append(Action(s, "RECV_F", mb))
            if here:
                out.append(Action(s, "F", mb))
            if here and i + 1 < len(route) and schedule.stage_to_rank[route[i + 1]] != pp_rank:
                out.append(Action(s, "SEND_F", mb))
    return out + [Action(s, "RESHARD") for s in mine]


class PipelineTrainer(TrainerBase):
    def __init__(self, run: RunConfig, *, rank: int, layout: Layout, tokens: np.ndarray,
                 device: torch.device, mesh: DeviceMesh | None = None,
                 schedule: Schedule | None = None) -> None:
        """`schedule` is the one the controller published; built from the recipe when absent."""
        self.run, self.rank, self.layout, self.device = run, rank, layout, device
        t, p = run.trainer, run.parallel
        seed_everything(t.seed, rank)
        self.mesh = mesh if mesh is not None else build_mesh(layout, device)
        coords = layout.coords(rank)
        self.pp_rank, self.tp_rank = coords["pp"], coords["tp"]
        self.dp_rank, self.dp_size = layout.dp_rank(rank), layout.dp
        self.pp_group = self.mesh.get_group("pp")
        self.replica_group = self.mesh.get_group("dp_replicate")
        self.shard_group = self.mesh.get_group("dp_shard")
        self.world_group = None if mesh is None else self._mesh_world_group()
        n_mb = t.global_batch // (self.dp_size * p.micro_batch_size)
        self.schedule = schedule or build_schedule(p.schedule, pp=p.pp, vpp=p.vpp,
                                                   n_microbatches=n_mb)
        # Evaluation runs every micro-batch along the plain route 0..S-1: the model as it is
        # meant to be used, whatever routes training takes.
        self.eval_schedule = dataclasses.replace(self.schedule, routes=())
        # CheckFree+ (fault.policy=checkfree_plus): odd micro-batches run with the first two
        # and the last two stages swapped, so stage 1 learns to stand in for stage 0 and
        # stage S-2 for stage S-1; stages 1 and S-2 then also hold a mirror of the embedding
        # and of the final norm + head, kept identical to the owner's (gradients summed over
        # the pair, same optimizer update).
        self.plus = run.fault.policy == "checkfree_plus"
        if self.plus:
            from phalanx.checkpoint.checkfree import checkfree_plus_routes

            self.schedule = dataclasses.replace(self.schedule, routes=checkfree_plus_routes(
                self.schedule.n_microbatches, self.schedule.n_stages))
        # zero=True: the lowering places UNSHARD / RESHARD / REDUCE_GRAD; the data-parallel
        # reduction hangs off REDUCE_GRAD with or without ZeRO.
        try:
            lowered = lower(self.schedule, zero=True)
        except ScheduleError as e:
            if not self.plus:
                raise
            # Some orders (1F1B with many micro-batches on >= 5 stages) wait for an input that
            # a swapped route produces later; all forwards then all backwards always runs.
            log.warning("%s cannot run CheckFree+'s swapped routes (%s); using gpipe's order",
                        self.schedule.name, str(e).splitlines()[0])
            self.schedule = dataclasses.replace(
                build_schedule("gpipe", pp=p.pp, vpp=1, n_microbatches=self.schedule.n_microbatches),
                routes=self.schedule.routes)
            lowered = lower(self.schedule, zero=True)
        simulate(lowered, self.schedule, costs={"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0})
        cfg = model_config(run)
        self.stages: dict[int, nn.Module] = {}
        n_stages = self.schedule.n_stages
        for s in self.schedule.rank_stages(self.pp_rank):
            m = LlamaForCausalLM(cfg, layer_ids=stage_layers(s, n_stages=n_stages,
                                                             num_layers=cfg.num_hidden_layers),
                                 has_embedding=s == 0 or (self.plus and s == 1),
                                 has_head=s == n_stages - 1 or (self.plus and s == n_stages - 2))
            # Components draw from generators seeded by their names: a mirror starts equal
            # to its owner.
            m.init_weights(t.seed)
            m.routed = self.plus
            m.mirror_names = _mirror_names(m, s, n_stages) if self.plus else frozenset()
            m.to(device)
            if p.tp > 1:
                apply_tensor_parallel(m, self.mesh["tp"], sequence_parallel=p.sp)
            apply_recompute(m, p.recompute)
            self.stages[s] = m
        interrupt.install(self.stages.values())
        self.zero: dict[int, ZeroStage] = {}
        if p.zero.stage > 0:
            replicas = self.replica_group if layout.dp_replicate > 1 else None
            self.zero = {s: ZeroStage(m, zero_stage=p.zero.stage, shard_group=self.shard_group,
                                      replica_group=replicas) for s, m in self.stages.items()}
            self.params = [q for z in self.zero.values() for q in z.shard_params()]
            self.optimizer = adamw([g for z in self.zero.values()
                                    for g in z.optimizer_groups(run.optim.weight_decay)], run.optim)
            # Shards are disjoint within dp_shard: their norms add up there too.
            self._norm_groups = [self.pp_group, self.shard_group]
        elif self.plus:
            self.params = [q for m in self.stages.values() for q in m.parameters()]
            self.optimizer = adamw(_plus_groups(self.stages, run.optim.weight_decay), run.optim)
            self._norm_groups = [self.pp_group]
        else:
            self.params = [q for m in self.stages.values() for q in m.parameters()]
            self.optimizer = build_adamw(nn.ModuleList(list(self.stages.values())), run.optim)
            self._norm_groups = [self.pp_group]
        mirrors = {id(q) for m in self.stages.values() for n, q in m.named_parameters()
                   if n in getattr(m, "mirror_names", ())}
        # A mirror is a second copy: counted once (by its owner) in the gradient norm.
        self._norm_params = [q for q in self.params if id(q) not in mirrors]
        self._mirror_params = [q for q in self.params if id(q) in mirrors]
        self._mirror_sync = self._mirror_groups() if self.plus else []
        self.scheduler = build_scheduler(self.optimizer, run.optim, t.steps)
        self._setup_data(run, tokens)
        pp_ranks = torch.distributed.get_process_group_ranks(self.pp_group)
        seq = t.seq_len // p.tp if p.sp else t.seq_len
        shape = (p.micro_batch_size, seq, cfg.hidden_size)
        common = dict(schedule=self.schedule, pp_rank=self.pp_rank, stages=self.stages,
                      pp_ranks=pp_ranks, pp_group=self.pp_group,
                      activation=lambda _stage: (shape, torch.float32), loss_fn=tp_loss_sum,
                      device=device, autocast=self._autocast)
        gathers = {"UNSHARD": self._unshard, "RESHARD": self._reshard}
        # lowcomm: no sum over replicas follows, so each replica's gradient is its own
        # tokens' mean (dp x token sum / global tokens), as the data-parallel trainer's.
        lowcomm_scale = self.dp_size if run.lowcomm.method != "none" else 1
        # NoLoCo's lowcomm.route_microbatches: each micro-batch goes on to the next stage of a
        # random replica (lowcomm/routing.py); the schedule and the gradient scale stay as they
        # are. Training only: evaluation runs each replica's own pipeline.
        self.router = None
        if run.lowcomm.route_microbatches:
            from phalanx.parallel.lowcomm.routing import MicrobatchRouter, routing_group

            self.router = MicrobatchRouter(schedule=self.schedule, layout=layout, rank=rank,
                                           seed=t.seed, group=routing_group(layout, rank))
        self._activation_bytes = math.prod(shape) * 4  # fp32, both directions
        self.runtime = PipelineRuntime(actions=lowered[self.pp_rank],
                                       loss_scale=lowcomm_scale / self.global_tokens,
                                       hooks={**gathers, "REDUCE_GRAD": self._reduce_stage},
                                       router=self.router, **common)
        self.eval_runtime = PipelineRuntime(
            actions=forward_only_actions(self.eval_schedule, self.pp_rank), loss_scale=1.0,
            hooks=gathers, **{**common, "schedule": self.eval_schedule})
        self._pending: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []
        self.last_events: list[Event] = []
        self.last_stage_grad_norm = 0.0
        # The loss is counted once per pipeline: by tp rank 0 of whichever rank holds the
        # last stage, in each data-parallel replica.
        # With CheckFree+ the routes end on two stages: each adds its micro-batches' share.
        self._counts_loss = self.tp_rank == 0 and any(
            self.schedule.stage_to_rank[r[-1]] == self.pp_rank for r in self.schedule.routes)
        self._eval_counts_loss = (self.tp_rank == 0
                                  and self.schedule.stage_to_rank[n_stages - 1] == self.pp_rank)
        # lowcomm.method: replicas train alone between outer steps (no REDUCE_GRAD all-reduce);
        # the outer optimizer syncs each stage with its replicas over groups of its own.
        self.lowcomm = None
        if run.lowcomm.method != "none":
            from phalanx.parallel.lowcomm import build_outer, replica_link

            named = [(n, q) for m in self.stages.values() for n, q in m.named_parameters()]
            self.lowcomm = build_outer(run.lowcomm, named_params=named,
                                       link=replica_link(layout, rank), seed=t.seed,
                                       num_layers=cfg.num_hidden_layers)

    def _mirror_groups(self) -> list[tuple[dist.ProcessGroup, list[torch.Tensor]]]:
        """CheckFree+: one two-rank group per (owner, mirror holder) pair of every pipeline
        (stages 0 and 1 for the embedding, S-2 and S-1 for the head), each with this rank's
        tensors that pair shares. Every rank creates every group (new_group is collective)."""
        from phalanx.checkpoint.checkfree import EMBED_KEYS, HEAD_KEYS

        n = self.schedule.n_stages
        lay, out = self.layout, []
        pipelines: dict[tuple, dict[int, int]] = {}
        for r in range(lay.world_size):
            c = lay.coords(r)
            pipelines.setdefault(tuple(v for k, v in sorted(c.items()) if k != "pp"), {})[
                c["pp"]] = r
        for _key, by_stage in sorted(pipelines.items()):
            for pair, keys in (((0, 1), EMBED_KEYS), ((n - 2, n - 1), HEAD_KEYS)):
                ranks = [by_stage[self.schedule.stage_to_rank[s]] for s in pair]
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    tensors = [q for m in self.stages.values() for name, q in m.named_parameters()
                               if name in keys]
                    out.append((group, tensors))
        return out

    def _sum_mirror_grads(self) -> None:
        """Owner and mirror each saw their routes' micro-batches: both take the sum (the same
        bits on both ranks, so the same update keeps them identical)."""
        for group, tensors in self._mirror_sync:
            for q in tensors:
                if q.grad is None:  # a route this step never took (one micro-batch)
                    q.grad = torch.zeros_like(q)
            grads = [q.grad for q in tensors]
            flat = flatten(grads)
            waits.wait(dist.all_reduce(flat, group=group, async_op=True))
            copy_back(flat, grads)

    def _mesh_world_group(self) -> dist.ProcessGroup:
        ranks = sorted(int(r) for r in self.mesh.mesh.flatten())
        return dist.new_group(ranks)

    @staticmethod
    def _local(g: torch.Tensor) -> torch.Tensor:
        return g._local_tensor if isinstance(g, DTensor) else g

    def _unshard(self, stage: int) -> None:
        if stage in self.zero:
            self.zero[stage].unshard()

    def _reshard(self, stage: int) -> None:
        if stage in self.zero:
            self.zero[stage].reshard()

    def _reduce_stage(self, stage: int) -> None:
        """REDUCE_GRAD: the stage's gradients are final; reduce them over data parallel while
        the schedule goes on with other stages (asynchronously without ZeRO)."""
        if stage in self.zero:
            self.zero[stage].reduce_grads()
            return
        if self.dp_size == 1 or self.lowcomm is not None:
            return
        grads = [self._local(q.grad) for q in self.stages[stage].parameters() if q.grad is not None]
        flat = flatten(grads)
        work = dist.all_reduce(flat, group=self.replica_group, async_op=True)
        self._pending.append((work, flat, grads))

    def _finish_reductions(self) -> None:
        for work, flat, grads in self._pending:
            waits.wait(work)
            copy_back(flat, grads)
        self._pending.clear()

    def _batches(self, ids_list: list[np.ndarray],
                 windows: TokenWindows) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        xs, ys = [], []
        for ids in ids_list:
            x, y = windows.batch(ids)
            xs.append(x)
            ys.append(y)
        return xs, ys

    def _routed_targets(self, step: int) -> list[torch.Tensor]:
        """Targets for routed micro-batches: micro-batch k's loss is computed against the
        targets of the replica it started from (the same data shard coordinate, its dp rank);
        only the ranks holding a route's last stage use them."""
        assert self.router is not None
        coords, size, ys = self.layout.coords(self.rank), self.run.parallel.micro_batch_size, []
        theirs: dict[int, list[np.ndarray]] = {}
        for k in range(self.schedule.n_microbatches):
            o = self.router.origin(k)
            if o not in theirs:
                dp_rank = self.layout.dp_rank(self.layout.rank_of(**{**coords, "dp_replicate": o}))
                theirs[o] = self.sampler.micro_batches(step, dp_rank, self.dp_size, size)
            ys.append(self.train_windows.batch(theirs[o][k])[1])
        return ys

    def train_step(self, step: int, *, stop_requested: bool = False) -> StepResult:
        t0 = time.perf_counter()
        mbs = self.sampler.micro_batches(step, self.dp_rank, self.dp_size,
                                         self.run.parallel.micro_batch_size)
        xs, ys = self._batches(mbs, self.train_windows)
        if self.router is not None:
            self.router.step = step
            ys = self._routed_targets(step)
        self.optimizer.zero_grad(set_to_none=True)
        for z in self.zero.values():
            z.begin_step()
        out = self.runtime.step(xs, ys)
        if self.router is not None and self.lowcomm is not None:
            # Activations and gradients that left this replica crossed the slow link too.
            self.lowcomm.link.count_p2p(
                self.router.sends_out(self.runtime.actions) * self._activation_bytes)
        self.last_events = out.events
        self._finish_reductions()
        self._sum_mirror_grads()
        clip = self.run.trainer.grad_clip if self.run.trainer.grad_clip > 0 else math.inf
        stage_norm = self._stage_grad_norm()
        norm = clip_grad_norm_global_(self._norm_params, clip, groups=self._norm_groups)
        coef = clip / (float(norm) + 1e-6)
        if self._mirror_params and coef < 1.0 and math.isfinite(float(norm)):
            for q in self._mirror_params:  # scaled by the owner's factor, as the owner is
                q.grad.mul_(coef)
        loss, skipped, stop = self._agree(float(out.loss_sum) if self._counts_loss else 0.0,
                                          math.isfinite(float(norm)), stop_requested,
                                          self.world_group)
        self._commit(step, skipped)
        if stage_norm is not None:
            self.last_stage_grad_norm = stage_norm  # CheckFree weighs neighbours by it
        lr = self.optimizer.param_groups[0]["lr"]
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        for z in self.zero.values():
            z.end_step()
        self.scheduler.step()
        if self.lowcomm is not None:  # every step, skipped or not: replicas keep one schedule
            self.lowcomm.after_inner_step(step, final=stop or step + 1 == self.run.trainer.steps)
        self.last_result = StepResult(
            step=step, loss=loss, grad_norm=float(norm), lr=lr, tokens=self.global_tokens,
            step_time_s=time.perf_counter() - t0, skipped=skipped, stop=stop,
            sample_ids=[int(i) for ids in mbs for i in ids])
        return self.last_result

    @torch.no_grad()
    def _stage_grad_norm(self) -> float | None:
        """This rank's stage gradient norm before clipping (pipeline ranks without TP or ZeRO,
        where a rank's gradients are its whole stage's): what CheckFree weighs a neighbour by."""
        if self.layout.pp < 3 or self.zero or self.layout.tp > 1:
            return None
        grads = [q.grad for q in self._norm_params if q.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    @torch.no_grad()
    def evaluate(self) -> float:
        t, p = self.run.trainer, self.run.parallel
        n = min(len(self.val_windows), t.eval_batches * t.global_batch)
        per_pipeline = self.schedule.n_microbatches * p.micro_batch_size
        total = torch.zeros(2, dtype=torch.float64)
        # Each round feeds every replica one schedule's worth of windows (the eval runtime
        # expects exactly n_microbatches micro-batches of micro_batch_size).
        round_size = per_pipeline * self.dp_size
        for r0 in range(0, n - round_size + 1, round_size):
            ids = np.arange(r0 + self.dp_rank * per_pipeline, r0 + (self.dp_rank + 1) * per_pipeline)
            xs, ys = self._batches(np.split(ids, self.schedule.n_microbatches), self.val_windows)
            for m in self.stages.values():
                m.eval()
            out = self.eval_runtime.step(xs, ys)
            for m in self.stages.values():
                m.train()
            if self._eval_counts_loss:
                total[0] += out.loss_sum
            total[1] += per_pipeline * t.seq_len
        total = self._all_reduce(total, self.world_group)
        # Every rank added the token count; one pipeline's worth of ranks per replica matters.
        ranks_per_replica = self.layout.pp * self.layout.tp
        return float(total[0] / (total[1] / ranks_per_replica))


def _mirror_names(stage: nn.Module, s: int, n_stages: int) -> frozenset[str]:
    """The parameters of stage `s` that mirror another stage's (CheckFree+): the embedding on
    stage 1, the final norm and head on stage S-2."""
    from phalanx.checkpoint.checkfree import mirror_keys

    owner = {1: 0, n_stages - 2: n_stages - 1}.get(s)
    if owner is None:
        return frozenset()
    names = {n for n, _ in stage.named_parameters()}
    return frozenset(k for k in mirror_keys(owner, n_stages) if k in names)


def _plus_groups(stages: dict[int, nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups for CheckFree+: the embedding / norm / head tensors apart from the layers,
    so that a rebuilt stage's layers can get a fresh optimizer at a scaled rate while its
    end tensors, restored exactly from their mirror, keep theirs (decay rule as build_adamw)."""
    from phalanx.checkpoint.checkfree import EMBED_KEYS, HEAD_KEYS

    ends = set(EMBED_KEYS) | set(HEAD_KEYS)
    buckets: dict[tuple[bool, bool], list] = {(e, d): [] for e in (False, True) for d in (True, False)}
    for m in stages.values():
        for name, q in m.named_parameters():
            if q.requires_grad:
                buckets[(name in ends, q.ndim >= 2)].append(q)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0}
            for (_, decay), ps in buckets.items() if ps]
