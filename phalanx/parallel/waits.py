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

Two things every wait also does, for fault tolerance:
- time blocked here is summed (`waited_s`): a rank's *busy* time is its step time minus the
  time it waited on peers, which is what tells a straggler from the ranks waiting for it
  (with synchronous collectives every rank's wall-clock step takes as long as the slowest);
- a fault hook (`set_fault_hook`, fault injection) is told which operation the rank is about
  to block in ("recv", "send", "allreduce", "allgather", ... or the caller's label), and
  operations a rank was waiting in when its step was abandoned are remembered
  (`take_aborted`), so an event can say where the rank was when its generation ended.
Waits that happen outside `wait` (DDP's reducer waits on its comm hook's futures) report
through `add_waited` / `note_aborted` / `fault_point`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StepAborted", "aborting", "add_waited", "fault_point", "has_abort_check", "note_aborted",
           "op_name",
           "set_abort_check", "set_fault_hook", "take_aborted", "wait", "waited_s"]

POLL_S = 0.05
_check: Callable[[], bool] | None = None
_waiter: _Waiter | None = None
# fault injection: called with the operation's name before a rank blocks in it; returns a
# callable to run once the operation is in flight (the fault), or None.
_fault_hook: Callable[[str], Callable[[], None] | None] | None = None
_lock = threading.Lock()
_waited = [0.0]
_aborted: list[str] = []

# torch's c10d OpType values (Work._get_op_type) -> the names fault injection uses.
_OP_NAMES = {0: "broadcast", 1: "allreduce", 2: "allreduce", 3: "reduce", 4: "allgather",
             5: "allgather", 6: "allgather", 7: "gather", 8: "scatter", 9: "reduce_scatter",
             10: "alltoall", 11: "alltoall", 12: "send", 13: "recv", 14: "recv", 15: "barrier",
             16: "reduce_scatter", 19: "reduce_scatter"}


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


def set_fault_hook(hook: Callable[[str], Callable[[], None] | None] | None) -> None:
    """Install (or remove) fault injection's hook: hook(op) before a rank blocks in `op`."""
    global _fault_hook
    _fault_hook = hook


def op_name(work: Any) -> str:
    """"recv", "send", "allreduce", ... for a c10d Work (its op type), "op" if unknown."""
    try:
        return _OP_NAMES.get(int(work._get_op_type()), "op")
    except Exception:  # noqa: BLE001 - a Work without the (private) accessor: unnamed
        return "op"


def fault_point(op: str) -> Callable[[], None] | None:
    """For callers that issue an operation and wait elsewhere: call before issuing it; run
    what it returns (if anything) right after, while the operation is in flight."""
    hook = _fault_hook
    return hook(op) if hook is not None else None


def add_waited(seconds: float) -> None:
    with _lock:
        _waited[0] += seconds


def waited_s() -> float:
    """Seconds this process has spent blocked on peers' transfers so far."""
    return _waited[0]


def note_aborted(op: str) -> None:
    with _lock:
        _aborted.append(op)


def take_aborted() -> list[str]:
    """The operations waits ended in with an error or an abort since the last call."""
    with _lock:
        out = sorted(set(_aborted))
        _aborted.clear()
    return out


def wait(work: Any, op: str | None = None) -> None:
    """Wait for `work` (nothing blocks for ever, see above). `op` names the operation for
    fault injection and events when the caller knows better than its op type (e.g. a
    gradient reduction vs. a small agreement all-reduce)."""
    if work is None:
        return
    if _fault_hook is not None:
        fire = _fault_hook(op or op_name(work))
        if fire is not None:
            fire()  # the operation was issued before this wait: it is in flight now
    t0 = time.perf_counter()
    try:
        _wait(work)
    except BaseException:
        note_aborted(op or op_name(work))
        raise
    finally:
        add_waited(time.perf_counter() - t0)


def _wait(work: Any) -> None:
    global _waiter
    check = _check
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
