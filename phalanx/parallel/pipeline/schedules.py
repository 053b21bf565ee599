"""Pipeline schedules as data: per-rank compute orders plus per-micro-batch routes.

A `Schedule` holds only compute actions (F, B, I, W), in the order each rank
runs them; `lowering.lower` adds the sends, receives and ZeRO actions. Each
micro-batch carries a route (the stage sequence it visits) because recovery
(CheckFree+) and NoLoCo change it per micro-batch, so nothing downstream may
assume that stage s hands over to stage s + 1.

The generators follow the papers and Megatron/torch; where our order differs
from `torch.distributed.pipelining`'s `pipeline_order`, the generator says so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from phalanx.parallel.pipeline.actions import Action


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or one before its input."""


@dataclass(frozen=True)
class Schedule:
    name: str
    pp: int
    vpp: int
    n_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    # Empty means "every micro-batch visits 0..S-1"; __post_init__ fills it in so equality
    # and JSON do not depend on whether the caller spelled the default out.
    routes: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        for dim in ("pp", "vpp", "n_microbatches"):
            if getattr(self, dim) < 1:
                raise ValueError(f"Schedule {self.name!r}: {dim}={getattr(self, dim)} must be >= 1")
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        object.__setattr__(self, "actions", tuple(tuple(a) for a in self.actions))
        routes = self.routes or tuple(tuple(range(self.n_stages)) for _ in range(self.n_microbatches))
        object.__setattr__(self, "routes", tuple(tuple(r) for r in routes))
        self._check_shape()

    def _check_shape(self) -> None:
        n = self.pp * self.vpp
        if len(self.stage_to_rank) != n:
            raise ValueError(f"Schedule {self.name!r}: stage_to_rank has {len(self.stage_to_rank)} "
                             f"entries, expected pp*vpp = {self.pp}*{self.vpp} = {n}")
        for r in range(self.pp):
            held = self.rank_stages(r)
            if len(held) != self.vpp:
                raise ValueError(f"Schedule {self.name!r}: rank {r} holds stages {list(held)}, "
                                 f"expected vpp={self.vpp} stages on every rank")
        if len(self.actions) != self.pp:
            raise ValueError(f"Schedule {self.name!r}: {len(self.actions)} action lists for "
                             f"pp={self.pp} ranks")
        for r, acts in enumerate(self.actions):
            for a in acts:
                if not a.is_compute:
                    raise ValueError(f"Schedule {self.name!r}: rank {r} has {a}; a schedule holds compute "
                                     "actions only (lowering adds comms and ZeRO actions)")
                if a.stage >= n or self.stage_to_rank[a.stage] != r:
                    raise ValueError(f"Schedule {self.name!r}: action {a} is on rank {r} but stage "
                                     f"{a.stage} is not placed there")
                if a.mb >= self.n_microbatches:
                    raise ValueError(f"Schedule {self.name!r}: action {a} names micro-batch {a.mb} of "
                                     f"n_microbatches={self.n_microbatches}")
        if len(self.routes) != self.n_microbatches:
            raise ValueError(f"Schedule {self.name!r}: {len(self.routes)} routes for "
                             f"{self.n_microbatches} micro-batches")
        for k, route in enumerate(self.routes):
            if not route or len(set(route)) != len(route) or not all(0 <= s < n for s in route):
                raise ValueError(f"Schedule {self.name!r}: route {list(route)} of micro-batch {k} must "
                                 f"visit distinct stages of 0..{n - 1}")

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def neighbours(self, stage: int, mb: int) -> tuple[int | None, int | None]:
        """(previous, next) stage of `stage` in micro-batch `mb`'s route; None at either end."""
        route = self.routes[mb]
        if stage not in route:
            raise ValueError(f"stage {stage} is not on micro-batch {mb}'s route {list(route)}")
        i = route.index(stage)
        return (route[i - 1] if i > 0 else None), (route[i + 1] if i + 1 < len(route) else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "pp": self.pp, "vpp": self.vpp, "n_microbatches": self.n_microbatches,
            "stage_to_rank": list(self.stage_to_rank),
            "actions": [[str(a) for a in acts] for acts in self.actions],
            "routes": [list(r) for r in self.routes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(
            name=d["name"], pp=d["pp"], vpp=d["vpp"], n_microbatches=d["n_microbatches"],
            stage_to_rank=tuple(d["stage_to_rank"]),
            actions=tuple(tuple(Action.parse(s) for s in acts) for acts in d["actions"]),
            routes=tuple(tuple(r) for r in d.get("routes", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Schedule:
        return cls.from_dict(json.loads(text) if isinstance(text, str) else dict(text))

    def to_csv(self, path: str | PathLike[str]) -> None:
        """torch's compute-only CSV: one row per rank, one action string per field."""
        write_actions_csv(path, self.actions)

    @classmethod
    def from_csv(cls, path: str | PathLike[str], *, name: str = "csv", n_microbatches: int | None = None,
                 stage_to_rank: Sequence[int] | None = None) -> Schedule:
        """Read torch's compute-only CSV. Placement and micro-batch count are inferred from
        the actions, as torch's `_validate_schedule` does, unless given."""
        rows = read_actions_csv(path)
        for acts in rows:
            comm = next((a for a in acts if a.is_comm), None)
            if comm is not None:
                raise ValueError(f"{path} holds {comm}: a lowered schedule; read it with read_actions_csv")
        # torch's single-stage schedules list REDUCE_GRAD in their compute order; lower(zero=True)
        # puts ZeRO actions back, so the schedule keeps compute only.
        rows = tuple(tuple(a for a in acts if a.is_compute) for acts in rows)
        pp = len(rows)
        if stage_to_rank is None:
            placed: dict[int, int] = {}
            for r, acts in enumerate(rows):
                for a in acts:
                    if placed.setdefault(a.stage, r) != r:
                        raise ValueError(f"{path}: stage {a.stage} is on ranks {placed[a.stage]} and {r}")
            if sorted(placed) != list(range(len(placed))):
                raise ValueError(f"{path}: stages {sorted(placed)} are not 0..S-1")
            stage_to_rank = [placed[s] for s in range(len(placed))]
        if n_microbatches is None:
            n_microbatches = 1 + max((a.mb for acts in rows for a in acts if a.mb is not None), default=0)
        return cls(name=name, pp=pp, vpp=len(stage_to_rank) // pp, n_microbatches=n_microbatches,
                   stage_to_rank=tuple(stage_to_rank), actions=rows)


def write_actions_csv(path: str | PathLike[str], rows: Sequence[Sequence[Action]]) -> None:
    """Per-rank action lists in torch's `_dump_csv` layout (also fits lowered lists:
    torch's `_load_csv(..., format="compute_comms")` reads them)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        for acts in rows:
            writer.writerow([str(a) for a in acts])


def read_actions_csv(path: str | PathLike[str]) -> tuple[tuple[Action, ...], ...]:
    """Per-rank action lists from torch's CSV layout (compute-only or lowered)."""
    with open(path, newline="") as f:
        # torch writes its idle slots (None) as empty fields: they carry no action.
        return tuple(tuple(Action.parse(s) for s in row if s.strip()) for row in csv.reader(f))


# ---------------------------------------------------------------- generators


def _check_dims(name: str, **dims: int) -> None:
    for dim, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {dim}={value!r} must be an integer >= 1")


def _per_rank(pp: int, rank_ops: Callable[[int], list[Action]]) -> tuple[tuple[Action, ...], ...]:
    return tuple(tuple(rank_ops(r)) for r in range(pp))


def gpipe(pp: int, n_microbatches: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019). Same order as torch's
    ScheduleGPipe (backwards in micro-batch order 0..m-1)."""
    _check_dims("gpipe", pp=pp, n_microbatches=n_microbatches)
    m = n_microbatches

    def ops(r: int) -> list[Action]:
        return [Action(r, "F", k) for k in range(m)] + [Action(r, "B", k) for k in range(m)]

    return Schedule(name="gpipe", pp=pp, vpp=1, n_microbatches=m, stage_to_rank=tuple(range(pp)),
                    actions=_per_rank(pp, ops))


def _one_f_one_b_ops(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - 1 - rank, m)  # in-flight micro-batches: pp - rank at most, as in PipeDream-Flush
    ops = [Action(rank, "F", k) for k in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        ops += [Action(rank, "F", warmup + i), Action(rank, "B", i)]
    ops += [Action(rank, "B", k) for k in range(m - warmup, m)]  # cool-down
    return ops


def one_f_one_b(pp: int, n_microbatches: int) -> Schedule:
    """1F1B (PipeDream-Flush; Narayanan et al. 2021): warm-up, steady state, cool-down.

    Differs from torch: Schedule1F1B refuses n_microbatches < pp; we cap the warm-up at
    n_microbatches as Megatron does (the schedule then degenerates to GPipe's). torch 2.13's
    `Schedule1F1B.pipeline_order` also numbers the last rank's forwards 1..m instead of
    0..m-1 (its runtime, `_step_microbatches`, runs 0..m-1, which is what we produce).
    """
    _check_dims("1f1b", pp=pp, n_microbatches=n_microbatches)
    return Schedule(name="1f1b", pp=pp, vpp=1, n_microbatches=n_microbatches,
                    stage_to_rank=tuple(range(pp)),
                    actions=_per_rank(pp, lambda r: _one_f_one_b_ops(r, pp, n_microbatches)))


def interleaved_1f1b(pp: int, vpp: int, n_microbatches: int) -> Schedule:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021, §2.2): rank r holds stages
    r, r+pp, ...; micro-batches go round in groups of pp, one chunk at a time.

    Same order as torch's ScheduleInterleaved1F1B whenever both accept the dims. Differences:
    torch also accepts n_microbatches % pp != 0 ("flexible rounds"); we refuse it as Megatron
    does, because the steady state then leaves ranks idle. Megatron warms up every
    micro-batch when n_microbatches == pp; we keep the general warm-up count there (torch's).
    With vpp == 1 we return plain 1F1B (Megatron): torch would warm up 2(pp-1-r) micro-batches,
    holding more activations for no gain in time.
    """
    _check_dims("interleaved_1f1b", pp=pp, vpp=vpp, n_microbatches=n_microbatches)
    m = n_microbatches
    if vpp == 1:
        s = one_f_one_b(pp, m)
        return Schedule(name="interleaved_1f1b", pp=pp, vpp=1, n_microbatches=m,
                        stage_to_rank=s.stage_to_rank, actions=s.actions)
    if m % pp:
        lo, hi = (m // pp) * pp, (m // pp + 1) * pp
        hint = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(
            f"interleaved_1f1b with pp={pp}, vpp={vpp} needs n_microbatches to be a multiple of pp, "
            f"got n_microbatches={m}: micro-batches go round the pipeline in groups of pp. Use "
            f"n_microbatches={hint} (n_microbatches = trainer.global_batch / (parallel.micro_batch_size "
            f"* dp)), or parallel.vpp=1.")
    total = m * vpp

    def stage_mb(r: int, k: int, *, backward: bool) -> tuple[int, int]:
        chunk = (k // pp) % vpp
        if backward:
            chunk = vpp - 1 - chunk
        return chunk * pp + r, (k // (pp * vpp)) * pp + k % pp

    def ops(r: int) -> list[Action]:
        # Enough forwards in flight that the first backward arrives just as the warm-up ends.
        warmup = min((vpp - 1) * pp + 2 * (pp - 1 - r), total)
        f = [Action(s, "F", k) for s, k in (stage_mb(r, i, backward=False) for i in range(total))]
        b = [Action(s, "B", k) for s, k in (stage_mb(r, i, backward=True) for i in range(total))]
        out = f[:warmup]
        for i in range(total - warmup):
            out += [f[warmup + i], b[i]]
        return out + b[total - warmup:]

    return Schedule(name="interleaved_1f1b", pp=pp, vpp=vpp, n_microbatches=m,
                    stage_to_rank=tuple(s % pp for s in range(pp * vpp)), actions=_per_rank(pp, ops))


def zb_h1(pp: int, n_microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3.1): backward split into
    I (input grad, on the critical path) and W (weight grad, deferrable). 1F1B's warm-up and
    steady state with I in place of B; rank r defers its first r W's to the cool-down, where
    they fill the time it would wait for rank 0 to finish. Rank r holds at most pp
    micro-batches (pp - r full ones), so the peak is rank 0's pp, as in 1F1B; the bubble
    drops to (pp-1)(F+B-2W), a third of 1F1B's when F = I = W.

    Same order as torch's ScheduleInterleavedZeroBubble with one stage per rank (its ZB1P at
    vpp=1, which is ZB-H1); torch additionally requires n_microbatches % max(1, m // pp) == 0.
    """
    _check_dims("zb_h1", pp=pp, n_microbatches=n_microbatches)
    m = n_microbatches

    def ops(r: int) -> list[Action]:
        warmup = min(pp - 1 - r, m)
        out = [Action(r, "F", k) for k in range(warmup)]
        w = 0
        for i in range(m):
            if warmup + i < m:
                out.append(Action(r, "F", warmup + i))
            out.append(Action(r, "I", i))
            if i >= r:
                out.append(Action(r, "W", w))
                w += 1
        return out + [Action(r, "W", k) for k in range(w, m)]

    return Schedule(name="zb_h1", pp=pp, vpp=1, n_microbatches=m, stage_to_rank=tuple(range(pp)),
                    actions=_per_rank(pp, ops))


def v_placement(pp: int) -> tuple[int, ...]:
    """Stage s -> rank for a V shape: down the ranks and back, so rank 0 holds the first and
    the last stage and the turn (stages pp-1, pp) stays on one rank without a send."""
    return tuple(range(pp)) + tuple(reversed(range(pp)))


def zb_v(pp: int, n_microbatches: int) -> Schedule:
    """ZB-V (Qi et al. 2023, §6): two stages per rank in a V, with I/W split. Port of torch's
    ScheduleZBVZeroBubble; the same order once torch's idle slots (None) are dropped.
    Like torch's, it is bubble-free when F = I = W and n_microbatches >= 2*pp - 1."""
    _check_dims("zb_v", pp=pp, n_microbatches=n_microbatches)
    m = n_microbatches
    n_micro = max(2 * pp - 1, m)  # generate a full pipeline, then drop micro-batches >= m

    def ops(r: int) -> list[Action]:
        c0, c1 = r, 2 * pp - 1 - r
        out: list[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (pp - r) - 1):
            out.append(Action(c0, "F", f0))
            f0 += 1
        for _ in range(r):
            out += [Action(c1, "F", f1), Action(c0, "F", f0)]
            f1, f0 = f1 + 1, f0 + 1
        for _ in range(pp - r):
            out += [Action(c1, "F", f1), Action(c1, "I", b1), Action(c1, "W", b1)]
            f1, b1 = f1 + 1, b1 + 1
        while f1 < f0 or f0 < n_micro:
            if f0 < n_micro:
                out.append(Action(c0, "F", f0))
                f0 += 1
            out += [Action(c0, "I", b0), Action(c0, "W", b0)]
            out += [Action(c1, "F", f1), Action(c1, "I", b1), Action(c1, "W", b1)]
            b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
        w0, w1 = b0, b1
        for _ in range(r):
            out += [Action(c0, "I", b0), Action(c1, "I", b1)]
            b0, b1 = b0 + 1, b1 + 1
        for _ in range(pp - r):
            out += [Action(c0, "I", b0), Action(c0, "W", w0)]
            b0, w0 = b0 + 1, w0 + 1
        out += [Action(c1, "W", k) for k in range(w1, b1)]
        out += [Action(c0, "W", k) for k in range(w0, b0)]
        return [a for a in out if a.mb < m]

    return Schedule(name="zb_v", pp=pp, vpp=2, n_microbatches=m, stage_to_rank=v_placement(pp),
                    actions=_per_rank(pp, ops))


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v")


def build_schedule(name: str, *, pp: int, vpp: int = 1, n_microbatches: int) -> Schedule:
    """The schedule called `name` (the recipe's `parallel.schedule`)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if name == "interleaved_1f1b":
        return interleaved_1f1b(pp, vpp, n_microbatches)
    if name == "zb_v":
        if vpp != 2:
            raise ValueError(f"zb_v places exactly 2 stages per rank (a V), got vpp={vpp}: "
                             "set parallel.vpp=2")
        return zb_v(pp, n_microbatches)
    if vpp != 1:
        raise ValueError(f"schedule {name!r} runs one stage per rank, got vpp={vpp}: set parallel.vpp=1, "
                         "or use interleaved_1f1b (any vpp) or zb_v (vpp=2)")
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb_h1": zb_h1}[name](pp, n_microbatches)
