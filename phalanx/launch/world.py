"""Start a world of ranks (benchmarks, calibration probes) as fresh processes, wait with a deadline, clean up.

A rank is `python -m MODULE --worker SPEC` with torchrun's environment; rank 0
writes the JSON result to `spec["out"]`. A rank that fails or a world still
running at the deadline raises RuntimeError with the ranks' log tails, and no
process outlives the call.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def pin(cores: Sequence[int] | None, rank: int) -> None:
    """One core per rank when there are enough (DESIGN.md: goaled timings pin)."""
    if cores:
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _failure(label: str, what: str, ranks: Sequence[int], procs: Sequence[subprocess.Popen],
             logs: Sequence[Path]) -> str:
    for p in procs:  # stop the others first, so the logs are final
        if p.poll() is None:
            p.kill()
    parts = [f"{label}: {what}"]
    for r in ranks or range(len(procs)):
        parts.append(f"--- rank {r} (exit {procs[r].poll()}) ---\n{_tail(logs[r])}")
    return "\n".join(parts)


def run_world(module: str, spec: dict[str, Any], *, world: int, timeout: float,
              label: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as tmp:
        tmpdir = Path(tmp)
        out = tmpdir / "result.json"
        spec_path = tmpdir / "spec.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out)}))
        port = free_port()
        procs: list[subprocess.Popen] = []
        logs = [tmpdir / f"rank{r}.log" for r in range(world)]
        try:
            for r in range(world):
                env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                with open(logs[r], "w") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", module, "--worker", str(spec_path)],
                        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed:
                    raise RuntimeError(_failure(label, f"rank(s) {failed} failed", failed, procs,
                                                logs))
                if time.monotonic() > deadline:
                    stuck = [r for r, p in enumerate(procs) if p.poll() is None]
                    raise RuntimeError(_failure(label, f"timed out after {timeout:.0f} s; still "
                                                f"running: ranks {stuck}", stuck, procs, logs))
                time.sleep(0.1)
            failed = [r for r, p in enumerate(procs) if p.returncode != 0]
            if failed:
                raise RuntimeError(_failure(label, f"rank(s) {failed} failed", failed, procs, logs))
            return json.loads(out.read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
