"""`phalanx calibrate [overrides] [--out FILE] [--quick]`: measure this machine for the planner.

Composes the recipe (model, trainer.seq_len, precision, optim: what the probes need), runs
the probes of ``phalanx.parallel.profile`` on real worker processes over gloo -- first a
world of 2 ranks pinned one per core (the goaled figures: compute, TP, optimizer,
collectives), then a world of twice as many ranks as those cores, unpinned within them
(the oversubscription factor) -- fits the records (``phalanx.orchestrator.calibration``),
writes the profile to the per-machine cache (and ``--out``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

KB, MB = 1 << 10, 1 << 20

# Seconds per probe (each for a whole probe: all its variants and sizes), sized for
# model=small to finish in ~1-2 minutes on 2 cores (--quick: ~30 s), start-up included.
# "rounds": the most round-robin rounds of a compute probe (twice that for collectives).
BUDGETS = {"block": 20.0, "embed_head": 2.0, "tp": 25.0, "optimizer": 6.0, "collectives": 20.0,
           "rounds": 25}
QUICK_BUDGETS = {"block": 4.0, "embed_head": 0.8, "tp": 5.0, "optimizer": 1.5, "collectives": 3.0,
                 "rounds": 9}
OVER_BUDGETS = {"block": 8.0, "collectives": 4.0, "rounds": 15}
QUICK_OVER_BUDGETS = {"block": 2.0, "collectives": 1.0, "rounds": 7}
MBS = (1, 2, 4, 8)
QUICK_MBS = (1, 2, 4)
SIZES = tuple(4 * KB * 4 ** k for k in range(8))  # 4 KB .. 64 MB
QUICK_SIZES = tuple(4 * KB * 8 ** k for k in range(5))  # 4 KB .. 16 MB
OVER_SIZES = (4 * KB, 256 * KB, 16 * MB)
QUICK_OVER_SIZES = (4 * KB, 1 * MB)


def _busy_cpu_s() -> float | None:
    """CPU seconds every process on this machine has used (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the worker ranks)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _scaled(budgets: dict[str, float], scale: float) -> dict[str, float]:
    return {k: (v if k == "rounds" else v * scale) for k, v in budgets.items()}


def _worker(spec_path: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from phalanx.config import RunConfig
    from phalanx.launch.world import pin
    from phalanx.parallel.data_parallel import model_config
    from phalanx.parallel.profile import run_probes

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if spec.get("cores"):
        pin(spec["cores"], rank)
    elif spec.get("core_set"):
        os.sched_setaffinity(0, set(spec["core_set"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    run = RunConfig.from_dict(spec["run"])
    records = run_probes(
        model_config(run), phase=spec["phase"], seq_len=run.trainer.seq_len,
        compute_dtype=run.precision.compute, optim_cfg=run.optim, mbs_list=spec["mbs"],
        sizes=spec["sizes"], budgets=spec["budgets"], reduce_dtype=run.precision.reduce,
        max_reps=int(spec["budgets"]["rounds"]), group=dist.group.WORLD,
        log=lambda msg: print(f"rank {rank}: {msg}", flush=True))
    for r in records:
        r["rank"] = rank
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps([r for rs in gathered for r in rs]))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # As phalanx.launch.worker: skip interpreter finalization, where torch + gloo teardown
    # aborts now and then ("terminate called without an active exception").
    os._exit(0)


def calibrate(overrides: Sequence[str], *, quick: bool = False, out: str | Path | None = None,
              budget_scale: float = 1.0, oversubscribe: bool = True, write_cache: bool = True,
              timeout: float = 900, log: Callable[[str], None] = print) -> tuple[Any, list[Path]]:
    """Run the calibration worlds for the recipe ``overrides``; returns (Profile, paths written).

    ``budget_scale`` multiplies every probe budget (tests use a fraction of --quick).
    Raises ConfigError for a recipe that cannot run, RuntimeError when a world fails.
    """
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.launch.world import run_world, usable_cores
    from phalanx.orchestrator.calibration import build_profile, cache_path, machine_fingerprint

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    busy0, own0 = _busy_cpu_s(), _own_cpu_s()
    run = validate(compose_recipe(list(overrides)))
    cores = usable_cores()
    pinned = len(cores) >= 2
    core_set = cores[:2]
    base = QUICK_BUDGETS if quick else BUDGETS
    over_base = QUICK_OVER_BUDGETS if quick else OVER_BUDGETS
    mbs = sorted(set(QUICK_MBS if quick else MBS))
    common = {"run": run.to_dict()}
    spec = {**common, "phase": "pinned", "budgets": _scaled(base, budget_scale),
            "mbs": mbs, "sizes": list(QUICK_SIZES if quick else SIZES),
            "cores": core_set if pinned else None}
    log(f"calibrate: {run.model.name}, seq_len {run.trainer.seq_len}, {run.precision.compute}: "
        f"2 ranks {'pinned to cores ' + str(core_set) if pinned else 'unpinned (1 core)'}")
    t0 = time.perf_counter()
    records = run_world("phalanx.launch.calibrate", spec, world=2, timeout=timeout,
                        label="calibrate (2 ranks, pinned)")
    world_wall = {"pinned_2": time.perf_counter() - t0}
    over_records = None
    over_ranks = 2 * len(core_set)
    if oversubscribe and pinned:
        over_mbs = [m for m in mbs if m <= (2 if quick else 4)]
        spec_over = {**common, "phase": "oversubscribed", "mbs": over_mbs,
                     "budgets": _scaled(over_base, budget_scale),
                     "sizes": list(QUICK_OVER_SIZES if quick else OVER_SIZES),
                     "core_set": core_set}
        log(f"calibrate: {over_ranks} ranks sharing cores {core_set} (oversubscription)")
        t0 = time.perf_counter()
        over_records = run_world("phalanx.launch.calibrate", spec_over, world=over_ranks,
                                 timeout=timeout, label=f"calibrate ({over_ranks} ranks, "
                                 "oversubscribed)")
        world_wall[f"oversubscribed_{over_ranks}"] = time.perf_counter() - t0
    machine = machine_fingerprint()
    wall = time.perf_counter() - t_start
    busy1 = _busy_cpu_s()
    # Other processes on these cores slow every probe: the CPU time they took meanwhile
    # (all busy time minus ours) says whether the machine was quiet.
    other = None if busy0 is None or busy1 is None else max(
        0.0, (busy1 - busy0) - (_own_cpu_s() - own0))
    meta = {"quick": bool(quick), "budget_scale": budget_scale, "created_unix": time.time(),
            "overrides": list(overrides), "ranks": 2, "pinned": pinned, "threads_per_rank": 1,
            "backend": "gloo", "world_wall_s": world_wall,
            "wall_s": wall, "load_avg_before": load_before, "other_cpu_s": other,
            "other_cpu_cores": None if other is None else other / wall}
    prof = build_profile(records, model=run.model, seq_len=run.trainer.seq_len,
                         compute_dtype=run.precision.compute, machine=machine,
                         oversubscribed=over_records, over_ranks=over_ranks,
                         over_cores=len(core_set), meta=meta)
    written: list[Path] = []
    if write_cache:
        written.append(prof.save(cache_path(run.model, seq_len=run.trainer.seq_len,
                                            compute_dtype=run.precision.compute, machine=machine)))
    if out is not None:
        written.append(prof.save(Path(out).expanduser()))
    return prof, written


def main(argv: Sequence[str]) -> int:
    from phalanx.config import ConfigError
    from phalanx.orchestrator.calibration import summary

    p = argparse.ArgumentParser(
        prog="phalanx calibrate",
        description="Measure per-block compute, optimizer and collective costs on this machine's "
                    "workers and cache the profile the planner uses.")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model=small "
                   "trainer.seq_len=128 precision=bf16")
    p.add_argument("--out", help="also write the profile JSON here")
    p.add_argument("--quick", action="store_true", help="smaller budgets (~40 s for model=small)")
    args = p.parse_args(list(argv))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"phalanx calibrate: error: {bad[0]!r} is not a recipe override (key=value)",
              file=sys.stderr)
        return 2
    try:
        prof, written = calibrate(args.overrides, quick=args.quick, out=args.out,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as e:
        print(f"phalanx calibrate: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"phalanx calibrate: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # Hydra / OmegaConf composition errors: unknown key, bad value
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, HydraException | OmegaConfBaseException):
            print(f"phalanx calibrate: error: {e}", file=sys.stderr)
            return 2
        raise
    print(summary(prof))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
