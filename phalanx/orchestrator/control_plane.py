"""The control plane: signed JSON values in c10d's TCPStore, one prefix per generation.

TCPStore listens without authentication, so every value phalanx writes carries
an HMAC over (generation, key, value) made with the run's token; a value that is
unsigned or mis-signed is ignored and logged, never trusted (DESIGN.md). Values
are JSON, never pickles: nothing received over the network is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

TOKEN_ENV = "PHALANX_TOKEN"

# Called with (key, why) for each value this process rejects (the controller turns them into
# events); None: the warning in the log only.
_reject_hook: Callable[[str, str], None] | None = None


def set_reject_hook(hook: Callable[[str, str], None] | None) -> None:
    global _reject_hook
    _reject_hook = hook


def signature(key: bytes, generation: int, full_key: str, payload: str) -> str:
    msg = f"{generation}\0{full_key}\0{payload}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def seal(token: str, generation: int, full_key: str, value: Any) -> str:
    """The stored form of `value` at `full_key`: the JSON payload and its HMAC."""
    payload = json.dumps(value, separators=(",", ":"))
    return json.dumps({"v": payload, "sig": signature(token.encode(), generation, full_key,
                                                      payload)})


def open_value(key: bytes, generation: int, full_key: str, raw: bytes | str
               ) -> tuple[Any, str | None]:
    """(value, None) for a validly signed stored value, else (None, why). Any bytes may be
    there (a raw client can write anything): nothing here raises on them."""
    try:
        env = json.loads(raw)
        payload, sig = env["v"], env["sig"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, "not a signed phalanx value"
    if not isinstance(payload, str) or not isinstance(sig, str) or not sig.isascii():
        return None, "not a signed phalanx value"
    if not hmac.compare_digest(sig, signature(key, generation, full_key, payload)):
        return None, "bad signature"
    try:
        return json.loads(payload), None
    except ValueError:
        return None, "signed, but not JSON"


class ControlPlane:
    def __init__(self, store: dist.Store, *, token: str, generation: int) -> None:
        self.store = store
        self._key = token.encode()
        self.generation = generation
        self.rejected: list[str] = []
        self._seen: set[tuple[str, bytes]] = set()

    def _full(self, key: str) -> str:
        return f"g{self.generation}/{key}"

    def set(self, key: str, value: Any) -> None:
        full = self._full(key)
        self.store.set(full, seal(self._key.decode(), self.generation, full, value))

    def _decode(self, full: str, raw: bytes) -> Any:
        value, why = open_value(self._key, self.generation, full, raw)
        if why is not None:
            return self._reject(full, why, raw)
        return value

    def _reject(self, full: str, why: str, raw: bytes = b"") -> None:
        # A forged value stays in the store and is read again at every poll: say so once.
        seen = (full, hashlib.sha256(raw).digest())
        if seen not in self._seen:
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen.add(seen)
            self.rejected.append(full)
            log.warning("control plane: ignoring %s (%s)", full, why)
            if _reject_hook is not None:
                _reject_hook(full, why)
        return None

    def has(self, key: str) -> bool:
        return self.store.check([self._full(key)])

    def get(self, key: str) -> Any:
        """The value at `key`, or None when absent or not validly signed."""
        full = self._full(key)
        if not self.store.check([full]):
            return None
        return self._decode(full, self.store.get(full))

    def wait(self, key: str, timeout_s: float) -> Any:
        """Block until a validly signed value appears at `key` (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.get(key)
            if value is not None:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no value at control-plane key {self._full(key)} "
                                   f"after {timeout_s:.0f} s")
            # The store's own wait returns the moment the key is written (no polling delay on
            # a recovery's critical path). A value that is there but not validly signed makes
            # it return at once: then poll, so a forged key cannot make this spin.
            if self.store.check([self._full(key)]):
                time.sleep(min(0.05, left))
                continue
            try:
                self.store.wait([self._full(key)], timedelta(seconds=min(left, 5.0)))
            except (RuntimeError, dist.DistError):
                pass  # the store's timeout; the deadline check above decides

    def delete(self, key: str) -> None:
        self.store.delete_key(self._full(key))


def connect(host: str, port: int, *, timeout_s: float) -> dist.TCPStore:
    """A client connection to the controller's store."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
