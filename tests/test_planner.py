"""The planner: only valid layouts, within the memory budget, fixed dimensions honoured."""

import pytest
from omegaconf import OmegaConf

from phalanx.config import validate
from phalanx.launch.cli import compose_recipe
from phalanx.launch.plan_cli import fixed_dims, main, make_plan

# A what-if CPU cluster with its figures given, so no calibration is needed here.
FIGURES = ["cluster.peak_tflops=0.05", "cluster.mfu=0.5", "cluster.intra.alpha_us=30",
           "cluster.intra.bandwidth_gbps=4", "cluster.cores_per_node=64"]


def _run(overrides):
    return OmegaConf.to_object(compose_recipe(overrides))


@pytest.mark.parametrize("model,world,batch", [("tiny", 2, 16), ("tiny", 4, 16), ("small", 8, 32)])
def test_every_planned_layout_passes_the_validator(model, world, batch):
    base = [f"model={model}", "--nproc-per-node", str(world), f"trainer.global_batch={batch}",
            *FIGURES]
    result, _, _ = make_plan(_run(base), base, top_k=50)
    assert result.top, "something must fit"
    for s in result.top:
        validate(compose_recipe([*base, *s.cand.overrides()]))  # raises if the planner erred


def test_memory_budget_drops_layouts_over_it():
    base = ["model=small", "--nproc-per-node", "4", "trainer.global_batch=32", *FIGURES]
    free, _, _ = make_plan(_run(base), base, top_k=1000)
    peaks = sorted(s.memory.total for s in free.top)
    budget = peaks[len(peaks) // 2]  # half the layouts fit
    tight = [*base, f"cluster.memory_per_device_gb={budget / 1e9}"]
    result, _, hw = make_plan(_run(tight), tight, top_k=1000)
    assert 0 < len(result.top) < len(free.top)
    assert all(s.memory.total <= hw.memory_per_device for s in result.top)
    assert result.rejected_memory and result.rejected_memory[0].memory.total > budget


def test_fixed_dimensions_are_honoured_and_compared_with_the_best(capsys):
    base = ["model=small", "--nproc-per-node", "4", "trainer.global_batch=32", *FIGURES]
    fixed = [*base, "parallel.pp=2", "parallel.recompute=full"]
    run = _run(fixed)
    assert fixed_dims(fixed, run) == {"pp": 2, "recompute": "full"}
    result, best, _ = make_plan(run, fixed, top_k=20)
    assert result.top and all(s.cand.pp == 2 and s.cand.recompute == "full" for s in result.top)
    assert best.top[0].cost.total <= result.top[0].cost.total
    assert main(fixed) == 0
    assert "step time vs the best layout" in capsys.readouterr().out


def test_nothing_fits_says_what_is_short(capsys):
    args = ["model=llama_7b", "--nproc-per-node", "2", "trainer.global_batch=8",
            "cluster.memory_per_device_gb=1", *FIGURES]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "nothing fits" in err and "GB more than the" in err


def test_uncalibrated_cpu_cluster_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PHALANX_CACHE", str(tmp_path))
    assert main(["model=tiny"]) == 2
    assert "run `phalanx calibrate`" in capsys.readouterr().err


def test_simulated_bubble_is_the_simulators_and_shared_across_micro_batches():
    from phalanx.orchestrator.cost import _simulated_fraction, simulated_bubble
    from phalanx.parallel.pipeline.lowering import lower
    from phalanx.parallel.pipeline.schedules import build_schedule
    from phalanx.parallel.pipeline.simulator import simulate

    for name, pp, vpp, m, b in [("1f1b", 4, 1, 8, 2.0), ("zb_h1", 4, 1, 8, 3.0),
                                ("interleaved_1f1b", 4, 2, 8, 2.25), ("1f1b", 3, 1, 7, 2.5)]:
        s = build_schedule(name, pp=pp, vpp=vpp, n_microbatches=m)
        costs = {"F": 1.0, "B": b, "I": b / 2, "W": b / 2}
        want = simulate(lower(s, costs=costs), s, costs=costs).bubble_fraction
        assert simulated_bubble(name, pp, vpp, m, 1.0, b) == want
    # m = 16 and 32 both simulate 8 micro-batches (2 pp): one simulation for both.
    _simulated_fraction.cache_clear()
    simulated_bubble.cache_clear()
    assert simulated_bubble("1f1b", 4, 1, 16) > simulated_bubble("1f1b", 4, 1, 32) > 0
    assert _simulated_fraction.cache_info().misses == 1


def test_planning_leaves_the_collector_as_it_found_it():
    import gc

    base = ["model=tiny", "--nproc-per-node", "2", "trainer.global_batch=16", *FIGURES]
    run = _run(base)
    assert gc.isenabled()
    assert make_plan(run, base)[0].top
    assert gc.isenabled()
    gc.disable()
    try:
        make_plan(run, base)
        assert not gc.isenabled()
    finally:
        gc.enable()
