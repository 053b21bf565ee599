"""The measured pipeline timeline of a run, next to its metrics, and the simulator's view of it.

Workers write the last step's action timeline (timeline/pp{r}.json); the
controller aligns them, writes a Chrome trace (timeline.json, opens in
Perfetto) and a PNG, and simulates the same lowered schedule with the measured
mean cost of each action kind, so measured and simulated bubbles can be compared.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from phalanx.parallel.pipeline.lowering import lower
from phalanx.parallel.pipeline.schedules import Schedule
from phalanx.parallel.pipeline.simulator import Event, measured_bubble, simulate
from phalanx.parallel.pipeline.trace import plot_timeline, to_chrome_trace

log = logging.getLogger(__name__)


def mean_costs(events: list[Event]) -> dict[str, float]:
    """Mean duration per compute kind (F, B, I, W) in a measured timeline."""
    by_kind: dict[str, list[float]] = {}
    for e in events:
        kind = e.action.lstrip("0123456789").rstrip("0123456789")
        if kind in ("F", "B", "I", "W"):
            by_kind.setdefault(kind, []).append(e.end - e.start)
    return {k: statistics.fmean(v) for k, v in by_kind.items()}


def export_timeline(run_dir: Path, *, schedule: dict[str, Any]) -> dict[str, Any] | None:
    files = sorted((run_dir / "timeline").glob("pp*.json"))
    if not files:
        return None
    docs = [json.loads(f.read_text()) for f in files]
    raw = [Event(rank=d["pp_rank"], action=e["action"], start=e["start"], end=e["end"])
           for d in docs for e in d["events"]]
    t0 = min(e.start for e in raw)
    events = [Event(rank=e.rank, action=e.action, start=e.start - t0, end=e.end - t0) for e in raw]
    sched = Schedule.from_dict(schedule)
    sim = simulate(lower(sched), sched, costs=mean_costs(events))
    to_chrome_trace(events, path=run_dir / "timeline.json")
    to_chrome_trace(sim.events, path=run_dir / "timeline_simulated.json")
    title = f"{sched.name} pp={sched.pp} vpp={sched.vpp} m={sched.n_microbatches}"
    try:
        plot_timeline(events, run_dir / "timeline.png", title=f"measured: {title}")
        plot_timeline(sim.events, run_dir / "timeline_simulated.png", title=f"simulated: {title}")
    except ImportError:
        log.info("matplotlib is not installed: timeline PNGs skipped (pip install matplotlib)")
    return {"schedule": sched.name, "step": docs[0]["step"], "n_microbatches": sched.n_microbatches,
            "bubble_measured": measured_bubble(events, sched.pp),
            "bubble_simulated": sim.bubble_fraction}
