"""`phalanx bench planner`: the figure math on known inputs, and one tiny real measurement
(2 layouts of model=tiny, 1 repetition) through the worlds, checked for the document's schema."""

import math

import pytest

from phalanx.bench import BENCHES, result_doc
from phalanx.bench.planner import (
    LAYOUTS,
    bench_model,
    figures_from,
    ranks,
    rel_error,
    spearman,
    top1_gap,
)

# A what-if CPU cluster with its figures given, so the test needs no calibration.
FIGURES = ["cluster.peak_tflops=0.05", "cluster.mfu=0.5", "cluster.intra.alpha_us=30",
           "cluster.intra.bandwidth_gbps=4", "cluster.cores_per_node=64"]


def test_spearman_ranks_and_errors_on_known_inputs():
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair of 4: 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    # monotone but not linear: ranks only
    assert spearman([1, 2, 3], [1, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert rel_error(1.1, 1.0) == pytest.approx(0.1)
    assert rel_error(0.8, 1.0) == pytest.approx(-0.2)
    assert top1_gap({"a": 1.0, "b": 1.05, "c": 2.0}, "b") == pytest.approx(0.05)
    assert top1_gap({"a": 1.0, "b": 1.05}, "a") == 0.0


def _row(model, name, pred, meas, *, first=False, world=2, mem=0.1):
    return {"kind": "layout", "model": model, "world": world, "name": name,
            "planner_rank": 1 if first else None, "predicted_step_s": pred,
            "measured_step_s": meas, "step_error": rel_error(pred, meas),
            "memory": {c: {"error": mem} for c in ("model_states", "activations", "peak")}}


def test_figures_from_rows():
    rows = [_row("a", "x", 1.0, 1.0, first=True), _row("a", "y", 2.2, 2.0),
            _row("a", "z", 2.7, 3.0, mem=-0.3),
            _row("b", "x", 1.0, 1.25), _row("b", "y", 2.0, 1.0, first=True),
            _row("a", "over", 5.0, 4.0, world=4)]
    figs = figures_from(rows, plan_seconds={"plan_seconds_llama70b_512": 1.5})
    # world-2 errors: 0, 0.1, 0.1, 0.2, 1.0
    assert figs["median_abs_error"] == pytest.approx(0.1)
    assert figs["worst_abs_error"] == pytest.approx(1.0)
    assert figs["spearman_a"] == pytest.approx(1.0) and figs["spearman_b"] == pytest.approx(-1.0)
    assert figs["spearman"] == pytest.approx(-1.0)  # the worst model
    assert figs["top1_gap_a"] == 0.0 and figs["top1_gap_b"] == 0.0  # y is b's measured fastest
    rows[0]["planner_rank"], rows[1]["planner_rank"] = None, 1  # a's first choice: y, 2.0 s
    assert figures_from(rows, plan_seconds={})["top1_gap"] == pytest.approx(1.0)
    assert figs["layouts_measured"] == 5.0
    assert figs["memory_worst_abs_error_activations"] == pytest.approx(0.3)
    assert figs["memory_median_abs_error_peak"] == pytest.approx(0.1)
    assert figs["median_abs_error_4rank"] == pytest.approx(0.25)
    assert figs["plan_seconds_llama70b_512"] == 1.5


@pytest.mark.e2e
def test_tiny_measurement_through_the_world_has_the_schema():
    rows = bench_model("tiny", world=2, specs=LAYOUTS["tiny"][1:], warmup=1, reps=1,
                       extra_overrides=FIGURES, log=lambda _msg: None)
    info, layouts = rows[0], rows[1:]
    assert info["kind"] == "planner" and info["first_choice"]
    # the machine's speed now, by calibration's block probe (no profile here: no ratio)
    assert info["speed_check"]["before_mbs1"]["now_ms"] > 0
    assert set(info["during_timing"]) == {"other_cpu_cores", "steal_cores"}
    assert [r["name"] for r in layouts] == ["planner_top", "pp2_1f1b"]
    assert layouts[0]["planner_rank"] == 1 and layouts[0]["trainer"] == "DataParallelTrainer"
    assert layouts[1]["trainer"] == "PipelineTrainer"
    for r in layouts:
        assert r["world"] == 2 and r["placement"] == "pinned one per core"
        assert r["measured_step_s"] > 0 and r["predicted_step_s"] > 0
        assert math.isfinite(r["step_error"]) and len(r["steps_s"]) == 1
        assert set(r["predicted_cost"]) >= {"compute", "bubble", "dp_comm", "optimizer", "total"}
        assert len(r["load_before"]) == 3 and len(r["load_after_memory"]) == 3
        for cat in ("model_states", "activations", "peak"):
            m = r["memory"][cat]
            assert m["predicted_mb"] > 0 and m["measured_mb"] >= 0
        # live model-state bytes match the formula exactly (fp32 + AdamW)
        assert r["memory"]["model_states"]["error"] == pytest.approx(0.0, abs=0.02)
    figs = figures_from(rows, plan_seconds={"plan_seconds_llama70b_512": 1.0,
                                            "plan_seconds_gpt3_3072": 2.0})
    doc = result_doc("planner", quick=True, runs=rows,
                     figures={k: v for k, v in figs.items() if math.isfinite(v)})
    for key in ("median_abs_error", "worst_abs_error", "spearman", "top1_gap", "layouts_measured",
                "plan_seconds_llama70b_512", "plan_seconds_gpt3_3072",
                "memory_worst_abs_error_model_states", "memory_worst_abs_error_activations",
                "memory_worst_abs_error_peak"):
        assert key in doc["figures"], key
    assert doc["figures"]["layouts_measured"] == 2.0
    assert "planner" in BENCHES
