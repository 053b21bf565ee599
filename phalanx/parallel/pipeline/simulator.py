"""Run lowered action lists on a model clock, with rendezvous (unbuffered) sends.

This is the check every schedule passes before a worker runs it: the runtime
issues each maximal run of consecutive SEND/RECV actions as one
`batch_isend_irecv` and waits for all of it, so a batch completes only when
every op in it has its matching op posted by the peer. If no rank can move, it
is a deadlock; if a compute runs before its input, or a (stage, micro-batch)
misses its forward or backward, the schedule is wrong. Both are reported with
the ranks and actions involved, before any process hangs on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from phalanx.parallel.pipeline.actions import COMPUTE_KINDS, ZERO_KINDS, Action
from phalanx.parallel.pipeline.schedules import Schedule, ScheduleError

_COST_KEYS = COMPUTE_KINDS + ZERO_KINDS + ("comm",)


class DeadlockError(RuntimeError):
    """No rank can progress and some have actions left; `blocked` maps rank -> waiting ops."""

    def __init__(self, message: str, blocked: dict[int, list[Action]]) -> None:
        super().__init__(message)
        self.blocked = blocked


@dataclass(frozen=True)
class Event:
    rank: int
    action: str
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    makespan: float
    events: tuple[Event, ...]
    bubble_fraction: float
    busy: tuple[float, ...]  # compute time per rank
    # Micro-batches whose activations a rank holds at its worst moment (F done, B or W not):
    # the memory side of a schedule, e.g. ZB-H1 keeps 1F1B's peak.
    peak_inflight: tuple[int, ...]


def resolve_costs(costs: Mapping[str, float] | None) -> dict[str, float]:
    """Durations per action kind. Defaults F=1, I=W=1, B=I+W, ZeRO actions and comm
    latency 0. Given only B, I and W default to B/2; given I and W, B defaults to I+W."""
    costs = dict(costs or {})
    unknown = set(costs) - set(_COST_KEYS)
    if unknown:
        raise ValueError(f"unknown cost keys {sorted(unknown)}; valid: {', '.join(_COST_KEYS)}")
    if "B" in costs:
        costs.setdefault("I", costs["B"] / 2)
        costs.setdefault("W", costs["B"] / 2)
    out = {"F": 1.0, "I": 1.0, "W": 1.0, "comm": 0.0, **{k: 0.0 for k in ZERO_KINDS}, **costs}
    out.setdefault("B", out["I"] + out["W"])
    for k, v in out.items():
        if v < 0:
            raise ValueError(f"cost {k}={v} must be >= 0")
    return out


def _partner(schedule: Schedule, a: Action) -> Action | None:
    """The op on the peer rank that `a` rendezvous with (None if the route has no peer)."""
    prev, nxt = schedule.neighbours(a.stage, a.mb)
    if a.kind == "SEND_F":
        return None if nxt is None else Action(nxt, "RECV_F", a.mb)
    if a.kind == "RECV_F":
        return None if prev is None else Action(prev, "SEND_F", a.mb)
    if a.kind == "SEND_B":
        return None if prev is None else Action(prev, "RECV_B", a.mb)
    return None if nxt is None else Action(nxt, "SEND_B", a.mb)


class _Sim:
    def __init__(self, lowered: Sequence[Sequence[Action]], schedule: Schedule, costs: dict[str, float]):
        if len(lowered) != schedule.pp:
            raise ScheduleError(f"{len(lowered)} action lists for pp={schedule.pp} ranks")
        self.lists = [list(acts) for acts in lowered]
        self.s, self.costs = schedule, costs
        pp = schedule.pp
        self.idx, self.clock = [0] * pp, [0.0] * pp
        # Posted batch per rank: (end index, post time, partners not yet seen posted).
        self.batch: list[tuple[int, float, list[Action]] | None] = [None] * pp
        self.posted: dict[Action, tuple[int, float]] = {}  # op -> (rank, post time)
        self.events: list[Event] = []
        self.fwd: set[tuple[int, int]] = set()
        self.bwd: dict[tuple[int, int], str] = {}  # (stage, mb) -> "B" or "I"
        self.wgt: set[tuple[int, int]] = set()
        self.recvd: set[Action] = set()
        self.busy, self.inflight, self.peak = [0.0] * pp, [0] * pp, [0] * pp
        self.zero = any(a.kind in ZERO_KINDS for acts in self.lists for a in acts)
        self.unsharded: set[int] = set()
        self.reduced: set[int] = set()
        self.visits = {s: sum(s in r for r in schedule.routes) for s in range(schedule.n_stages)}

    def fail(self, rank: int, a: Action, why: str, *, at: int | None = None) -> NoReturn:
        at = self.idx[rank] if at is None else at
        raise ScheduleError(f"rank {rank}, action {at} ({a}): {why}")

    def run(self) -> SimResult:
        progress = True
        while progress:
            progress = False
            for r in range(self.s.pp):
                while self.idx[r] < len(self.lists[r]):
                    if not self.step(r):
                        break
                    progress = True
        self.check_deadlock()
        self.check_complete()
        makespan = max(self.clock, default=0.0)
        total = sum(self.busy)
        bubble = 1.0 - total / (self.s.pp * makespan) if makespan > 0 else 0.0
        return SimResult(makespan=makespan, events=tuple(self.events), bubble_fraction=bubble,
                         busy=tuple(self.busy), peak_inflight=tuple(self.peak))

    # ------------------------------------------------------------- one action or batch

    def step(self, r: int) -> bool:
        a = self.lists[r][self.idx[r]]
        if a.is_comm:
            return self.comm(r)
        self.check_stage(r, a)
        start = self.clock[r]
        end = start + self.costs[a.kind]
        if a.is_compute:
            self.compute(r, a)
            self.busy[r] += end - start
        else:
            self.zero_action(r, a)
        self.events.append(Event(r, str(a), start, end))
        self.clock[r] = end
        self.idx[r] += 1
        return True

    def check_stage(self, r: int, a: Action, *, at: int | None = None) -> None:
        if a.stage >= self.s.n_stages or self.s.stage_to_rank[a.stage] != r:
            self.fail(r, a, at=at, why=f"stage {a.stage} is not placed on rank {r}")
        if a.mb is not None:
            if a.mb >= self.s.n_microbatches:
                self.fail(r, a, at=at, why=f"micro-batch {a.mb} of n_microbatches={self.s.n_microbatches}")
            if a.stage not in self.s.routes[a.mb]:
                self.fail(r, a, at=at, why=f"stage {a.stage} is not on micro-batch {a.mb}'s route "
                                           f"{list(self.s.routes[a.mb])}")

    def compute(self, r: int, a: Action) -> None:
        key = (a.stage, a.mb)
        prev, nxt = self.s.neighbours(a.stage, a.mb)
        if self.zero and a.stage not in self.unsharded:
            self.fail(r, a, f"stage {a.stage} is sharded here (no UNSHARD before, or after RESHARD)")
        if a.kind == "F":
            if key in self.fwd:
                self.fail(r, a, "second forward of this stage and micro-batch")
            if prev is not None:
                self.need_input(r, a, (prev, a.mb), "F", Action(a.stage, "RECV_F", a.mb), self.fwd)
            self.fwd.add(key)
            self.inflight[r] += 1
            self.peak[r] = max(self.peak[r], self.inflight[r])
        elif a.kind in ("B", "I"):
            if key in self.bwd:
                self.fail(r, a, f"second backward of this stage and micro-batch (had {self.bwd[key]})")
            if key not in self.fwd:
                self.fail(r, a, "backward before this stage's forward")
            if nxt is not None:
                self.need_input(r, a, (nxt, a.mb), "B/I", Action(a.stage, "RECV_B", a.mb), self.bwd)
            self.bwd[key] = a.kind
            if a.kind == "B":
                self.inflight[r] -= 1
        else:  # W
            if self.bwd.get(key) != "I":
                self.fail(r, a, "W before this stage's I (or after a full B)")
            if key in self.wgt:
                self.fail(r, a, "second W of this stage and micro-batch")
            self.wgt.add(key)
            self.inflight[r] -= 1

    def need_input(self, r: int, a: Action, src: tuple[int, int], src_kind: str, recv: Action,
                   done: Iterable[tuple[int, int]]) -> None:
        src_rank = self.s.stage_to_rank[src[0]]
        if src_rank == r:
            if src not in done:
                self.fail(r, a, f"needs {src_kind} of stage {src[0]} micro-batch {src[1]} first "
                                f"(same rank, so earlier in this list)")
        elif recv not in self.recvd:
            self.fail(r, a, f"runs before its input: stage {src[0]} is on rank {src_rank}, and no "
                            f"{recv} completed before it")

    def zero_action(self, r: int, a: Action) -> None:
        s = a.stage
        if a.kind == "UNSHARD":
            if s in self.unsharded:
                self.fail(r, a, "stage is already unsharded")
            self.unsharded.add(s)
        elif a.kind == "RESHARD":
            if s not in self.unsharded:
                self.fail(r, a, "RESHARD without UNSHARD")
            self.unsharded.discard(s)
        else:
            done = sum(1 for (st, _), k in self.bwd.items() if st == s and k == "B")
            done += sum(1 for st, _ in self.wgt if st == s)
            if s in self.reduced:
                self.fail(r, a, "second REDUCE_GRAD: gradients are reduced once per step")
            if done != self.visits[s]:
                self.fail(r, a, f"REDUCE_GRAD after {done} of {self.visits[s]} backwards of stage {s}: "
                                "it must follow the stage's last B or W")
            self.reduced.add(s)

    def comm(self, r: int) -> bool:
        """Post the batch starting here (if not yet posted); complete it if all partners posted."""
        acts = self.lists[r]
        progress = False
        if self.batch[r] is None:
            end = self.idx[r]
            while end < len(acts) and acts[end].is_comm:
                end += 1
            partners = [self.post(r, i, acts[i]) for i in range(self.idx[r], end)]
            self.batch[r] = (end, self.clock[r], partners)
            progress = True
        end, t_post, partners = self.batch[r]
        # Drop partners already posted, so a long wait costs one check per new post.
        while partners and partners[-1] in self.posted:
            partners.pop()
        if partners:
            return progress
        lat = self.costs["comm"]
        t_end = t_post
        for a in acts[self.idx[r]:end]:
            done = max(t_post, self.posted[_partner(self.s, a)][1]) + lat
            self.events.append(Event(r, str(a), t_post, done))
            t_end = max(t_end, done)
            if a.kind.startswith("RECV"):
                self.recvd.add(a)
        self.clock[r], self.idx[r], self.batch[r] = t_end, end, None
        return True

    def post(self, r: int, i: int, a: Action) -> Action:
        self.check_stage(r, a, at=i)
        if a in self.posted:
            self.fail(r, a, at=i, why=f"posted twice (also on rank {self.posted[a][0]})")
        p = _partner(self.s, a)
        if p is None:
            self.fail(r, a, at=i, why=f"stage {a.stage} has no peer for {a.kind} on micro-batch "
                                      f"{a.mb}'s route {list(self.s.routes[a.mb])}")
        if self.s.stage_to_rank[p.stage] == r:
            self.fail(r, a, at=i, why=f"stage {p.stage} is on the same rank: tensors pass locally, "
                                      "without comms")
        key = (a.stage, a.mb)
        if a.kind == "SEND_F" and key not in self.fwd:
            self.fail(r, a, at=i, why="sends an output before the forward that computes it")
        if a.kind == "SEND_B" and key not in self.bwd:
            self.fail(r, a, at=i, why="sends an input gradient before the B/I that computes it")
        self.posted[a] = (r, self.clock[r])
        return p

    # ------------------------------------------------------------- end of run

    def check_deadlock(self) -> None:
        blocked: dict[int, list[Action]] = {}
        lines = []
        for r in range(self.s.pp):
            if self.idx[r] >= len(self.lists[r]):
                continue
            end, _, _ = self.batch[r]  # a rank stops only inside a posted, incomplete batch
            waiting = []
            for a in self.lists[r][self.idx[r]:end]:
                p = _partner(self.s, a)
                if p in self.posted:
                    continue
                peer = self.s.stage_to_rank[p.stage]
                state = ("has finished its list" if self.idx[peer] >= len(self.lists[peer])
                         else f"is at action {self.idx[peer]} ({self.lists[peer][self.idx[peer]]})")
                waiting.append(a)
                lines.append(f"  rank {r} blocked on {a}: waits for {p} from rank {peer}, which {state}")
            blocked[r] = waiting
        if blocked:
            raise DeadlockError("deadlock: no rank can progress (rendezvous sends, one batch per run of "
                                "comm actions)\n" + "\n".join(lines), blocked)

    def check_complete(self) -> None:
        missing = []
        for k, route in enumerate(self.s.routes):
            for s in route:
                if (s, k) not in self.fwd:
                    missing.append(f"{s}F{k}")
                b = self.bwd.get((s, k))
                if b is None:
                    missing.append(f"{s}B{k} (or {s}I{k}+{s}W{k})")
                elif b == "I" and (s, k) not in self.wgt:
                    missing.append(f"{s}W{k}")
        if missing:
            more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
            raise ScheduleError(f"incomplete schedule: never ran {', '.join(missing[:12])}{more}")
        if self.zero:
            bad = [s for s in range(self.s.n_stages) if self.visits[s] and s not in self.reduced]
            if bad:
                raise ScheduleError(f"stages {bad} never ran REDUCE_GRAD")
            if self.unsharded:
                raise ScheduleError(f"stages {sorted(self.unsharded)} end unsharded (no RESHARD)")


def simulate(lowered: Sequence[Sequence[Action]], schedule: Schedule, *,
             costs: Mapping[str, float] | None = None) -> SimResult:
    """Execute lowered per-rank lists in order on a model clock (see module docstring).

    Raises DeadlockError when ranks wait on each other forever, ScheduleError when an action
    breaks a data dependency or the step is incomplete."""
    return _Sim(lowered, schedule, resolve_costs(costs)).run()


def _is_compute(name: str) -> bool:
    try:
        return Action.parse(name).is_compute
    except ValueError:  # e.g. the runtime's "1SEND_F0+1RECV_B2" batch events
        return False


def measured_bubble(events: Iterable[Event], pp: int) -> float:
    """1 - compute time / (pp x span), from any timeline (simulated or measured)."""
    events = list(events)
    if not events:
        return 0.0
    span = max(e.end for e in events) - min(e.start for e in events)
    compute = sum(e.end - e.start for e in events if _is_compute(e.action))
    return 1.0 - compute / (pp * span) if span > 0 else 0.0

