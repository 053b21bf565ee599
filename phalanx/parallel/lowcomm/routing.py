"""NoLoCo's random routing of micro-batches between pipeline replicas (arXiv 2506.10911).

With `lowcomm.route_microbatches`, the output of stage s of replica i for micro-batch k does
not go to stage s+1 of replica i but of replica perm[i], with `perm` a permutation of the
replicas drawn from (trainer.seed, step, k, s) -- the same draw on every rank, so nobody
coordinates -- and its gradient comes back the same way. Since `perm` is a bijection, every
rank still handles exactly one micro-batch k per slot of the schedule: the timing (and the
simulator's deadlock check) is unchanged, only the global rank at the other end of a SEND or
RECV changes. Stage 0 of replica i feeds its own data shard's micro-batch k; the stage that
computes the loss uses the targets of the micro-batch it received (`origin`: the inverse
permutations composed back along the route).

Only boundaries where the pipeline hands a tensor to another rank are routed: two stages on
the same rank (zb_v's V) hand over in memory, with no SEND/RECV to redirect, so there the
micro-batch stays in its replica (a routed hand-over would need actions the lowering does not
place). Routing needs no state: a rebuilt generation draws the same permutations for a step.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch.distributed as dist

from phalanx.parallel.lowcomm.link import axis_group
from phalanx.parallel.mesh import Layout
from phalanx.parallel.pipeline.actions import Action
from phalanx.parallel.pipeline.lowering import peer
from phalanx.parallel.pipeline.schedules import Schedule

__all__ = ["MicrobatchRouter", "route_permutation", "routing_group"]


@lru_cache(maxsize=4096)
def route_permutation(replicas: int, *, seed: int, step: int, mb: int, stage: int) -> tuple[int, ...]:
    """perm[i]: the replica whose next stage gets what stage `stage` of replica i produced for
    micro-batch `mb` at `step`. A pure function of its arguments (the same on every rank)."""
    return tuple(np.random.default_rng([seed, step, mb, stage]).permutation(replicas).tolist())


class MicrobatchRouter:
    """Where one rank's micro-batches come from and go to, step by step.

    `group` is the process group the routed P2P runs over: one per set of ranks that share
    every layout coordinate but dp_replicate and pp (a pipeline rank must reach every replica's
    neighbouring stage). gloo matches a receive by (peer, tag); tags are unique per message of
    a step (runtime._tag), whichever replica sends it."""

    def __init__(self, *, schedule: Schedule, layout: Layout, rank: int, seed: int,
                 group: dist.ProcessGroup | None = None) -> None:
        self.schedule, self.layout, self.seed, self.group = schedule, layout, seed, group
        self.coords = layout.coords(rank)
        self.replica, self.replicas = self.coords["dp_replicate"], layout.dp_replicate
        self.step = 0

    def _routed(self, stage: int, nxt: int) -> bool:
        return self.schedule.stage_to_rank[stage] != self.schedule.stage_to_rank[nxt]

    def _perm(self, mb: int, stage: int) -> tuple[int, ...]:
        return route_permutation(self.replicas, seed=self.seed, step=self.step, mb=mb, stage=stage)

    def peer_replica(self, a: Action) -> int:
        """The replica at the other end of SEND/RECV action `a` in this step."""
        prev, nxt = self.schedule.neighbours(a.stage, a.mb)
        if a.kind in ("SEND_F", "RECV_B"):  # downstream: where our output went
            return self._perm(a.mb, a.stage)[self.replica]
        assert prev is not None, a  # RECV_F / SEND_B: upstream, where our input came from
        return self._perm(a.mb, prev).index(self.replica)

    def peer_rank(self, a: Action) -> int:
        """Global rank of the other end of SEND/RECV action `a` in this step."""
        return self.layout.rank_of(**{**self.coords, "dp_replicate": self.peer_replica(a),
                                      "pp": peer(self.schedule, a)})

    def origin(self, mb: int, stage: int | None = None) -> int:
        """The replica whose micro-batch `mb` reaches `stage` (default: the end of its route,
        where the loss is computed) of this replica: the inverse permutations, composed back
        along the route."""
        route = self.schedule.routes[mb]
        at = route.index(route[-1] if stage is None else stage)
        replica = self.replica
        for s, nxt in reversed(list(zip(route[:at], route[1:at + 1], strict=True))):
            if self._routed(s, nxt):
                replica = self._perm(mb, s).index(replica)
        return replica

    def sends_out(self, actions: list[Action]) -> int:
        """How many of this step's SENDs in `actions` leave this replica (for the link's
        accounting: each carries one activation or its gradient)."""
        return sum(1 for a in actions if a.kind in ("SEND_F", "SEND_B")
                   and self.peer_replica(a) != self.replica)


def routing_group(layout: Layout, rank: int) -> dist.ProcessGroup:
    """One group per set of ranks equal in every coordinate but dp_replicate and pp; this
    rank's. Collective (link.axis_group)."""
    return axis_group(layout, rank, ("dp_replicate", "pp"))
