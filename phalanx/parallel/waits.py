"""Waiting on a collective or P2P transfer without blocking for ever (DESIGN.md: nothing
blocks forever).

A gloo operation cannot be cancelled, and its `is_completed()` stays False for a receive
until `wait()` itself runs, so it cannot be polled either. A rank blocked in a receive from a
peer that is alive but has already left the generation (it saw the failure first) would sit
there until the collective timeout -- after which gloo's group is dead anyway. So, once a
worker installs an abort check, `wait(work)` hands the blocking `work.wait()` to a waiter
thread and waits on an event, waking every 50 ms to ask the check whether the generation is
over; if it is, it raises `StepAborted` and leaves the waiter thread (and the abandoned
operation) behind with the abandoned group. Completion wakes the caller at once; the
hand-off costs tens of microseconds. Without a check (tests, benchmarks) it is `work.wait()`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["StepAborted", "aborting", "has_abort_check", "set_abort_check", "wait"]

POLL_S = 0.05
_check: Callable[[], bool] | None = None
_waiter: _Waiter | None = None


class StepAborted(RuntimeError):
    """The controller started a new generation while this rank waited on a transfer."""


class _Waiter(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="phalanx-wait")
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            work, done, box = self.jobs.get()
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                box.append(e)
            done.set()


def set_abort_check(check: Callable[[], bool] | None) -> None:
    """Install (or remove) the predicate polled while waiting: True = abandon the step."""
    global _check
    _check = check


def wait(work: Any) -> None:
    global _waiter
    check = _check
    if work is None:
        return
    if check is None:
        work.wait()
        return
    if _waiter is None:
        _waiter = _Waiter()
        _waiter.start()
    done, box = threading.Event(), []
    _waiter.jobs.put((work, done, box))
    while not done.wait(POLL_S):
        if check():
            _waiter = None  # it stays blocked in the abandoned wait; the next call starts anew
            raise StepAborted("a new generation started while waiting on a transfer")
    if box:
        raise box[0]


def has_abort_check() -> bool:
    """Whether a worker installed an abort check (`set_abort_check`)."""
    return _check is not None


def aborting() -> bool:
    """The abort check's answer now (False without one): the generation is over."""
    check = _check
    return check is not None and check()
