"""Benchmarks that run a peer implementation and phalanx side by side (DESIGN.md, "Benchmarks").

`phalanx bench NAME [--quick] [--out FILE]` runs one; `phalanx bench --list` names them.
Every benchmark returns the same JSON document::

    {"bench": NAME, "quick": bool, "machine": {...}, "runs": [raw figures], "figures": {KEY: number}}

`machine` says what the numbers were measured on (cores, CPU model, torch, python;
never the host name); `runs` holds the raw measurements; `figures` the few numbers
the issue that added the benchmark names. A benchmark module exposes
`run(*, quick: bool) -> dict` (the document) and is registered in `BENCHES`; it may also
expose `write_extras(doc, out)`, called after the JSON is written to `--out` (a plot beside it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# name -> (module, one-line description). Modules are imported only when their bench runs:
# a benchmark may pull in torch.distributed pieces the CLI does not otherwise need.
BENCHES: dict[str, tuple[str, str]] = {
    "pipeline": ("phalanx.bench.pipeline",
                 "phalanx's PipelineRuntime vs torch.distributed.pipelining (1F1B, interleaved 1F1B)"),
    "memory": ("phalanx.bench.memory",
               "ZeRO 0-3 model-state bytes and peak RSS per rank vs the formulas; ZeRO-1/2 vs DDP speed"),
    "planner": ("phalanx.bench.planner",
                "planner predictions vs measured step time and memory for fixed layouts; "
                "planning time for big clusters"),
    "checkpoint": ("phalanx.bench.checkpoint",
                   "checkpoint blocking time, time to durable and throughput cost: "
                   "torch.save+fsync vs DCP async_save vs phalanx"),
    "checkfree": ("phalanx.bench.checkfree",
                  "whole-stage loss at pp=4: loss curves of no failure, CheckFree, CheckFree+, "
                  "checkpoint rollback (one-process pipeline emulation)"),
    "lowcomm": ("phalanx.bench.lowcomm",
                "bytes on the slow link and loss on one token budget: DDP vs DiLoCo vs Streaming "
                "DiLoCo vs NoLoCo, 4 replicas; wall-clock on an emulated 100 Mb/s link"),
    "recovery": ("phalanx.bench.recovery",
                 "MTTR, steps lost and goodput after a killed worker: torchrun restarts from DCP "
                 "checkpoints vs torchft healing vs phalanx replica/checkpoint recovery"),
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on. Deliberately free of the host name."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "accelerator": "cuda" if torch.cuda.is_available() else "none",
    }


def result_doc(name: str, *, quick: bool, runs: Sequence[Mapping[str, Any]],
               figures: Mapping[str, float], machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The common document; raises ValueError if a figure is not a finite number."""
    bad = {k: v for k, v in figures.items()
           if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)}
    if bad:
        raise ValueError(f"bench {name}: figures must be finite numbers, got {bad}")
    return {"bench": name, "quick": bool(quick),
            "machine": dict(machine) if machine is not None else machine_info(),
            "runs": [dict(r) for r in runs], "figures": {k: float(v) for k, v in figures.items()}}


def write_result(doc: Mapping[str, Any], out: str | os.PathLike[str] | None) -> None:
    """Write the document as indented JSON to `out` (parents created), or to stdout if None."""
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_bench(name: str, *, quick: bool) -> dict[str, Any]:
    if name not in BENCHES:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHES))}")
    module = importlib.import_module(BENCHES[name][0])
    return module.run(quick=quick)


def main(argv: Sequence[str]) -> int:
    """`phalanx bench NAME [--quick] [--out FILE]` / `phalanx bench --list`."""
    p = argparse.ArgumentParser(prog="phalanx bench",
                                description="Run a benchmark: the peer implementation and phalanx "
                                            "side by side, one JSON document out.")
    p.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--quick", action="store_true", help="a smaller case, under 5 minutes on 2 cores")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    args = p.parse_args(list(argv))
    if args.list:
        for name, (_, desc) in sorted(BENCHES.items()):
            print(f"{name:12s} {desc}")
        return 0
    if args.name is None:
        p.print_usage(sys.stderr)
        print("phalanx bench: error: name a benchmark, or --list", file=sys.stderr)
        return 2
    if args.name not in BENCHES:
        print(f"phalanx bench: error: unknown benchmark {args.name!r}; available: "
              f"{', '.join(sorted(BENCHES))}", file=sys.stderr)
        return 2
    try:
        doc = run_bench(args.name, quick=args.quick)
    except RuntimeError as e:  # a rank failed or hung: the message carries the ranks' logs
        print(f"phalanx bench {args.name}: failed: {e}", file=sys.stderr)
        return 1
    write_result(doc, args.out)
    extras = getattr(importlib.import_module(BENCHES[args.name][0]), "write_extras", None)
    if args.out is not None and extras is not None:
        written = extras(doc, args.out)
        if written is not None:
            print(f"wrote {written}", file=sys.stderr)
    if args.out is not None:
        figs = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=null"
                         for k, v in doc["figures"].items())
        print(f"phalanx bench {args.name}: {figs}\nwrote {args.out}", file=sys.stderr)
    return 0
