"""CheckFree / CheckFree+ recovery rules (phalanx.checkpoint.checkfree) and their bench."""

import dataclasses
import math

import pytest
import torch

from phalanx.checkpoint.checkfree import (
    EMBED_KEYS,
    HEAD_KEYS,
    LR_SCALE,
    NORM_EPS,
    checkfree_plus_routes,
    copy_stage,
    fresh_optimizer_,
    mirror_keys,
    reconstruct_stage,
    recovery_plan,
)
from phalanx.models import LlamaConfig, LlamaForCausalLM
from phalanx.parallel.pipeline.schedules import build_schedule

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _stage(s: int, n: int = 4, seed: int = 0) -> LlamaForCausalLM:
    per = TINY.num_hidden_layers // n
    m = LlamaForCausalLM(TINY, layer_ids=range(s * per, (s + 1) * per), has_embedding=s == 0,
                         has_head=s == n - 1)
    m.init_weights(seed)
    return m


def test_reconstruction_is_the_formula_on_hand_built_tensors():
    g = torch.Generator().manual_seed(0)
    prev = {"model.embed_tokens.weight": torch.randn(5, 3, generator=g),  # ignored: not a layer
            "model.layers.2.mlp.up_proj.weight": torch.randn(4, 3, generator=g),
            "model.layers.3.mlp.up_proj.weight": torch.randn(4, 3, generator=g)}
    nxt = {"model.layers.6.mlp.up_proj.weight": torch.randn(4, 3, generator=g),
           "model.layers.7.mlp.up_proj.weight": torch.randn(4, 3, generator=g)}
    out = reconstruct_stage(prev, nxt, 0.5, 2.0, [4, 5])
    a, b = 0.5 + NORM_EPS, 2.0 + NORM_EPS  # the larger gradient norm weighs more
    assert sorted(out) == ["model.layers.4.mlp.up_proj.weight", "model.layers.5.mlp.up_proj.weight"]
    for k_out, k_prev, k_next in ((4, 2, 6), (5, 3, 7)):
        want = (a * prev[f"model.layers.{k_prev}.mlp.up_proj.weight"]
                + b * nxt[f"model.layers.{k_next}.mlp.up_proj.weight"]) / (a + b)
        torch.testing.assert_close(out[f"model.layers.{k_out}.mlp.up_proj.weight"], want)
    # Two zero norms still give the plain mean; a layer-count mismatch is an error.
    torch.testing.assert_close(reconstruct_stage(prev, nxt, 0.0, 0.0, [4, 5])[
        "model.layers.4.mlp.up_proj.weight"], (prev["model.layers.2.mlp.up_proj.weight"]
                                               + nxt["model.layers.6.mlp.up_proj.weight"]) / 2)
    with pytest.raises(ValueError, match="equal layer counts"):
        reconstruct_stage(prev, nxt, 1.0, 1.0, [4])


def test_reconstructed_llama_stage_is_the_formula_applied_to_its_neighbours():
    s0, s1, s2 = _stage(0), _stage(1, seed=1), _stage(2, seed=2)
    new = reconstruct_stage(s0.state_dict(), s2.state_dict(), 0.3, 0.9, s1.layer_ids)
    s1.load_state_dict(new, strict=True)  # exactly the lost stage's tensors, global names
    a, b = 0.3 + NORM_EPS, 0.9 + NORM_EPS
    for k in (0, 1):
        for (name, p), q0, q2 in zip(s1.model.layers[str(2 + k)].named_parameters(),
                                     s0.model.layers[str(k)].parameters(),
                                     s2.model.layers[str(4 + k)].parameters(), strict=True):
            torch.testing.assert_close(p.data, (a * q0 + b * q2) / (a + b), msg=name)


def test_routes_are_permutations_with_exactly_half_swapped():
    for n_stages in (4, 6):
        for n_mb in (2, 4, 8):
            routes = checkfree_plus_routes(n_mb, n_stages)
            plain = tuple(range(n_stages))
            assert len(routes) == n_mb
            assert all(sorted(r) == list(plain) for r in routes)
            swapped = [mb for mb, r in enumerate(routes) if r != plain]
            assert swapped == list(range(1, n_mb, 2)) and len(swapped) == n_mb // 2
            want = (1, 0, *range(2, n_stages - 2), n_stages - 1, n_stages - 2)
            assert all(routes[mb] == want for mb in swapped)
    # The pipeline schedule accepts them as its per-micro-batch routes.
    sched = build_schedule("1f1b", pp=4, n_microbatches=4)
    assert dataclasses.replace(sched, routes=checkfree_plus_routes(4, 4)).routes[1] == (1, 0, 3, 2)
    with pytest.raises(ValueError, match="at least 4 stages"):
        checkfree_plus_routes(4, 3)


def test_recovery_plans_and_end_stage_copies():
    assert recovery_plan(1, 4, plus=False).sources == (0, 2)
    assert recovery_plan(0, 4, plus=False).kind == "none"
    assert recovery_plan(2, 4, plus=True).kind == "average"
    last = recovery_plan(3, 4, plus=True)
    assert (last.kind, last.sources, last.mirror_from) == ("copy", (2,), 2)
    # Stage 0 comes back as stage 1's layers plus the embedding mirrored on stage 1.
    s0, s1 = _stage(0), _stage(1, seed=1)
    mirror = {k: s0.state_dict()[k].clone() for k in mirror_keys(0, 4)}
    assert tuple(mirror) == EMBED_KEYS and mirror_keys(3, 4) == HEAD_KEYS
    lost = _stage(0, seed=9)
    lost.load_state_dict(copy_stage(s1.state_dict(), lost.layer_ids, mirror), strict=True)
    torch.testing.assert_close(lost.model.embed_tokens.weight, s0.model.embed_tokens.weight)
    for p, q in zip(lost.model.layers["0"].parameters(), s1.model.layers["2"].parameters(),
                    strict=True):
        torch.testing.assert_close(p, q)


def test_fresh_optimizer_zeroes_state_and_scales_lr_without_compounding():
    s1, s2 = _stage(1), _stage(2)
    opt = torch.optim.AdamW([{"params": list(s1.parameters())}, {"params": list(s2.parameters())}],
                            lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for _ in range(2):
        sum(m(torch.randn(1, 4, 32)).sum() for m in (s1, s2)).backward()
        opt.step()
        sched.step()
    for _ in range(2):  # a second recovery of the same stage does not compound the scale
        fresh_optimizer_(opt, s1.parameters(), base_lr=1e-2, scheduler=sched)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5 * 1e-2 * LR_SCALE)
    assert math.isclose(opt.param_groups[1]["lr"], 0.5 * 1e-2)
    st = opt.state[next(s1.parameters())]
    assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert float(opt.state[next(s2.parameters())]["step"]) == 2
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.5 * 1e-2 * LR_SCALE)
    mixed = torch.optim.AdamW([*s1.parameters(), *s2.parameters()], lr=1e-2)
    with pytest.raises(ValueError, match="mixes"):
        fresh_optimizer_(mixed, s1.parameters(), base_lr=1e-2)


@pytest.fixture
def one_thread():
    # Small ops on 2 cores: intra-op threads cost 10-15x (see the machine notes).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_tiny_run_has_the_figures_and_rollback_replays_exactly(tmp_path, one_thread):
    from phalanx.bench.checkfree import Case, bench, write_extras

    case = Case(model="tiny", steps=9, seq_len=32, micro_batch=1, n_micro=2, fail_every=3,
                checkpoint_every=2, warmup_steps=2, eval_every=4, eval_windows=2)
    doc = bench(case, quick=True)
    assert set(doc) == {"bench", "quick", "machine", "runs", "figures"}
    figs = doc["figures"]
    for k in ("nofail", "checkfree", "checkfree_plus", "rollback", "random_init"):
        assert math.isfinite(figs[f"final_loss_{k}"])
    assert figs["failures"] == 2 and figs["rollback_steps_lost"] >= 1
    runs = {r.get("variant", r["kind"]): r for r in doc["runs"]}
    assert "emulated in one process" in runs["setup"]["emulation"]
    assert [e["stage"] for e in runs["checkfree"]["failures"]] == [
        s for _, s in runs["setup"]["failure_schedule"]]
    # Rollback redoes committed steps with the same data from the same state: its loss at a
    # committed step is the failure-free run's at that step.
    ref, rb = runs["nofail"]["train_loss"], runs["rollback"]
    for loss, step in zip(rb["train_loss"], rb["committed_step"], strict=True):
        assert loss == pytest.approx(ref[step], rel=1e-5)
    assert runs["rollback"]["final_committed_step"] == case.steps - figs["rollback_steps_lost"]
    pytest.importorskip("matplotlib")
    assert write_extras(doc, tmp_path / "cf.json").stat().st_size > 1000


def test_scaled_rate_of_a_rebuilt_stage_survives_a_later_generation(tmp_path, one_thread):
    """A survivor carries its parameter groups' base rates into the next generation's trainer,
    so a stage rebuilt at LR_SCALE x keeps that rate after any later membership change."""
    import numpy as np
    import torch.distributed as dist

    from phalanx.checkpoint.recover import carry_over, survivor_state
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.parallel.data_parallel import DataParallelTrainer
    from phalanx.parallel.mesh import Layout

    run = validate(compose_recipe(["model=tiny", "trainer=smoke", "data=synthetic"]))
    tokens = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint16)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def trainer() -> DataParallelTrainer:
            return DataParallelTrainer(run, rank=0, layout=Layout(), tokens=tokens,
                                       device=torch.device("cpu"))

        old = trainer()
        old.train_step(0)
        params = [p for g in old.optimizer.param_groups for p in g["params"]]
        fresh_optimizer_(old.optimizer, params, base_lr=run.optim.lr, scheduler=old.scheduler)
        new = trainer()
        carry_over(survivor_state(old, step=1), new, step=1)
        assert new.scheduler.base_lrs == pytest.approx([LR_SCALE * run.optim.lr] * 2)
        assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx(
            [g["lr"] for g in old.optimizer.param_groups], rel=1e-12)
    finally:
        dist.destroy_process_group()
