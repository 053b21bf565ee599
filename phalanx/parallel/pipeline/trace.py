"""Pictures of a pipeline timeline: Chrome trace JSON (Perfetto) and a PNG.

Both take `Event`s, so a simulated schedule and a measured step look alike and
can be compared side by side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from os import PathLike
from typing import Any

from phalanx.parallel.pipeline.simulator import Event

_COLOURS = {"F": "#4e79a7", "B": "#e15759", "I": "#f28e2b", "W": "#59a14f",
            "comm": "#bab0ac", "zero": "#b07aa1"}


def _category(action: str) -> str:
    # Kind = the letters after the stage digits; batched runtime events join ops with "+".
    kind = action.lstrip("0123456789").rstrip("0123456789")
    if kind in ("F", "B", "I", "W"):
        return kind
    if kind in ("UNSHARD", "RESHARD", "REDUCE_GRAD"):
        return "zero"
    return "comm"


def to_chrome_trace(events: Iterable[Event], *, path: str | PathLike[str] | None = None,
                    us_per_unit: float = 1e6) -> dict[str, Any]:
    """Chrome trace with one row (pid = tid = rank) per rank; times are scaled by
    `us_per_unit` (seconds -> microseconds by default; a simulated unit shows as 1 s)."""
    events = list(events)
    trace: list[dict[str, Any]] = []
    for rank in sorted({e.rank for e in events}):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": rank,
                      "args": {"name": f"rank {rank}"}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": rank,
                      "args": {"sort_index": rank}})
    for e in events:
        cat = _category(e.action)
        trace.append({"name": e.action, "cat": "comm" if cat in ("comm", "zero") else "compute",
                      "ph": "X", "pid": e.rank, "tid": e.rank, "ts": e.start * us_per_unit,
                      "dur": (e.end - e.start) * us_per_unit})
    doc = {"traceEvents": trace, "displayTimeUnit": "ms"}
    if path is not None:
        with open(path, "w") as f:
            json.dump(doc, f)
    return doc


def plot_timeline(events: Iterable[Event], path: str | PathLike[str], *, title: str = "") -> None:
    """A Gantt chart (one row per rank, rank 0 on top) written as PNG. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on workers or CI
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_timeline needs matplotlib: pip install matplotlib") from e
    events = list(events)
    ranks = sorted({e.rank for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.2))
    try:
        for e in events:
            cat = _category(e.action)
            width = e.end - e.start
            if width <= 0:
                continue
            tall = cat not in ("comm", "zero")  # comm waits drawn thin, under the compute
            ax.barh(e.rank, width, left=e.start, height=0.8 if tall else 0.25,
                    color=_COLOURS[cat], edgecolor="black" if tall else "none", linewidth=0.4)
            if tall:
                ax.text(e.start + width / 2, e.rank, e.action, ha="center", va="center", fontsize=6,
                        clip_on=True)
        ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
        ax.invert_yaxis()
        ax.set_xlabel("time")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
