"""The memory bench measures ZeRO's model states from live tensors; they match the formulas."""

import pytest

from phalanx.bench import result_doc
from phalanx.bench.memory import _variant, figures_from
from phalanx.launch.world import run_world

pytestmark = pytest.mark.e2e


def test_memory_bench_measures_zero_stages_against_formulas():
    shape = dict(seq_len=32, mbs=1, global_batch=4)
    spec = {"mode": "memory", "variants": [_variant("tiny", z, 4, **shape) for z in range(4)]}
    runs = run_world("phalanx.bench.memory", spec, world=4, timeout=240, label="memory test")
    speed = {"mode": "speed", "warmup": 1, "reps": 1,
             "variants": [_variant("tiny", z, 2, seq_len=32, mbs=2, global_batch=4)
                          for z in (0, 1, 2)]}
    runs += run_world("phalanx.bench.memory", speed, world=2, timeout=240, label="speed test")
    figs = figures_from(runs, "tiny")
    doc = result_doc("memory", quick=True, runs=runs, figures=figs)
    for z in range(4):
        assert doc["figures"][f"state_ratio_zero{z}"] == pytest.approx(1.0, abs=0.1)
        assert doc["figures"][f"peak_mb_zero{z}"] > 50
    states = {r["zero"]: r["state_bytes"] for r in runs if r["kind"] == "memory" and r["rank"] == 0}
    assert states[0] > states[1] > states[2] > states[3]  # each stage shards more
    assert doc["figures"]["speedup_zero1_vs_ddp"] > 0 and doc["figures"]["speedup_zero2_vs_ddp"] > 0
