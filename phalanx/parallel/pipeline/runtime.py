"""Executes one rank's lowered action list over torch.distributed P2P.

The schedule is data (schedules.py, lowering.py); this file only runs it, so
recovery can rebuild it per generation and routing features can change the
stage sequence of a micro-batch without touching the runtime. Why our own and
not torch's `_PipelineScheduleRuntime`: it derives peers from `stage + 1`,
where we follow each micro-batch's route, and it owns the DP reduction, where
we overlap it with the remaining actions and abandon it on a new generation.

Contract with lowering (checked by the simulator before anything runs):
- a maximal run of consecutive communication actions is one batch, posted
  with `batch_isend_irecv` where it stands; a receive is waited on by the
  compute that consumes it and sends at the end of the step (never earlier
  than the simulator's rendezvous model, so its deadlock check still holds);
- `RECV_F s k` receives stage s's input for micro-batch k from the stage
  before s in k's route; `SEND_F s k` sends stage s's output to the next one;
  `RECV_B s k` receives the gradient of stage s's output, `SEND_B s k` sends
  the gradient of stage s's input. Stages on the same rank hand tensors over
  in memory, without actions.

With a `router` (NoLoCo's lowcomm.route_microbatches) the other end of a SEND/RECV is the
router's choice of replica for this step, over the router's group; the actions, and so the
timing, are the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from phalanx.parallel import waits
from phalanx.parallel.pipeline.actions import Action
from phalanx.parallel.pipeline.lowering import peer
from phalanx.parallel.pipeline.schedules import Schedule
from phalanx.parallel.pipeline.simulator import Event

if TYPE_CHECKING:
    from phalanx.parallel.lowcomm.routing import MicrobatchRouter

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # summed over the micro-batches whose last stage is on this rank
    # Times are absolute perf_counter (CLOCK_MONOTONIC) seconds: comparable across the
    # processes of one host, so ranks' timelines line up without a clock exchange.
    events: list[Event] = field(default_factory=list)


def _tag(direction: int, stage: int, mb: int, n_stages: int) -> int:
    # gloo matches a receive to a send by (peer, tag): unique per message of a step.
    return (mb * n_stages + stage) * 2 + direction


class PipelineRuntime:
    def __init__(self, *, schedule: Schedule, pp_rank: int, actions: Sequence[Action],
                 stages: dict[int, nn.Module], pp_ranks: Sequence[int],
                 pp_group: dist.ProcessGroup | None, activation: Callable[[int], tuple],
                 loss_fn: LossFn, loss_scale: float, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 hooks: Mapping[str, Callable[[int], None]] | None = None,
                 router: MicrobatchRouter | None = None) -> None:
        """`pp_ranks[r]` is the global rank of pipeline rank r in this rank's pipeline;
        `activation(stage)` gives (shape, dtype) of the hidden states entering `stage`;
        `hooks` run the lowering's UNSHARD / RESHARD / REDUCE_GRAD actions for a stage (the
        data-parallel reduction and ZeRO's gathers live with the trainer, not here);
        `router` sends micro-batches to other replicas' pipelines (its step set by the caller)."""
        self.schedule, self.pp_rank, self.actions = schedule, pp_rank, list(actions)
        self.stages, self.pp_ranks, self.group = stages, list(pp_ranks), pp_group
        self.activation, self.loss_fn, self.loss_scale = activation, loss_fn, loss_scale
        self.device, self.autocast = device, autocast
        self.hooks = dict(hooks or {})
        self.router = router

    def _peer(self, a: Action) -> tuple[int, dist.ProcessGroup | None]:
        """(global rank, group) of the other end of SEND/RECV action `a`."""
        if self.router is not None:
            return self.router.peer_rank(a), self.router.group
        return self.pp_ranks[peer(self.schedule, a)], self.group

    def _route_neighbours(self, stage: int, mb: int) -> tuple[int | None, int | None]:
        route = self.schedule.routes[mb]
        i = route.index(stage)
        return (route[i - 1] if i > 0 else None), (route[i + 1] if i + 1 < len(route) else None)

    def step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> StepOutput:
        """Run this rank's actions for one optimizer step's micro-batches."""
        n_stages = self.schedule.n_stages
        fwd_in: dict[tuple[int, int], torch.Tensor] = {}
        fwd_out: dict[tuple[int, int], torch.Tensor] = {}
        grad_out: dict[tuple[int, int], torch.Tensor] = {}  # d loss / d stage output
        grad_in: dict[tuple[int, int], torch.Tensor | None] = {}  # d loss / d stage input
        w_state: dict[tuple[int, int], tuple] = {}
        loss_sum = torch.zeros((), dtype=torch.float64)
        events: list[Event] = []
        pending: list[tuple[Action, torch.Tensor]] = []  # this batch: (action, send/recv buffer)

        recvs: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []

        def flush() -> None:
            # Post the batch where the lowering put it, but block only where its data is used:
            # a receive at the compute that consumes it, sends at the end of the step (torch's
            # runtime does the same). Posting no later and waiting no earlier than the simulator
            # keeps every deadlock-free list deadlock-free, and a compute that does not need a
            # batch's receives no longer waits for them.
            if not pending:
                return
            ops = []
            for a, buf in pending:
                prev, nxt = self._route_neighbours(a.stage, a.mb)
                if a.kind.startswith("SEND"):
                    direction = 0 if a.kind == "SEND_F" else 1
                    to_stage = nxt if direction == 0 else prev
                    ops.append(dist.P2POp(dist.isend, buf, *self._peer(a),
                                          _tag(direction, to_stage, a.mb, n_stages)))
                else:
                    direction = 0 if a.kind == "RECV_F" else 1
                    ops.append(dist.P2POp(dist.irecv, buf, *self._peer(a),
                                          _tag(direction, a.stage, a.mb, n_stages)))
            for (a, buf), work in zip(pending, dist.batch_isend_irecv(ops), strict=True):
                if a.kind.startswith("SEND"):
                    sends.append((work, buf))
                else:
                    recvs[(a.kind, a.stage, a.mb)] = (work, buf)
            pending.clear()

        def need(kind: str, stage: int, mb: int) -> None:
            item = recvs.pop((kind, stage, mb), None)
            if item is None:
                return
            start = time.perf_counter()
            waits.wait(item[0])  # gives up when the generation ends (see parallel/waits.py)
            events.append(Event(rank=self.pp_rank, action=f"{stage}{kind}{mb}", start=start,
                                end=time.perf_counter()))
            if kind == "RECV_F":
                fwd_in[(stage, mb)] = item[1].requires_grad_(True)
            else:
                grad_out[(stage, mb)] = item[1]

        for a in self.actions:
            if a.is_comm:
                key = (a.stage, a.mb)
                if a.kind == "SEND_F":
                    buf = fwd_out[key].detach().contiguous()
                elif a.kind == "SEND_B":
                    buf = grad_in[key]
                    assert buf is not None, f"no input gradient to send for {a}"
                    buf = buf.contiguous()
                else:
                    stage = a.stage
                    if a.kind == "RECV_F":
                        shape, dtype = self.activation(stage)
                    else:
                        shape, dtype = self.activation(self._route_neighbours(stage, a.mb)[1])
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                pending.append((a, buf))
                continue
            flush()
            if a.is_compute:
                need("RECV_F" if a.kind == "F" else "RECV_B", a.stage, a.mb)
            start = time.perf_counter()
            if not a.is_compute:
                hook = self.hooks.get(a.kind)
                if hook is not None:
                    hook(a.stage)
                    events.append(Event(rank=self.pp_rank, action=str(a), start=start,
                                        end=time.perf_counter()))
                continue
            key = (a.stage, a.mb)
            module = self.stages[a.stage]
            prev, nxt = self._route_neighbours(a.stage, a.mb)
            if a.kind == "F":
                x = inputs[a.mb].to(self.device) if prev is None else fwd_in[key]
                fwd_in[key] = x
                with self.autocast():
                    # A stage on routes that differ in where it stands (CheckFree+) is told
                    # whether it starts or ends this one; others are built for their place.
                    out = (module(x, first=prev is None, last=nxt is None)
                           if getattr(module, "routed", False) else module(x))
                if nxt is None:
                    loss = self.loss_fn(out, targets[a.mb].to(self.device))
                    loss_sum += loss.detach().double().cpu()
                    fwd_out[key] = loss * self.loss_scale
                else:
                    fwd_out[key] = out
                    if self.schedule.stage_to_rank[nxt] == self.pp_rank:
                        fwd_in[(nxt, a.mb)] = out.detach().requires_grad_(True)
            elif a.kind == "B":
                out = fwd_out.pop(key)
                x = fwd_in.pop(key)
                g = None if nxt is None else self._local_or_received_grad(grad_out, grad_in, nxt, key)
                torch.autograd.backward(out, grad_tensors=g)
                grad_in[key] = x.grad if x.requires_grad else None
                self._hand_back(prev, a.mb, grad_in[key], grad_out)
            elif a.kind == "I":
                out = fwd_out.pop(key)
                x = fwd_in.pop(key)
                g = None if nxt is None else self._local_or_received_grad(grad_out, grad_in, nxt, key)
                if x.requires_grad:
                    # torch's split backward: dI now, keeping the intermediates dW needs.
                    dx, groups = stage_backward_input([out], None if g is None else [g], [x],
                                                      module.parameters())
                    grad_in[key] = dx[0]
                    w_state[key] = (groups, None, None)
                else:
                    # A stage fed token ids has no input gradient: I is empty and W does the
                    # whole backward (there are no intermediates to share).
                    grad_in[key] = None
                    w_state[key] = (None, out, g)
                self._hand_back(prev, a.mb, grad_in[key], grad_out)
            elif a.kind == "W":
                groups, out, g = w_state.pop(key)
                if groups is None:
                    torch.autograd.backward(out, grad_tensors=g)
                else:
                    stage_backward_weight(module.parameters(), groups)
            events.append(Event(rank=self.pp_rank, action=str(a), start=start,
                                end=time.perf_counter()))
        flush()
        assert not recvs, f"received but never used: {sorted(recvs)}"
        start = time.perf_counter()
        for work, _ in sends:
            waits.wait(work)
        events.append(Event(rank=self.pp_rank, action="SEND_WAIT", start=start,
                            end=time.perf_counter()))
        return StepOutput(loss_sum=loss_sum, events=events)

    def _local_or_received_grad(self, grad_out: dict, grad_in: dict, nxt: int,
                                key: tuple[int, int]) -> torch.Tensor:
        if key in grad_out:
            return grad_out.pop(key)
        raise RuntimeError(f"stage {key[0]} micro-batch {key[1]}: no gradient from stage {nxt}")

    def _hand_back(self, prev: int | None, mb: int, g: torch.Tensor | None, grad_out: dict) -> None:
        # The previous stage of the route lives here: its output gradient is our input gradient.
        if prev is not None and self.schedule.stage_to_rank[prev] == self.pp_rank:
            assert g is not None
            grad_out[(prev, mb)] = g
