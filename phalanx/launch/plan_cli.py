"""`phalanx plan [overrides] [--top K] [--json]`: the planner's best layouts for a recipe.

Any `parallel.*` key on the command line fixes that dimension; the table then
also shows how far the fixed layout is from the unconstrained best.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from omegaconf import OmegaConf

from phalanx.config import ConfigError, RunConfig

# recipe key -> Candidate field
FIXABLE = {"parallel.tp": "tp", "parallel.pp": "pp", "parallel.vpp": "vpp",
           "parallel.dp": "dp_replicate", "parallel.dp_replicate": "dp_replicate",
           "parallel.dp_shard": "dp_shard", "parallel.micro_batch_size": "micro_batch_size",
           "parallel.zero.stage": "zero_stage", "parallel.recompute": "recompute",
           "parallel.sp": "sp", "parallel.schedule": "schedule"}


def fixed_dims(overrides: list[str], run: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+")
        if key in FIXABLE:
            node: Any = run
            for part in key.split("."):
                node = getattr(node, part)
            out[FIXABLE[key]] = node
    return out


def load_profile(run: RunConfig, config: Any) -> Any:
    from phalanx.orchestrator.calibration import Profile, cache_path

    if run.cluster.peak_tflops is not None:
        return None
    path = cache_path(config, seq_len=run.trainer.seq_len, compute_dtype=run.precision.compute)
    return Profile.from_json(path.read_text()) if path.exists() else None


def make_plan(run: RunConfig, overrides: list[str], *, top_k: int = 10) -> Any:
    from phalanx.orchestrator.hardware import compute_model, hardware
    from phalanx.orchestrator.memory import Dtypes
    from phalanx.orchestrator.planner import plan
    from phalanx.parallel.data_parallel import model_config

    config = model_config(run)
    profile = load_profile(run, config)
    compute, tp_in = compute_model(run, config, profile=profile)
    hw = hardware(run.cluster, profile=profile)
    dtypes = Dtypes.from_precision(run.precision.param, run.precision.compute)
    kw = dict(hw=hw, compute=compute, global_batch=run.trainer.global_batch,
              seq_len=run.trainer.seq_len, dtypes=dtypes, top_k=top_k, tp_in_compute=tp_in,
              backend="nccl" if run.cluster.device == "cuda" else "gloo")
    fixed = fixed_dims(overrides, run)
    result = plan(config, fixed=fixed, **kw)
    best = plan(config, **{**kw, "top_k": 1}) if fixed else None
    return result, best, hw


def _print_table(result: Any, best: Any, hw: Any, run: RunConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"phalanx plan: {run.model.name} on {hw.nodes} x {hw.devices_per_node} "
                    f"({run.cluster.name}), global batch {run.trainer.global_batch} x "
                    f"{run.trainer.seq_len} tokens")
    for col in ("#", "dp", "tp", "pp", "vpp", "mbs", "zero", "recompute", "schedule", "step s",
                "tokens/s", "peak GB", "bubble"):
        t.add_column(col, justify="right")
    for i, s in enumerate(result.top, 1):
        c = s.cand
        t.add_row(str(i), f"{c.dp_replicate}x{c.dp_shard}", f"{c.tp}{' sp' if c.sp else ''}",
                  str(c.pp), str(c.vpp), str(c.micro_batch_size), str(c.zero_stage), c.recompute,
                  c.schedule, f"{s.cost.total:.3f}", f"{s.tokens_per_s:,.0f}",
                  f"{s.memory.total / 1e9:.2f}", f"{s.cost.bubble_fraction:.3f}")
    Console().print(t)
    print(f"{result.considered} valid layouts, {result.fits} fit in "
          f"{hw.memory_per_device / 1e9:.1f} GB per device; planned in {result.seconds:.2f} s")
    if best is not None and best.top and result.top:
        gap = result.top[0].cost.total / best.top[0].cost.total - 1
        print(f"fixed {result.fixed}: {gap:+.1%} step time vs the best layout "
              f"({best.top[0].cand.short()})")
    if not result.top:
        explain_nothing_fits(result, hw)


def explain_nothing_fits(result: Any, hw: Any) -> None:
    if result.rejected_memory:
        s = result.rejected_memory[0]
        short = s.memory.total - hw.memory_per_device
        print(f"nothing fits: the smallest layout ({s.cand.short()}) needs "
              f"{s.memory.total / 1e9:.2f} GB per device, {short / 1e9:.2f} GB more than the "
              f"{hw.memory_per_device / 1e9:.2f} GB available; use more devices, a smaller "
              "micro-batch or sequence, or more sharding/recomputation.", file=sys.stderr)
    else:
        print("nothing fits: no valid layout for this world size and model.", file=sys.stderr)


def main(argv: list[str]) -> int:
    from phalanx.launch.cli import compose_recipe

    p = argparse.ArgumentParser(prog="phalanx plan", description="Plan the parallel layout.")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = compose_recipe(overrides)
        # Planning only needs the model, trainer and cluster: launch checks (a layout that
        # fits this world, multi-node support) do not apply to what-if clusters.
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        result, best, hw = make_plan(run, overrides, top_k=args.top)
    except ConfigError as e:
        print(f"phalanx plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        doc = result.to_dict()
        if best is not None and best.top:
            doc["best_unconstrained"] = best.top[0].to_dict()
        print(json.dumps(doc, indent=1))
    else:
        _print_table(result, best, hw, run)
    return 0 if result.top else 1
