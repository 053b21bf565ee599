"""`phalanx bench`: the registry, the JSON document, and the pipeline bench's measurement on a
tiny case (2 processes, 1 repetition; the full bench lives in `phalanx bench pipeline`)."""

import json
import math
import socket

import pytest

from phalanx.bench import BENCHES, machine_info, result_doc, write_result
from phalanx.bench.pipeline import Case, bench
from phalanx.launch.cli import main as cli_main

TINY = Case(hidden=32, intermediate=64, layers=4, heads=2, kv_heads=2, seq=16, micro_batch=1,
            n_micro=4, warmup=1, reps=1)
REQUIRED = ("speedup_vs_torch_1f1b", "speedup_vs_torch_interleaved", "bubble_measured_interleaved",
            "bubble_simulated_interleaved", "bubble_measured_1f1b")


def test_pipeline_bench_tiny_case(tmp_path):
    doc = bench(TINY, quick=True, worlds=(2,), timeout=120)
    out = tmp_path / "sub" / "bench.json"
    write_result(doc, out)
    doc = json.loads(out.read_text())
    assert set(doc) == {"bench", "quick", "machine", "runs", "figures"}
    assert doc["bench"] == "pipeline" and doc["quick"] is True
    m = doc["machine"]
    assert m["cores"] >= 1 and m["cpu_model"] and m["torch"] and m["python"]
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(m)
    for key in REQUIRED:
        v = doc["figures"][key]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, v)
    assert all(math.isfinite(v) and v > 0 for v in doc["figures"].values()), doc["figures"]
    # One raw record per (schedule, implementation), each with its step times.
    assert {(r["schedule"], r["impl"]) for r in doc["runs"]} == {
        (s, i) for s in ("1f1b", "interleaved_1f1b") for i in ("torch", "phalanx")}
    for r in doc["runs"]:
        assert r["world"] == 2 and r["pinned"] in (True, False)
        assert len(r["step_s"]) == TINY.reps and r["tokens_per_s"] > 0
        assert r["grad_rel_diff_vs_other"] < 1e-4 and math.isfinite(r["loss"])


def test_result_doc_rejects_non_finite_figures():
    with pytest.raises(ValueError, match="finite"):
        result_doc("x", quick=True, runs=[], figures={"a": float("nan")}, machine={})
    assert "hostname" not in machine_info() and "pipeline" in BENCHES


def test_cli_lists_benches(capsys):
    assert cli_main(["bench", "--list"]) == 0
    assert "pipeline" in capsys.readouterr().out
    assert cli_main(["bench", "no-such-bench"]) == 2
