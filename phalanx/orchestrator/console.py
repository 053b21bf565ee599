"""The controller's live console: a rich progress line on a terminal, plain lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from phalanx.config import LoggingConfig

log = logging.getLogger("phalanx")

PLAIN_EVERY_S = 5.0


class Console:
    def __init__(self, cfg: LoggingConfig, *, total_steps: int) -> None:
        self.total = total_steps
        mode = cfg.console
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self._last_plain = 0.0
        self._progress = None
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                transient=False)
            self._task = self._progress.add_task("train", total=total_steps, loss="-", tps="-")
            self._progress.start()

    def update(self, rec: dict[str, Any]) -> None:
        step = rec["step"] + 1
        loss = f"{rec['loss']:.4f}"
        tps = f"{rec['tokens_per_s']:,.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, tps=tps)
            if "val_loss" in rec:
                self._progress.console.print(f"step {step}: val_loss {rec['val_loss']:.4f}")
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_EVERY_S or step == self.total or "val_loss" in rec:
                self._last_plain = now
                val = f" val_loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                log.info("step %d/%d loss %s%s %s tok/s", step, self.total, loss, val, tps)

    def note(self, text: str, *, warning: bool = False) -> None:
        """A line between progress updates: checkpoints, failures, recoveries."""
        if self._progress is not None:
            self._progress.console.print(f"[yellow]{text}[/]" if warning else text)
        elif self.mode != "off":
            (log.warning if warning else log.info)(text)

    def set_completed(self, steps: int) -> None:
        """A resumed run starts its bar where the checkpoint left off."""
        if self._progress is not None:
            self._progress.update(self._task, completed=steps)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
