"""`phalanx bench planner`: the planner's predictions against the same layouts run for real.

For each model (`small`, and `m50`, ~48M parameters; `--quick`: `small` only) on this
machine's calibrated profile (calibrated first when none is cached for the model,
sequence length and dtype), the planner plans a world of 2 ranks (cluster local_cpu,
`--nproc-per-node 2`). Its first choice and a FIXED list of layouts (`LAYOUTS`: pipeline,
tensor parallel, recompute, ZeRO 1-3; each resolved to the first matching candidate of
`planner.candidates`, so every one is valid and the list is deterministic) are predicted
with the functions the planner ranks with (`step_cost` with the simulated bubble, as its
final ranking; `memory_per_rank` / `peak_memory`), then measured in worlds of real worker
processes built as `phalanx run`'s worker builds them (PipelineTrainer when the plan has
a schedule -- pp > 1, tp > 1 or ZeRO -- else DDP):

- step time: a world of 2 ranks pinned one per core (the goaled figures); every trainer
  is built first, warmed up, then timed round-robin (one step of each per round, the
  order reversed every other round) so a slow spell of this shared machine hits every
  layout alike; a step's time is the slowest rank's, the figure the median over rounds.
  A world of 4 ranks sharing the 2 cores is measured for a few layouts and reported
  beside the prediction with (and without) the oversubscription term, not goaled.
- memory: a separate world per layout set, one layout at a time, with glibc malloc set
  to return every freed block of 64 KiB or more to the OS at once
  (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), so the process's resident set
  follows its live bytes instead of the heap's high-water mark (which depends on what
  the previous layout freed). Per layout: RSS baseline before the trainer is built, two
  warm-up steps, then one step with VmHWM reset (clear_refs) at the step start, where the
  forward/backward phase starts (after zero_grad) and where it ends (the pipeline
  runtime's return; DDP: gradient clipping):
    model_states  live parameter + gradient + optimizer bytes at the step boundary
                  (`phalanx.bench.memory.model_state_bytes`), vs the model's model_states;
    activations   the step's peak over the step-start RSS, i.e. peak minus model states
                  (+ anything resident that the model does not count), vs the model's
                  peak - model_states = max(activations + buffers, step_buffers). The
                  phases are kept apart in `runs`: forward/backward vs activations +
                  buffers, the step's tail vs step_buffers;
    peak          VmHWM over the step minus the baseline, vs the model's total.
  A primer (the first layout built, stepped and dropped before any baseline) pays the
  process's one-off costs first (lazy initialisation in torch, gloo, the allocator; its
  size is `process_overhead_mb`). ZeRO's REDUCE_GRAD runs inside the pipeline runtime, so
  the model's REDUCE_GRAD step_buffers show up in the measured forward/backward phase.
  Why RSS and not a saved-tensor hook count: the model's `activations` is more than what
  autograd saves (the runtime's held P2P outputs and input gradients, the backward's
  working set, ZeRO's flat buffers, gloo's staging copies made on gloo's own threads), and
  the peak is what decides whether a layout fits. With the malloc thresholds the RSS is the
  allocator-independent count of the bytes actually live, page-rounded.

Figures (world 2, both models pooled unless named): `median_abs_error` / `worst_abs_error`
of |predicted - measured| / measured step time; `spearman` (the lowest of the per-model
rank correlations between predicted and measured step time: ranking is within one job);
`top1_gap` (the worst over models of measured time of the planner's first choice / the
measured fastest - 1); `layouts_measured`; `memory_{median,worst}_abs_error_{model_states,
activations,peak}`; `plan_seconds_llama70b_512` / `plan_seconds_gpt3_3072` (`make_plan`
wall time in a fresh process, median of runs).

Besides them, labelled so they are never mistaken for the goaled figures: per layout the
main thread's CPU and run-queue wait per step (`/proc/thread-self/schedstat`: time other
processes took from a rank), the step minus that wait (`diagnostic_*`), the measured
phases (forward/backward, the step's tail, compute actions and REDUCE_GRAD from the
pipeline runtime's events), and the machine's speed at measurement time against the
profile's (`speed_check`: calibration's block probe run before and after the timed steps).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc

MB = 1 << 20
MODELS: dict[str, list[str]] = {
    "tiny": ["model=tiny"],  # tests
    "small": ["model=small"],  # ~10M
    # ~48M parameters with the byte vocabulary; 8 heads so tp=2 divides them (small's 5 do not).
    "m50": ["model=small", "model.name=m50", "model.hidden_size=576",
            "model.intermediate_size=1536", "model.num_hidden_layers=12",
            "model.num_attention_heads=8", "model.num_key_value_heads=8"],
}
# (seq_len, global_batch) of the measured runs -- and of the calibration they are predicted from.
SHAPES: dict[str, tuple[int, int]] = {"tiny": (32, 8), "small": (128, 16), "m50": (128, 8)}

# The fixed layouts (Candidate fields; each resolves to the first valid candidate in the
# planner's enumeration order). `small` has 5 heads, so no tp > 1 layout is valid for it.
LAYOUTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "tiny": [
        ("ddp", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=2, recompute="none")),
        ("pp2_1f1b", dict(pp=2, vpp=1, schedule="1f1b", micro_batch_size=1, recompute="none")),
    ],
    "small": [
        ("ddp_mbs4", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=4, recompute="none")),
        ("ddp_mbs8_full", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=8, recompute="full")),
        ("pp2_1f1b_mbs2", dict(pp=2, vpp=1, schedule="1f1b", micro_batch_size=2,
                               recompute="none")),
        ("pp2_interleaved_mbs2", dict(pp=2, vpp=2, schedule="interleaved_1f1b",
                                      micro_batch_size=2, recompute="none")),
        ("pp2_zbh1_mbs4_selective", dict(pp=2, vpp=1, schedule="zb_h1", micro_batch_size=4,
                                         recompute="selective")),
        ("zero1_mbs4", dict(pp=1, tp=1, dp_shard=2, zero_stage=1, micro_batch_size=4,
                            recompute="none")),
        ("zero2_mbs4", dict(pp=1, tp=1, dp_shard=2, zero_stage=2, micro_batch_size=4,
                            recompute="none")),
        ("zero2_mbs8_full", dict(pp=1, tp=1, dp_shard=2, zero_stage=2, micro_batch_size=8,
                                 recompute="full")),
        ("zero3_mbs2_selective", dict(pp=1, tp=1, dp_shard=2, zero_stage=3, micro_batch_size=2,
                                      recompute="selective")),
    ],
    "m50": [
        ("ddp_mbs2", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=2, recompute="none")),
        ("ddp_mbs4_full", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=4, recompute="full")),
        ("tp2_sp_mbs2", dict(tp=2, sp=True, micro_batch_size=2, recompute="none")),
        ("tp2_sp_mbs4_full", dict(tp=2, sp=True, micro_batch_size=4, recompute="full")),
        ("pp2_1f1b_mbs1", dict(pp=2, vpp=1, schedule="1f1b", micro_batch_size=1,
                               recompute="none")),
        ("pp2_interleaved_mbs1", dict(pp=2, vpp=2, schedule="interleaved_1f1b",
                                      micro_batch_size=1, recompute="none")),
        ("zero2_mbs2", dict(pp=1, tp=1, dp_shard=2, zero_stage=2, micro_batch_size=2,
                            recompute="none")),
        ("zero3_mbs2_selective", dict(pp=1, tp=1, dp_shard=2, zero_stage=3, micro_batch_size=2,
                                      recompute="selective")),
    ],
}
# The 4-rank world (2 ranks per core; reported with the oversubscription term, not goaled).
LAYOUTS_4: list[tuple[str, dict[str, Any]]] = [
    ("ddp4_mbs4", dict(tp=1, pp=1, dp_shard=1, micro_batch_size=4, recompute="none")),
    ("pp2_dp2_1f1b_mbs2", dict(pp=2, vpp=1, tp=1, dp_shard=1, schedule="1f1b",
                               micro_batch_size=2, recompute="none")),
    ("zero2_dp4_mbs4", dict(pp=1, tp=1, dp_shard=4, zero_stage=2, micro_batch_size=4,
                            recompute="none")),
]
PLAN_CASES = {
    "plan_seconds_llama70b_512": ["model=llama_70b", "cluster=h100_8x", "nodes=64",
                                  "trainer.global_batch=1024", "trainer.seq_len=4096"],
    "plan_seconds_gpt3_3072": ["model=gpt3_175b", "cluster=a100_8x", "nodes=384",
                               "trainer.global_batch=1536", "trainer.seq_len=2048"],
}
# glibc: blocks of 64 KiB and up are mmapped and unmapped on free; the heap top is trimmed.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
              "MALLOC_TOP_PAD_": "0"}
_COMPUTE_ACTION = re.compile(r"^\d+[FBIW]\d+$")


# ------------------------------------------------------------------------------ figure math

def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); 0 when either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs equal lengths, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return 0.0
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0


def rel_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: positive when the model over-predicts."""
    return (predicted - measured) / measured


def top1_gap(measured: Mapping[str, float], first: str) -> float:
    """Measured time of the planner's first choice / the measured fastest - 1."""
    return measured[first] / min(measured.values()) - 1.0


MEMORY_CATEGORIES = ("model_states", "activations", "peak")


def figures_from(rows: Sequence[Mapping[str, Any]], *,
                 plan_seconds: Mapping[str, float]) -> dict[str, float]:
    """The figures from the per-layout rows (`kind` "layout"); only world-2 rows are goaled."""
    goaled = [r for r in rows if r.get("kind") == "layout" and r["world"] == 2]
    if not goaled:
        raise ValueError("no world-2 layout rows to compute figures from")
    errs = [abs(r["step_error"]) for r in goaled]
    figs: dict[str, float] = {"median_abs_error": statistics.median(errs),
                              "worst_abs_error": max(errs)}
    models = sorted({r["model"] for r in goaled})
    rhos, gaps = [], []
    for m in models:
        rs = [r for r in goaled if r["model"] == m]
        rho = spearman([r["predicted_step_s"] for r in rs], [r["measured_step_s"] for r in rs])
        first = [r["name"] for r in rs if r["planner_rank"] == 1]
        gap = top1_gap({r["name"]: r["measured_step_s"] for r in rs}, first[0]) if first else math.inf
        figs[f"spearman_{m}"] = rho
        figs[f"top1_gap_{m}"] = gap
        figs[f"median_abs_error_{m}"] = statistics.median(abs(r["step_error"]) for r in rs)
        rhos.append(rho)
        gaps.append(gap)
    figs["spearman"] = min(rhos)
    figs["top1_gap"] = max(gaps)
    figs["layouts_measured"] = float(len(goaled))
    for cat in MEMORY_CATEGORIES:
        es = [abs(r["memory"][cat]["error"]) for r in goaled if cat in r.get("memory", {})]
        if es:
            figs[f"memory_median_abs_error_{cat}"] = statistics.median(es)
            figs[f"memory_worst_abs_error_{cat}"] = max(es)
    # Diagnostics beside the goaled figures (labelled; see layout_rows).
    diag = [abs(rel_error(r["predicted_step_s"], r["diagnostic_step_s_minus_runq_wait"]))
            for r in goaled if "diagnostic_step_s_minus_runq_wait" in r]
    if diag:
        figs["diagnostic_median_abs_error_vs_step_minus_runq_wait"] = statistics.median(diag)
    for r in rows:
        sc = r.get("speed_check") or {}
        if r.get("kind") == "planner" and r["world"] == 2 and "ratio_before" in sc:
            figs[f"diagnostic_machine_slowdown_vs_profile_{r['model']}"] = statistics.fmean(
                [sc["ratio_before"], sc.get("ratio_after", sc["ratio_before"])])
    over = [r for r in rows if r.get("kind") == "layout" and r["world"] != 2]
    if over:
        figs["median_abs_error_4rank"] = statistics.median(abs(r["step_error"]) for r in over)
        figs["layouts_measured_4rank"] = float(len(over))
    figs.update(plan_seconds)
    return figs


# --------------------------------------------------------------------------- planner side

def base_overrides(model: str, world: int) -> list[str]:
    seq_len, global_batch = SHAPES[model]
    return [*MODELS[model], "data=synthetic", "data.synthetic_tokens=400000",
            f"trainer.seq_len={seq_len}", f"trainer.global_batch={global_batch}",
            "trainer.steps=100", "trainer.eval_every=100", "trainer.eval_batches=1",
            "--nproc-per-node", str(world)]


def _compose(overrides: Sequence[str]) -> Any:
    from omegaconf import OmegaConf

    from phalanx.launch.cli import compose_recipe

    return OmegaConf.to_object(compose_recipe(list(overrides)))


def ensure_profile(model: str, *, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The cached profile's provenance, calibrating first (same model, seq_len, dtype) if none."""
    from phalanx.launch.calibrate import calibrate
    from phalanx.launch.plan_cli import load_profile
    from phalanx.parallel.data_parallel import model_config

    run = _compose(base_overrides(model, 2))
    prof = load_profile(run, model_config(run))
    calibrated = prof is None
    if prof is None:
        seq_len, _ = SHAPES[model]
        log(f"bench planner: no calibrated profile for {model} (seq_len {seq_len}, "
            f"{run.precision.compute}); calibrating")
        prof, _ = calibrate([*MODELS[model], f"trainer.seq_len={seq_len}", "data=synthetic"],
                            quick=quick, log=log)
    meta = prof.meta
    return {"kind": "profile", "model": model, "calibrated_now": calibrated,
            "quick": meta.get("quick"), "created_unix": meta.get("created_unix"),
            "load_avg_before": meta.get("load_avg_before"),
            # CPU other processes used meanwhile (calibrate records it): a busy machine
            # inflates every probe, and every prediction made from them.
            "other_cpu_cores": meta.get("other_cpu_cores"),
            "oversubscription": (prof.oversubscription or {}).get("compute_factor"),
            "block_tp1_none_fwd_bwd_ms": _block_points(prof)}


def _block_points(prof: Any) -> dict[str, float]:
    """The profile's decoder-block fwd + bwd ms per micro-batch size (tp1, no recompute)."""
    try:
        fits = prof.compute["block"]["tp1"]["none"]
    except KeyError:
        return {}
    return {str(int(x)): 1e3 * (yf + yb) for (x, yf), (_, yb)
            in zip(fits["fwd"].points, fits["bwd"].points, strict=True)}


@dataclass
class Predictor:
    """The planner's inputs for one recipe, and its predictions for any candidate."""

    run: Any
    overrides: list[str]
    config: Any
    hw: Any
    compute: Any
    dtypes: Any
    tp_in: bool

    @classmethod
    def for_recipe(cls, overrides: Sequence[str]) -> Predictor:
        from phalanx.launch.plan_cli import load_profile
        from phalanx.orchestrator.hardware import compute_model, hardware
        from phalanx.orchestrator.memory import Dtypes
        from phalanx.parallel.data_parallel import model_config

        run = _compose(overrides)
        config = model_config(run)
        profile = load_profile(run, config)
        compute, tp_in = compute_model(run, config, profile=profile)
        return cls(run=run, overrides=list(overrides), config=config,
                   hw=hardware(run.cluster, profile=profile), compute=compute,
                   dtypes=Dtypes.from_precision(run.precision.param, run.precision.compute),
                   tp_in=tp_in)

    @property
    def seq_len(self) -> int:
        return self.run.trainer.seq_len

    @property
    def global_batch(self) -> int:
        return self.run.trainer.global_batch

    def plan(self) -> Any:
        from phalanx.launch.plan_cli import make_plan

        result, _, _ = make_plan(self.run, self.overrides, top_k=1)
        return result

    def resolve(self, fixed: Mapping[str, Any]) -> Any:
        """The first valid candidate with these fields, in the planner's enumeration order."""
        from phalanx.orchestrator.planner import candidates

        for c in candidates(self.config, world=self.hw.world, global_batch=self.global_batch,
                            seq_len=self.seq_len, devices_per_node=self.hw.devices_per_node,
                            fixed=fixed):
            if all(getattr(c, k) == v for k, v in fixed.items()):
                return c
        raise ValueError(f"no valid layout of {self.hw.world} ranks with {dict(fixed)}")

    def predict(self, cand: Any) -> dict[str, Any]:
        from phalanx.orchestrator.cost import _oversubscription, step_cost
        from phalanx.orchestrator.memory import memory_per_rank

        cost = step_cost(self.config, cand, seq_len=self.seq_len, global_batch=self.global_batch,
                         hw=self.hw, compute=self.compute, act_bytes=self.dtypes.activation,
                         simulate_bubble=True, tp_in_compute=self.tp_in)
        mem = memory_per_rank(self.config, cand, seq_len=self.seq_len,
                              global_batch=self.global_batch, dtypes=self.dtypes)
        over = _oversubscription(self.hw, cand)
        scaled = cost.compute + cost.bubble + cost.optimizer
        return {"step_s": cost.total, "cost": cost.to_dict(), "oversubscription": over,
                "step_s_without_oversubscription": cost.total - scaled * (1 - 1 / over),
                "memory_per_pp_rank": [m.to_dict() for m in mem]}


def choose_layouts(pred: Predictor, specs: Sequence[tuple[str, Mapping[str, Any]]], *,
                   top: Any | None) -> list[tuple[str, Any]]:
    """[(name, candidate)]: the planner's first choice (if given) then the fixed specs,
    each distinct layout once (a spec equal to the first choice names it)."""
    out: list[tuple[str, Any]] = []
    if top is not None:
        out.append(("planner_top", top))
    for name, fixed in specs:
        c = pred.resolve(fixed)
        dup = [i for i, (_, d) in enumerate(out) if d == c]
        if dup:
            out[dup[0]] = (f"{out[dup[0]][0]}={name}", c)
        else:
            out.append((name, c))
    return out


def variant(pred: Predictor, name: str, cand: Any) -> dict[str, Any]:
    """What a worker needs to build the layout as `phalanx run`'s worker would."""
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus
    from phalanx.orchestrator.plan import plan_single_node

    run = validate(compose_recipe([*pred.overrides, *cand.overrides()]))
    corpus = corpus_to_dict(prepare_corpus(run))
    plan = plan_single_node(run, generation=0, backend="gloo", cores=2, corpus=corpus)
    return {"name": name, "run": run.to_dict(), "corpus": corpus, "schedule": plan.schedule}


# ---------------------------------------------------------------------------- worker side

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread: the
    second is the time other processes (or this world's other ranks) took from it."""
    try:
        run, wait, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(run) * 1e-9, int(wait) * 1e-9
    except (OSError, ValueError):
        return math.nan, math.nan


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _build(v: Mapping[str, Any], rank: int, tokens: Any) -> Any:
    import torch

    from phalanx.config import RunConfig
    from phalanx.parallel.data_parallel import DataParallelTrainer
    from phalanx.parallel.mesh import Layout
    from phalanx.parallel.pipeline.schedules import Schedule
    from phalanx.parallel.pipeline_trainer import PipelineTrainer

    run = RunConfig.from_dict(v["run"])
    p = run.parallel
    layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, vpp=p.vpp)
    cpu = torch.device("cpu")
    if v["schedule"] is None:  # the worker's rule (phalanx.launch.worker)
        return DataParallelTrainer(run, rank=rank, layout=layout, tokens=tokens, device=cpu)
    return PipelineTrainer(run, rank=rank, layout=layout, tokens=tokens, device=cpu,
                           schedule=Schedule.from_dict(v["schedule"]))


class _Phases:
    """Calls `mark(name)` where a step's forward/backward phase starts (after zero_grad) and
    ends (the pipeline runtime returns; DDP: gradient clipping starts), once per step."""

    current: _Phases | None = None
    _patched = False

    def __init__(self, trainer: Any, mark: Callable[[str], None]) -> None:
        self.mark, self.seen = mark, set()
        opt_zero = trainer.optimizer.zero_grad

        def zero_grad(*a: Any, **k: Any) -> None:
            opt_zero(*a, **k)
            self.once("fb_start")

        trainer.optimizer.zero_grad = zero_grad
        if hasattr(trainer, "runtime"):
            run_step = trainer.runtime.step

            def step(*a: Any, **k: Any) -> Any:
                out = run_step(*a, **k)
                self.once("fb_end")
                return out

            trainer.runtime.step = step
        else:
            _Phases._patch_clip()

    def once(self, name: str) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.mark(name)

    @classmethod
    def _patch_clip(cls) -> None:
        import torch

        if cls._patched:
            return
        cls._patched = True
        clip = torch.nn.utils.clip_grad_norm_

        def wrapped(*a: Any, **k: Any) -> Any:
            if cls.current is not None:
                cls.current.once("fb_end")
            return clip(*a, **k)

        torch.nn.utils.clip_grad_norm_ = wrapped

    def __enter__(self) -> _Phases:
        self.seen = set()
        _Phases.current = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _Phases.current = None


def _speed_check(run_dict: Mapping[str, Any], rank: int, when: str) -> list[dict[str, Any]]:
    """DIAGNOSTIC: calibration's own block probe (tp1, no recompute) run now, so the
    machine's speed at measurement time can be compared with the profile's: a shared host
    drifts, and a uniform drift shifts every prediction alike."""
    import torch.distributed as dist

    from phalanx.config import RunConfig
    from phalanx.parallel.data_parallel import model_config
    from phalanx.parallel.profile import probe_compute

    run = RunConfig.from_dict(run_dict)
    recs = probe_compute(model_config(run), seq_len=run.trainer.seq_len,
                         compute_dtype=run.precision.compute, mbs_list=[1, 2], budget_s=3.0,
                         group=dist.group.WORLD, max_reps=9)
    return [{"name": "_speed_check", "when": when, "rank": rank, "mbs": r["mbs"],
             "fwd_bwd_s": r["fwd_s"] + r["bwd_s"]} for r in recs]


def _time_worker(spec: Mapping[str, Any], rank: int, tokens: Any) -> list[dict[str, Any]]:
    import torch.distributed as dist

    variants = spec["variants"]
    pinned = bool(spec.get("cores"))  # on shared cores the probe would time the sharing
    checks = _speed_check(variants[0]["run"], rank, "before") if pinned else []
    trainers = [_build(v, rank, tokens) for v in variants]
    marks: dict[str, float] = {}
    phases = [_Phases(tr, lambda n: marks.__setitem__(n, time.perf_counter())) for tr in trainers]
    steps = [0] * len(trainers)
    for _ in range(spec["warmup"]):
        for i, tr in enumerate(trainers):
            dist.barrier()
            with phases[i]:
                tr.train_step(steps[i])
            steps[i] += 1
    out = []
    load0 = os.getloadavg()
    for rnd in range(spec["reps"]):
        order = range(len(trainers)) if rnd % 2 == 0 else reversed(range(len(trainers)))
        for i in order:
            tr = trainers[i]
            dist.barrier()  # each layout's step starts together, as steps do in a run
            marks.clear()
            with phases[i]:
                cpu0, wait0 = _schedstat()
                t0 = time.perf_counter()
                tr.train_step(steps[i])
                t1 = time.perf_counter()
                cpu1, wait1 = _schedstat()
            steps[i] += 1
            rec = {"name": variants[i]["name"], "rank": rank, "rep": rnd, "step_s": t1 - t0,
                   "cpu_s": cpu1 - cpu0, "runq_wait_s": wait1 - wait0,
                   "fb_s": marks.get("fb_end", t1) - marks.get("fb_start", t0),
                   "tail_s": t1 - marks.get("fb_end", t1)}
            events = getattr(tr, "last_events", None)
            if events:
                rec["compute_s"] = sum(e.end - e.start for e in events
                                       if _COMPUTE_ACTION.match(e.action))
                rec["reduce_s"] = sum(e.end - e.start for e in events
                                      if e.action.endswith("REDUCE_GRAD"))
            out.append(rec)
    load1 = os.getloadavg()
    for r in out:
        r["load_before"], r["load_after"] = load0, load1
    del trainers, phases
    gc.collect()
    return out + checks + (_speed_check(variants[0]["run"], rank, "after") if pinned else [])


def _memory_worker(spec: Mapping[str, Any], rank: int, tokens: Any) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from phalanx.bench.memory import model_state_bytes

    # Primer: the first trainer of a process also pays one-off costs (lazy initialisation in
    # torch, gloo, the allocator) that belong to no layout; pay them here, report their size.
    gc.collect()
    before = _status("VmRSS")
    tr = _build(spec["variants"][0], rank, tokens)
    tr.train_step(0)
    del tr
    gc.collect()
    dist.barrier()
    out: list[dict[str, Any]] = [{"name": "_primer", "rank": rank,
                                  "process_overhead": _status("VmRSS") - before}]
    for v in spec["variants"]:
        gc.collect()
        dist.barrier()
        baseline = _status("VmRSS")
        tr = _build(v, rank, tokens)
        for step in range(spec["warmup"]):
            tr.train_step(step)
        states = model_state_bytes(tr)
        gc.collect()
        dist.barrier()
        peaks: dict[str, int] = {}

        def mark(name: str, peaks: dict[str, int] = peaks) -> None:
            peaks["before_" + name] = _status("VmHWM")
            _reset_peak()

        rss0 = _status("VmRSS")
        _reset_peak()
        with _Phases(tr, mark):
            tr.train_step(spec["warmup"])
        end = _status("VmHWM")
        fb = peaks.get("before_fb_end", end)
        tail = end if "before_fb_end" in peaks else rss0
        peak = max(peaks.get("before_fb_start", rss0), fb, end)
        out.append({"name": v["name"], "rank": rank, "model_states": states,
                    "baseline_rss": baseline, "step_start_rss": rss0,
                    "resident_beyond_states": rss0 - baseline - states,
                    "fb_extra": fb - rss0, "tail_extra": tail - rss0,
                    "activations": peak - rss0, "peak": peak - baseline})
        del tr
        gc.collect()
        dist.barrier()
    return out


def _worker(spec_path: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    # Everything a trainer imports, before any RSS baseline.
    import phalanx.bench.memory  # noqa: F401
    import phalanx.parallel.data_parallel  # noqa: F401
    import phalanx.parallel.pipeline_trainer  # noqa: F401
    from phalanx.data import open_tokens
    from phalanx.launch.world import pin
    from phalanx.orchestrator.corpus import corpus_from_dict

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec.get("cores"):
        pin(spec["cores"], rank)
    elif spec.get("core_set"):
        os.sched_setaffinity(0, set(spec["core_set"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=900))
    tokens = open_tokens(corpus_from_dict(spec["variants"][0]["corpus"]))
    work = _time_worker if spec["mode"] == "time" else _memory_worker
    records = work(spec, rank, tokens)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps([r for rs in gathered for r in rs]))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the launcher's worker: skip torch + gloo teardown at exit


# ------------------------------------------------------------------------------- measuring

@contextlib.contextmanager
def _env(extra: Mapping[str, str]) -> Iterator[None]:
    """Environment for the worlds started inside (run_world copies os.environ)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cpu_ticks() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far (/proc/stat): busy is every
    process's, ours included; steal is time the hypervisor ran something else on our vCPUs,
    which the guest's run-queue accounting never sees."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4] - v[7]) / hz, v[7] / hz


def _own_cpu() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(variants: Sequence[Mapping[str, Any]], *, world: int, warmup: int, reps: int,
            label: str, timeout: float = 3600) -> dict[str, Any]:
    """Time and memory records of `variants` in worlds of `world` ranks: pinned one per core
    when there are as many cores, else all sharing the first two."""
    from phalanx.launch.world import run_world, usable_cores

    cores = usable_cores()
    placement = ({"cores": cores} if len(cores) >= world else {"core_set": cores[:2]})
    load = [os.getloadavg()]
    busy0, steal0 = _cpu_ticks()
    own0 = _own_cpu()
    t0 = time.perf_counter()
    timing = run_world("phalanx.bench.planner", {"mode": "time", "variants": list(variants),
                                                 "warmup": warmup, "reps": reps, **placement},
                       world=world, timeout=timeout, label=f"{label}: time")
    t_time = time.perf_counter() - t0
    busy1, steal1 = _cpu_ticks()
    # While the timing world ran: cores' worth of CPU other processes used, and of steal.
    machine = {"other_cpu_cores": max(0.0, (busy1 - busy0) - (_own_cpu() - own0)) / t_time,
               "steal_cores": (steal1 - steal0) / t_time}
    load.append(os.getloadavg())
    with _env(MEMORY_ENV):
        memory = run_world("phalanx.bench.planner", {"mode": "memory", "variants": list(variants),
                                                     "warmup": 2, **placement},
                           world=world, timeout=timeout, label=f"{label}: memory")
    load.append(os.getloadavg())
    return {"timing": timing, "memory": memory, "load": load, "time_world_s": t_time,
            "during_timing": machine,
            "placement": "pinned one per core" if "cores" in placement
            else f"{world} ranks sharing cores {placement['core_set']}"}


_MEMORY_FIELDS = ("model_states", "baseline_rss", "step_start_rss", "resident_beyond_states",
                  "fb_extra", "tail_extra", "activations", "peak")


def _per_rank_medians(recs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("step_s", "fb_s", "tail_s", "compute_s", "reduce_s", "cpu_s", "runq_wait_s")
    out: dict[str, dict[str, float]] = {}
    for rank in sorted({r["rank"] for r in recs}):
        mine = [r for r in recs if r["rank"] == rank]
        out[str(rank)] = {k: statistics.median(r[k] for r in mine) for k in keys if k in mine[0]}
    return out


def _runq_corrected(recs: Sequence[Mapping[str, Any]]) -> float:
    """DIAGNOSTIC, not a goaled figure: median over rounds of (the slowest rank's step - the
    largest run-queue wait of a rank's main thread in it), an estimate of the step on a machine
    nobody else uses (the wait also holds time this rank's own gloo threads took)."""
    reps = sorted({r["rep"] for r in recs})
    return statistics.median(max(r["step_s"] for r in recs if r["rep"] == k)
                             - max(r.get("runq_wait_s", 0.0) for r in recs if r["rep"] == k)
                             for k in reps)


def _median_step(recs: Sequence[Mapping[str, Any]], key: str = "step_s") -> float:
    """Median over rounds of the slowest rank's figure."""
    by_rep: dict[int, float] = {}
    for r in recs:
        if key in r:
            by_rep[r["rep"]] = max(by_rep.get(r["rep"], 0.0), r[key])
    return statistics.median(by_rep.values()) if by_rep else math.nan


def layout_rows(pred: Predictor, chosen: Sequence[tuple[str, Any]], measured: Mapping[str, Any],
                *, model: str, planner_first: Any | None) -> list[dict[str, Any]]:
    """One row per layout: predicted vs measured step time and memory (worst rank of each)."""
    from phalanx.parallel.mesh import Layout

    rows = []
    for name, cand in chosen:
        p = pred.predict(cand)
        t = [r for r in measured["timing"] if r["name"] == name]
        m = [r for r in measured["memory"] if r["name"] == name]
        step = _median_step(t)
        layout = Layout(dp_replicate=cand.dp_replicate, dp_shard=cand.dp_shard, pp=cand.pp,
                        tp=cand.tp, vpp=cand.vpp)
        per_pp = p["memory_per_pp_rank"]
        predicted_mem = {
            "model_states": max(x["model_states"] for x in per_pp),
            "activations": max(x["total"] - x["model_states"] for x in per_pp),
            "peak": max(x["total"] for x in per_pp),
            "fb_extra": max(x["activations"] + x["buffers"] for x in per_pp),
            "tail_extra": max(x["step_buffers"] for x in per_pp),
        }
        mem: dict[str, Any] = {}
        for cat, pv in predicted_mem.items():
            mv = max(r[cat] for r in m)
            mem[cat] = {"predicted_mb": pv / MB, "measured_mb": mv / MB,
                        "error": rel_error(pv, mv) if mv > 0 else math.inf}
        mem["resident_beyond_states_mb"] = max(r["resident_beyond_states"] for r in m) / MB
        mem["per_rank_mb"] = [{"rank": r["rank"], "pp_rank": layout.coords(r["rank"])["pp"],
                               **{k: r[k] / MB for k in _MEMORY_FIELDS}} for r in m]
        rows.append({
            "kind": "layout", "model": model, "world": pred.hw.world, "name": name,
            "layout": cand.short(), "candidate": cand.to_dict(),
            "trainer": "DataParallelTrainer" if cand.pp == 1 and cand.tp == 1
            and cand.zero_stage == 0 else "PipelineTrainer",
            "planner_rank": 1 if planner_first is not None and cand == planner_first else None,
            "predicted_step_s": p["step_s"], "measured_step_s": step,
            "step_error": rel_error(p["step_s"], step),
            "predicted_cost": p["cost"], "oversubscription": p["oversubscription"],
            "predicted_step_s_without_oversubscription": p["step_s_without_oversubscription"],
            "measured_phases": {"fb_s": _median_step(t, "fb_s"),
                                "tail_s": _median_step(t, "tail_s"),
                                "compute_s": _median_step(t, "compute_s"),
                                "reduce_s": _median_step(t, "reduce_s"),
                                # main thread: time on a CPU, and runnable but kept off one
                                "cpu_s": _median_step(t, "cpu_s"),
                                "runq_wait_s": _median_step(t, "runq_wait_s")},
            "measured_phases_per_rank": _per_rank_medians(t),
            "diagnostic_step_s_minus_runq_wait": _runq_corrected(t),
            "steps_s": [max(r["step_s"] for r in t if r["rep"] == k)
                        for k in sorted({r["rep"] for r in t})],
            "memory": mem, "placement": measured["placement"],
            "load_before": measured["load"][0], "load_after_time": measured["load"][1],
            "load_after_memory": measured["load"][2],
        })
    # Predicted order among the measured layouts (1 = predicted fastest).
    order = ranks([r["predicted_step_s"] for r in rows])
    for r, k in zip(rows, order, strict=True):
        r["predicted_rank_among_measured"] = k
    return rows


def bench_model(model: str, *, world: int, specs: Sequence[tuple[str, Mapping[str, Any]]],
                warmup: int, reps: int, extra_overrides: Sequence[str] = (),
                with_planner_top: bool = True,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Plan, pick the layouts, measure them, and return their rows (plus a planner record)."""
    pred = Predictor.for_recipe([*base_overrides(model, world), *extra_overrides])
    t0 = time.perf_counter()
    result = pred.plan() if with_planner_top else None
    plan_s = time.perf_counter() - t0
    top = result.top[0].cand if result is not None and result.top else None
    chosen = choose_layouts(pred, specs, top=top)
    log(f"bench planner: {model}, {world} ranks: "
        + "; ".join(f"{n} ({c.short()})" for n, c in chosen))
    variants = [variant(pred, n, c) for n, c in chosen]
    measured = measure(variants, world=world, warmup=warmup, reps=reps,
                       label=f"bench planner {model} world={world}")
    rows = layout_rows(pred, chosen, measured, model=model, planner_first=top)
    speed = speed_vs_profile(pred, measured["timing"])
    info = {"kind": "planner", "model": model, "world": world, "plan_s": plan_s,
            "first_choice": top.short() if top is not None else None,
            "first_choice_predicted_s": result.top[0].cost.total if top is not None else None,
            "valid_layouts": result.considered if result is not None else None,
            "hardware": {"intra_alpha_s": pred.hw.intra.alpha_s,
                         "intra_bandwidth_Bps": pred.hw.intra.bandwidth_Bps,
                         "cores_per_node": pred.hw.cores_per_node,
                         "oversubscription": pred.hw.oversubscription},
            "time_world_s": measured["time_world_s"], "load": measured["load"],
            "during_timing": measured["during_timing"], "speed_check": speed,
            "process_overhead_mb": [r["process_overhead"] / MB for r in measured["memory"]
                                    if r["name"] == "_primer"]}
    for r in rows:
        log(f"  {r['name']:32s} predicted {r['predicted_step_s']:.3f} s measured "
            f"{r['measured_step_s']:.3f} s ({r['step_error']:+.1%}); peak "
            f"{r['memory']['peak']['predicted_mb']:.0f} vs {r['memory']['peak']['measured_mb']:.0f} MB")
    return [info, *rows]


def speed_vs_profile(pred: Predictor, timing: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The block probe's fwd + bwd now (least disturbed rank, as calibration takes it) over
    the profile's, before and after the timed steps: > 1 means this machine ran slower than
    when it was calibrated."""
    out: dict[str, Any] = {}
    prof = getattr(pred.compute, "profile", None)
    for when in ("before", "after"):
        recs = [r for r in timing if r["name"] == "_speed_check" and r["when"] == when]
        ratios = []
        for mbs in sorted({r["mbs"] for r in recs}):
            now = min(r["fwd_bwd_s"] for r in recs if r["mbs"] == mbs)
            entry = {"now_ms": now * 1e3}
            if prof is not None:
                then = (prof.compute_time("block", "fwd", mbs) + prof.compute_time("block", "bwd", mbs))
                entry.update(profile_ms=then * 1e3, ratio=now / then)
                ratios.append(now / then)
            out[f"{when}_mbs{mbs}"] = entry
        if ratios:
            out[f"ratio_{when}"] = statistics.median(ratios)
    return out


def plan_seconds(overrides: Sequence[str], *, reps: int) -> list[float]:
    """Wall seconds of `make_plan` for the recipe, each in a fresh process (cold caches)."""
    out = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-m", "phalanx.bench.planner", "--plan-time",
                               json.dumps(list(overrides))], capture_output=True, text=True,
                              timeout=600, check=True)
        out.append(float(proc.stdout.strip().splitlines()[-1]))
    return out


def _plan_time(overrides: list[str]) -> float:
    from phalanx.launch.plan_cli import make_plan

    run = _compose(overrides)
    t0 = time.perf_counter()
    make_plan(run, overrides, top_k=10)
    return time.perf_counter() - t0


def run(*, quick: bool) -> dict[str, Any]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    models = ["small"] if quick else ["small", "m50"]
    warmup, reps = (1, 3) if quick else (2, 7)
    runs: list[dict[str, Any]] = []
    for model in models:
        runs.append(ensure_profile(model, quick=quick, log=log))
        runs += bench_model(model, world=2, specs=LAYOUTS[model], warmup=warmup, reps=reps,
                            log=log)
    # 4 ranks on 2 cores: reported with the oversubscription term, not goaled.
    runs += bench_model("small", world=4, specs=LAYOUTS_4[:2] if quick else LAYOUTS_4,
                        warmup=1, reps=reps, with_planner_top=False, log=log)
    plan_s: dict[str, float] = {}
    for key, overrides in PLAN_CASES.items():
        secs = plan_seconds(overrides, reps=1 if quick else 3)
        runs.append({"kind": "plan_time", "figure": key, "overrides": overrides, "seconds": secs})
        plan_s[key] = statistics.median(secs)
    return result_doc("planner", quick=quick, runs=runs,
                      figures=figures_from(runs, plan_seconds=plan_s))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--plan-time":
        print(f"{_plan_time(json.loads(sys.argv[2])):.6f}")
    else:
        sys.exit("usage: phalanx bench planner [--quick] [--out FILE]")
