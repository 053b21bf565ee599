import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Corpora are cached per test session, never in the user's home.
_CACHE = Path(os.environ.get("PHALANX_TEST_CACHE", "/tmp/phalanx-test-cache"))
os.environ.setdefault("PHALANX_CACHE", str(_CACHE))
# DeepSpeed's JIT-built ops outlive a test session (minutes to build on 2 cores).
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path("~/.cache/phalanx/torch_extensions").expanduser()))


@pytest.fixture(scope="session")
def phalanx_exe() -> list[str]:
    return [sys.executable, "-m", "phalanx"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_phalanx(args: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phalanx", "run", *args], capture_output=True,
                          text=True, timeout=timeout)


def run_summary(args: list[str], run_dir: Path, *, timeout: float) -> dict:
    """`phalanx run ARGS --run-dir RUN_DIR`, which must succeed: its summary.json, with the
    run directory under "dir"."""
    proc = run_phalanx([*args, "--run-dir", str(run_dir)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["dir"] = run_dir
    return summary
