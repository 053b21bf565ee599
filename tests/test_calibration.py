"""Calibration: the fits recover known parameters, the profile round-trips through JSON and is
cached per machine and model, and a short real calibration through the worker worlds gives a
sane profile."""

import dataclasses
import json
import math

import pytest

from phalanx.models.llama import LlamaConfig
from phalanx.orchestrator.calibration import (
    Profile,
    build_profile,
    cache_path,
    fit_alpha_beta,
    fit_cost,
    fit_linear,
    load_or_none,
    machine_fingerprint,
    summary,
)

TINY = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
SIZES = [4096 * 4 ** k for k in range(8)]


def test_fit_linear_recovers_intercept_and_slope():
    a, b = 3.1e-3, 12.5e-3
    f = fit_linear([8, 1, 4, 2], [a + b * x for x in (8, 1, 4, 2)])
    assert f.a == pytest.approx(a, rel=1e-9) and f.b == pytest.approx(b, rel=1e-9)
    assert f.r2 == pytest.approx(1.0) and f.max_rel_residual < 1e-9
    assert [x for x, _ in f.points] == [1, 2, 4, 8]  # sorted
    assert f(16) == pytest.approx(a + 16 * b)
    assert f.interp(3) == pytest.approx(a + 3 * b)
    noisy = fit_linear([1, 2, 4, 8], [a + b * x * (1.1 if x == 4 else 1.0) for x in (1, 2, 4, 8)])
    assert noisy.r2 < 1.0 and 0.0 < noisy.max_rel_residual < 0.1


def test_fit_alpha_beta_recovers_latency_and_bandwidth():
    alpha, beta = 25e-6, 3.5e9
    f = fit_alpha_beta(SIZES, [alpha + n / beta for n in SIZES], group_size=2)
    assert f.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert f.beta_bytes_per_s == pytest.approx(beta, rel=1e-6)
    assert f.r2 == pytest.approx(1.0) and f.max_rel_residual < 1e-6 and f.group_size == 2
    assert f.time(1e6) == pytest.approx(alpha + 1e6 / beta)
    assert f.interp(3e5) == pytest.approx(alpha + 3e5 / beta)  # between points: on the line
    assert f.interp(2 * SIZES[-1]) == pytest.approx(alpha + 2 * SIZES[-1] / beta)
    # Pure bandwidth data never yields a negative latency.
    g = fit_alpha_beta(SIZES, [n / beta * (1.2 if n == SIZES[0] else 1.0) for n in SIZES])
    assert g.alpha_s >= 0.0 and g.beta_bytes_per_s == pytest.approx(beta, rel=0.05)


def test_fit_cost_recovers_per_step_param_and_tensor_costs():
    c0, c1, c2 = 50e-6, 1.5e-9, 20e-6
    pts = [(16384, 64), (1_239_680, 9), (4_958_720, 36), (10_083_520, 75)]
    f = fit_cost([n for n, _ in pts], [k for _, k in pts], [c0 + c1 * n + c2 * k for n, k in pts])
    assert (f.per_step_s, f.per_param_s, f.per_tensor_s) == pytest.approx((c0, c1, c2), rel=1e-6)
    assert f.time(2e6, 10) == pytest.approx(c0 + c1 * 2e6 + c2 * 10)
    flat = fit_cost([1e5, 1e6, 4e6], [1, 1, 1], [c0 + c1 * n for n in (1e5, 1e6, 4e6)],
                    per_tensor=False)
    assert flat.per_tensor_s == 0.0 and flat.per_param_s == pytest.approx(c1, rel=1e-6)


def _records(*, ratio: float = 2.0) -> tuple[list[dict], list[dict]]:
    """Probe records of a 2-rank pinned world and a 4-rank oversubscribed one, from known
    parameters (rank 1 a little slower: compute takes the best rank, collectives the slowest)."""
    pinned, over = [], []
    for rank, slow in ((0, 1.0), (1, 1.02)):
        for rc, extra in (("none", 0.0), ("selective", 0.3), ("full", 1.0)):
            for mbs in (1, 2, 4, 8):
                fwd = (0.5e-3 + 3.5e-3 * mbs) * slow
                pinned.append({"probe": "block", "variant": "tp1", "tp": 1, "sp": False,
                               "recompute": rc, "mbs": mbs, "fwd_s": fwd,
                               "bwd_s": 2 * fwd + extra * fwd, "reps": 5, "rank": rank})
        for part in ("embedding", "head"):
            for mbs in (1, 2, 4, 8):
                pinned.append({"probe": part, "variant": "tp1", "tp": 1, "sp": False,
                               "recompute": "none", "mbs": mbs, "fwd_s": 1e-4 * mbs,
                               "bwd_s": 2e-4 * mbs, "reps": 5, "rank": rank})
        for op, alpha, beta in (("all_reduce", 100e-6, 2e9), ("p2p", 50e-6, 4e9)):
            for n in SIZES:
                t = (alpha + n / beta) * slow
                pinned.append({"probe": "collective", "op": op, "group_size": 2, "bytes": n,
                               "s": t, "mean_s": t, "min_s": t / 2, "reps": 5, "rank": rank})
        for kind, case, numel, tensors in (("flat", "f1", 1 << 20, 1), ("flat", "f4", 1 << 22, 1),
                                           ("list", "tiny64", 16384, 64), ("list", "layer", 1e6, 9),
                                           ("list", "model", 1e7, 75)):
            t = 50e-6 + 1.5e-9 * numel + 20e-6 * tensors
            pinned.append({"probe": "optimizer", "kind": kind, "case": case, "numel": numel,
                           "tensors": tensors, "adamw_s": t, "clip_s": t / 4, "clip_ddp_s": t / 5,
                           "rank": rank})
        pinned.append({"probe": "wall", "what": "block tp1", "s": 3.0, "rank": rank})
    pinned.append({"probe": "skipped", "what": "tp2", "reason": "heads", "rank": 0})
    for rank in range(4):
        for mbs in (1, 2):
            fwd = (0.5e-3 + 3.5e-3 * mbs) * ratio * 1.25  # others took a share too
            cpu = (0.5e-3 + 3.5e-3 * mbs) * ratio / 2  # the share 2 ranks per core give
            over.append({"probe": "block", "variant": "tp1", "tp": 1, "sp": False,
                         "recompute": "none", "mbs": mbs, "fwd_s": fwd, "bwd_s": 2 * fwd,
                         "fwd_cpu_s": cpu, "bwd_cpu_s": 2 * cpu, "rank": rank})
        for n in SIZES[:3]:
            over.append({"probe": "collective", "op": "all_reduce", "group_size": 4, "bytes": n,
                         "s": 1e-3 + n / 1e9, "mean_s": 1e-3 + n / 1e9, "rank": rank})
    return pinned, over


def _profile() -> Profile:
    pinned, over = _records()
    return build_profile(pinned, model=TINY, seq_len=128, compute_dtype="fp32",
                         oversubscribed=over, over_ranks=4, over_cores=2, meta={"quick": True})


def test_build_profile_fits_records_and_round_trips_through_json():
    prof = _profile()
    none = prof.compute["block"]["tp1"]["none"]
    assert none["fwd"].a == pytest.approx(0.5e-3, rel=1e-9)  # compute: the best rank
    assert none["fwd"].b == pytest.approx(3.5e-3, rel=1e-9)
    assert prof.compute_time("block", "bwd", 4, recompute="full") == pytest.approx(
        3 * (0.5e-3 + 14e-3))
    assert prof.compute["head"]["tp1"]["bwd"].b == pytest.approx(2e-4)
    ar = prof.collectives["intra"]["all_reduce"]  # the slowest rank's
    assert ar.alpha_s == pytest.approx(100e-6 * 1.02) and ar.beta_bytes_per_s == pytest.approx(
        2e9 / 1.02)
    assert ar.min_points[0] == (SIZES[0], pytest.approx((100e-6 + SIZES[0] / 2e9) * 1.02 / 2))
    assert prof.collective_time("p2p", 1e6) == pytest.approx((50e-6 + 1e6 / 4e9) * 1.02)
    adamw = prof.optimizer["adamw"]
    assert (adamw.per_step_s, adamw.per_param_s, adamw.per_tensor_s) == pytest.approx(
        (50e-6, 1.5e-9, 20e-6), rel=1e-6)
    assert prof.optimizer["adamw_flat"].per_tensor_s == 0.0
    o = prof.oversubscription
    assert o["compute_factor"] == pytest.approx(2.0) and o["ranks_per_core"] == 2.0
    assert o["measured_factor"] == pytest.approx(2.5)
    assert o["collectives"]["all_reduce"].group_size == 4
    assert prof.meta["skipped"] == {"tp2": "heads"} and prof.meta["quick"] is True

    text = prof.to_json()
    doc = json.loads(text)
    assert set(doc) == {"schema_version", "machine", "model", "seq_len", "compute_dtype",
                        "compute", "optimizer", "collectives", "oversubscription", "meta"}
    assert set(doc["compute"]["block"]["tp1"]["full"]["bwd"]) == {"a", "b", "r2",
                                                                  "max_rel_residual", "points"}
    assert set(doc["collectives"]["intra"]["all_reduce"]) == {
        "alpha_s", "beta_bytes_per_s", "r2", "max_rel_residual", "group_size", "points",
        "median_points", "min_points"}
    assert set(doc["optimizer"]) == {"adamw", "adamw_flat", "clip", "clip_flat", "clip_ddp"}
    assert set(doc["optimizer"]["adamw"]) == {"per_step_s", "per_param_s", "per_tensor_s", "r2",
                                              "max_rel_residual", "points"}
    assert {"fingerprint", "cpu_model", "usable_cores", "torch", "python"} <= set(doc["machine"])
    assert doc["model"]["hidden_size"] == 128 and "key" in doc["model"]
    assert Profile.from_json(text) == prof
    assert "block tp1 rc=full" in summary(prof)


def test_cache_path_is_keyed_by_machine_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PHALANX_CACHE", str(tmp_path))
    path = cache_path(TINY, seq_len=128, compute_dtype="fp32")
    assert path.parent == tmp_path / "profiles"
    assert path.name.startswith(machine_fingerprint()["fingerprint"] + "-")
    same = {"name": "other-name", **{f.name: getattr(TINY, f.name)
                                    for f in dataclasses.fields(TINY)}}
    assert cache_path(same, seq_len=128, compute_dtype="fp32") == path  # a dict works too
    for other in (cache_path(dataclasses.replace(TINY, hidden_size=256), seq_len=128,
                             compute_dtype="fp32"),
                  cache_path(dataclasses.replace(TINY, num_hidden_layers=8), seq_len=128,
                             compute_dtype="fp32"),
                  cache_path(TINY, seq_len=256, compute_dtype="fp32"),
                  cache_path(TINY, seq_len=128, compute_dtype="bf16"),
                  cache_path(TINY, seq_len=128, compute_dtype="fp32",
                             machine={"fingerprint": "another-machine"})):
        assert other != path

    assert load_or_none(TINY, seq_len=128, compute_dtype="fp32") is None
    prof = _profile()
    prof.save(path)
    assert load_or_none(TINY, seq_len=128, compute_dtype="fp32") == prof
    assert load_or_none(TINY, seq_len=256, compute_dtype="fp32") is None
    moved = dataclasses.replace(prof, machine={**prof.machine, "fingerprint": "elsewhere"})
    moved.save(path)  # a file copied from another machine is not this machine's profile
    assert load_or_none(TINY, seq_len=128, compute_dtype="fp32") is None
    path.write_text("{ torn")
    assert load_or_none(TINY, seq_len=128, compute_dtype="fp32") is None


def test_calibrate_rejects_a_bad_recipe_before_starting_workers(capsys):
    from phalanx.launch.cli import main

    assert main(["calibrate", "model=no_such_model"]) == 2
    assert main(["calibrate", "trainer.seq_len=100000"]) == 2
    assert main(["calibrate", "model"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.e2e
def test_real_calibration_of_tiny_gives_a_sane_profile(tmp_path, monkeypatch):
    from phalanx.launch.calibrate import calibrate

    monkeypatch.setenv("PHALANX_CACHE", str(tmp_path / "cache"))
    overrides = ["model=tiny", "trainer.seq_len=64"]
    prof, written = calibrate(overrides, quick=True, budget_scale=0.3, out=tmp_path / "p.json",
                              timeout=120, log=lambda _m: None)
    assert [p.name for p in written][-1] == "p.json" and all(p.exists() for p in written)
    assert load_or_none(TINY, seq_len=64, compute_dtype="fp32") == prof
    assert Profile.from_json((tmp_path / "p.json").read_text()) == prof

    blocks = prof.compute["block"]
    assert set(blocks) == {"tp1", "tp2", "tp2_sp"}  # tiny's 4 heads divide over 2 ranks
    for key, variant in blocks.items():
        assert set(variant) == {"none", "selective", "full"}
        for fits in variant.values():
            assert len(fits["fwd"].points) >= 3
            assert all(t > 0 for f in fits.values() for _, t in f.points)
            if key == "tp1":  # (tiny TP blocks are DTensor overhead both ways)
                # Backward costs more than forward (sums over micro-batch sizes: robust to noise).
                assert (sum(t for _, t in fits["bwd"].points)
                        > sum(t for _, t in fits["fwd"].points))

    def bwd_sum(rc: str) -> float:
        return sum(t for _, t in blocks["tp1"][rc]["bwd"].points)

    assert bwd_sum("full") > bwd_sum("none")  # full recompute reruns the forward in backward
    for part in ("embedding", "head"):
        assert set(prof.compute[part]) == {"tp1", "tp2", "tp2_sp"}
    assert all(t > 0 for f in prof.optimizer.values() for *_, t in f.points)
    assert prof.optimizer["adamw"].time(1e6, 10) > 0

    colls = prof.collectives["intra"]
    assert set(colls) == {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "p2p",
                          "p2p_bidir", "p2p_idle"}
    ar = colls["all_reduce"]
    assert len(ar.points) >= 3 and all(t > 0 for _, t in ar.points)
    assert ar.points[-1][1] > ar.points[0][1]  # 16 MB takes longer than 4 KB
    assert ar.beta_bytes_per_s > 0 and math.isfinite(ar.alpha_s)
    o = prof.oversubscription
    assert o is not None and o["ranks"] == 4 and 1.1 < o["compute_factor"] < 10
