"""Controller-side fault logic that is pure data: the random failure schedule and the
straggler detector (both unit-testable without processes).

- `draw_random_faults`: fault.random's failures as fault.inject entries, drawn from a seeded
  exponential distribution over steps (a Poisson process), capped by fault.max_failures.
- `StragglerWatch`: per step, every rank's busy time (wall time minus time blocked on
  peers, which the ranks measure and send with their votes); a rank whose busy time stays
  above `factor` x the median of its peers' for `steps` consecutive steps is a straggler.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Callable
from typing import Any

from phalanx.config import FAILURE_KINDS, RunConfig

__all__ = ["StragglerWatch", "draw_random_faults", "with_random_faults"]


def draw_random_faults(*, mtbf_steps: float, kinds: list[str], at: list[str], seed: int,
                       world: int, steps: int, budget: int) -> list[dict[str, Any]]:
    """fault.inject entries: failure steps at exponential gaps of mean `mtbf_steps` (rounded up,
    strictly increasing, below `steps`), each on a uniform rank with a uniform kind and point.
    At most `budget` of them; the same arguments always give the same list."""
    if mtbf_steps <= 0 or budget <= 0 or world <= 0:
        return []
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    t, last = 0.0, 0
    while len(out) < budget:
        t += rng.expovariate(1.0 / mtbf_steps)
        step = max(math.ceil(t), last + 1)
        if step >= steps:
            break
        last = step
        entry = {"rank": rng.randrange(world), "step": step, "kind": rng.choice(list(kinds)),
                 "random": True}
        point = rng.choice(list(at))
        if point != "step":
            entry["at"] = point
        out.append(entry)
    return out


def with_random_faults(run: RunConfig) -> tuple[RunConfig, list[dict[str, Any]]]:
    """The recipe with fault.random's draws appended to fault.inject, and the draws."""
    f, rf = run.fault, run.fault.random
    declared = sum(1 for i in f.inject if i["kind"] in FAILURE_KINDS)
    drawn = draw_random_faults(mtbf_steps=rf.mtbf_steps, kinds=list(rf.kinds), at=list(rf.at),
                               seed=rf.seed, world=run.world_size, steps=run.trainer.steps,
                               budget=f.max_failures - declared)
    if not drawn:
        return run, []
    fault = dataclasses.replace(f, inject=[*f.inject, *drawn])
    return dataclasses.replace(run, fault=fault), drawn


class StragglerWatch:
    """Flags ranks whose busy time stays far above their peers'.

    `peers(rank)` gives the ranks a rank is compared with (e.g. those holding the same
    pipeline stage). A rank is flagged once (until `reset`) after `steps` consecutive
    observed steps with busy > factor x median(peers' busy); the ratio reported is the
    median ratio over those steps."""

    def __init__(self, *, factor: float, steps: int,
                 peers: Callable[[int], list[int]], floor_s: float = 1e-3) -> None:
        self.factor, self.steps, self.peers, self.floor_s = factor, steps, peers, floor_s
        self.reset()

    def reset(self) -> None:
        self._streak: dict[int, list[float]] = {}
        self._flagged: set[int] = set()

    def observe(self, busy: dict[int, float]) -> list[dict[str, Any]]:
        """One step's busy seconds per rank -> the ranks newly flagged as stragglers:
        [{"rank", "ratio", "busy_s", "peers_median_s"}]."""
        out = []
        for r, b in sorted(busy.items()):
            others = [busy[p] for p in self.peers(r) if p != r and p in busy]
            if not others:
                continue
            med = statistics.median(others)
            ratio = b / max(med, self.floor_s)
            if ratio <= self.factor:
                self._streak.pop(r, None)
                continue
            streak = self._streak.setdefault(r, [])
            streak.append(ratio)
            if len(streak) >= self.steps and r not in self._flagged:
                self._flagged.add(r)
                out.append({"rank": r, "ratio": round(statistics.median(streak), 2),
                            "busy_s": round(b, 4), "peers_median_s": round(med, 4)})
        return out
