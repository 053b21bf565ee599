"""The controller's watch over the control-plane keys it writes.

Signatures keep a client without the token from making anyone *accept* a value, but c10d's
TCPStore lets any client that reaches the port overwrite or delete any key. A reader ignores
a forged value in a key the controller owns (a plan, a commit, `current`, an agent's
command) and waits for the real one; the guard makes sure the real one is there:

- it remembers every value the controller writes (through `GuardedStore`);
- a key that already holds a value the controller did not sign when the controller first
  writes it was forged ahead of time: reported, then overwritten as usual;
- every `period_s` it compares the store with what it remembers, from its own connection,
  and puts back each value a client overwrote or deleted, reporting it.

Commits are remembered for the last `keep_commits` steps only: a commit older than that has
been read by every rank. Nothing here unpickles anything; values are compared as bytes.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from phalanx.orchestrator.control_plane import open_value

log = logging.getLogger("phalanx.controller")

_GEN = re.compile(r"g(-?\d+)/")


class StoreGuard:
    def __init__(self, token: str, report: Callable[[str, str], None], *,
                 period_s: float = 0.25, keep_commits: int = 64) -> None:
        self._key = token.encode()
        self._report_fn = report
        self.period_s = period_s
        self._journal: dict[str, bytes] = {}
        self._commits: collections.deque[str] = collections.deque()
        self._keep_commits = keep_commits
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts: collections.Counter[str] = collections.Counter()

    def wrap(self, store: Any) -> GuardedStore:
        return GuardedStore(store, self)

    # -- bookkeeping (callers hold the lock) -----------------------------------------------
    def _record(self, key: str, raw: bytes) -> None:
        if key not in self._journal and "/commit/" in key:
            self._commits.append(key)
            if len(self._commits) > self._keep_commits:
                self._journal.pop(self._commits.popleft(), None)
        self._journal[key] = raw

    def _signed(self, key: str, raw: bytes) -> bool:
        m = _GEN.match(key)
        return m is not None and open_value(self._key, int(m.group(1)), key, raw)[1] is None

    def _report(self, key: str, how: str) -> None:
        self._counts[key] += 1
        n = self._counts[key]
        if n <= 10 or n % 100 == 0:  # an attacker in a loop must not fill the disk with events
            log.warning("control plane: %s was %s by another client; the controller's value "
                        "is back", key, how)
            self._report_fn(key, how if n == 1 else f"{how} (time {n})")

    # -- the audit -------------------------------------------------------------------------
    def audit(self, store: Any) -> int:
        """Put back what was overwritten or deleted; returns how many keys."""
        fixed = 0
        with self._lock:
            keys = list(self._journal)
            if not keys:
                return 0
            if store.check(keys):
                values = store.multi_get(keys)
            else:
                values = [store.get(k) if store.check([k]) else None for k in keys]
            for key, have in zip(keys, values, strict=True):
                want = self._journal[key]
                if have == want:
                    continue
                store.set(key, want)
                self._report(key, "deleted" if have is None else "overwritten")
                fixed += 1
        return fixed

    def start(self, connect: Callable[[], Any]) -> None:
        """Audit every period_s from a connection of its own (`connect()` makes it)."""
        def loop() -> None:
            store = connect()
            while not self._halt.wait(self.period_s):
                try:
                    self.audit(store)
                except Exception as e:  # noqa: BLE001 - the store is gone: the run is ending
                    log.debug("store guard: %s", e)

        self._thread = threading.Thread(target=loop, daemon=True, name="store-guard")
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.period_s + 1)


class GuardedStore:
    """A store client whose writes the guard remembers; everything else passes through."""

    def __init__(self, store: Any, guard: StoreGuard) -> None:
        self._store = store
        self._guard = guard

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def set(self, key: str, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        g = self._guard
        with g._lock:
            # One round trip when the key is new (the usual case): set it only if absent.
            prev = self._store.compare_set(key, "", raw)
            if prev != raw:
                if not g._signed(key, prev):
                    g._report(key, "written before the controller wrote it")
                self._store.set(key, raw)
            g._record(key, raw)

    def delete_key(self, key: str) -> bool:
        g = self._guard
        with g._lock:
            g._journal.pop(key, None)
            return self._store.delete_key(key)
