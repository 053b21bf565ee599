"""The run directory (DESIGN.md): config.yaml, plan.json, metrics.jsonl, events.jsonl, summary.json."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "logs").mkdir(exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a")
        self._events = open(self.path / "events.jsonl", "a")
        self._t0 = time.monotonic()
        # Events come from the watch loop and from the controller's helper threads (the store
        # guard, the node agents' watch): one line each, never interleaved.
        self._lock = threading.Lock()

    def write_config(self, yaml_text: str) -> None:
        _write_atomic(self.path / "config.yaml", yaml_text)

    def write_plan(self, plan_json: str) -> None:
        _write_atomic(self.path / "plan.json", plan_json)

    def metric(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()

    def event(self, name: str, /, **fields: Any) -> dict[str, Any]:
        rec = {"event": name, "time": time.time(), "t": round(time.monotonic() - self._t0, 3),
               **fields}
        with self._lock:
            if not self._events.closed:
                self._events.write(json.dumps(rec, sort_keys=True) + "\n")
                self._events.flush()
        return rec

    def worker_log(self, rank: int) -> Path:
        return self.path / "logs" / f"rank{rank}.log"

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_atomic(self.path / "summary.json", json.dumps(summary, indent=1, sort_keys=True))

    def close(self) -> None:
        with self._lock:
            self._metrics.close()
            self._events.close()
