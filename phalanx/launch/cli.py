"""`phalanx` command line: torchrun-style launcher flags in front of a Hydra app.

Launcher flags are parsed here and turned into recipe overrides (so the run's
config.yaml records them); everything else -- `key=value`, `group=option`,
`--cfg job`, `--multirun`, `--help` -- is Hydra's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phalanx import __version__
from phalanx.config import ConfigError, register_schema, validate
from phalanx.launch.slurm_env import LaunchEnvError, LaunchSpec, parse_endpoint, resolve_launch

log = logging.getLogger("phalanx")

EXIT_CONFIG = 2

USAGE = f"""phalanx {__version__}: distributed training with elastic fault tolerance

usage: phalanx <command> [args]

commands:
  run     train: `phalanx run [--nproc-per-node N] [key=value ...]` (see `phalanx run --help`);
          on a cluster, on every node: `phalanx run --nnodes N[:M] --nproc-per-node G
          --node-rank R --rdzv-endpoint HOST:PORT --rdzv-id ID [key=value ...]`
  agent   a node agent alone: `phalanx agent --rdzv-endpoint HOST:PORT --node-rank R
          [--nproc-per-node G] [--rdzv-id ID] [--token-file F]` (what `phalanx run` starts on
          a node that does not host the controller)
  bench   benchmark against the peer implementation: `phalanx bench NAME [--quick] [--out FILE]`,
          `phalanx bench --list`
  plan    the planner's best layouts: `phalanx plan model=llama_70b cluster=h100_8x nodes=64
          trainer.global_batch=1024 [parallel.tp=8 ...] [--top K] [--json]`
  calibrate  measure this machine for the planner (per-block compute, optimizer, collectives):
          `phalanx calibrate [key=value ...] [--out FILE] [--quick]`
  slurm   an sbatch script for `phalanx run` on N nodes: `phalanx slurm --nodes N
          --gpus-per-node G --time HH:MM:SS [--partition P] [--account A] [--submit]
          [key=value ...]` (see `phalanx slurm --help`)
  export  a checkpoint as a Hugging Face Llama: `phalanx export RUN_DIR_OR_CHECKPOINT
          --format safetensors [--out DIR] [--max-shard-gb X] [--step N]`

The embedded default (`phalanx run` with no arguments) trains a tiny Llama on the
Python standard library's sources with 2 CPU workers.
"""


class _LaunchArgs:
    port = 0
    exit_codes: list[int] = []
    spec: LaunchSpec | None = None
    flags: argparse.Namespace | None = None
    hosts_controller = False  # this process is a cluster run's controller


def _error(msg: str) -> int:
    print(f"phalanx: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def _launcher_overrides(argv: list[str], *, env: Mapping[str, str] | None = None
                        ) -> tuple[list[str], int]:
    """Split launcher flags from Hydra arguments; returns (hydra argv, store port). With `env`
    (the `phalanx run` path) the torchrun and Slurm environment fill in what the flags leave
    out (slurm_env.py). `--nnodes MIN:MAX` lays the recipe out on MIN nodes (cluster.nodes);
    nodes MIN..MAX-1 join as spare nodes. The launch itself is kept in _LaunchArgs."""
    p = argparse.ArgumentParser(prog="phalanx run", add_help=False, allow_abbrev=False)
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", type=int)
    p.add_argument("--nnodes", type=str)
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int)
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint")
    p.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr")
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int)
    p.add_argument("--run-dir", "--run_dir", dest="run_dir")
    p.add_argument("--standalone", action="store_true")
    # Cluster runs: where the controller is when it is not on node 0, or that this process
    # is only the controller; the run's secret; how long the rendezvous may take.
    p.add_argument("--controller")
    p.add_argument("--controller-only", "--controller_only", dest="controller_only",
                   action="store_true")
    p.add_argument("--token-file", "--token_file", dest="token_file")
    p.add_argument("--join-timeout", "--join_timeout", dest="join_timeout", type=float,
                   default=300.0)
    flags, rest = p.parse_known_args(argv)
    # Hydra's own parser wants its flags before the overrides; users interleave them.
    hydra_flags: list[str] = []
    overrides: list[str] = []
    for a in rest:
        if a.startswith("-"):
            hydra_flags.append(a)
        elif "=" in a or a[:1] in "~+":
            # DESIGN.md: `nodes=N` on a command line is shorthand for cluster.nodes=N.
            overrides.append("cluster.nodes=" + a.split("=", 1)[1] if a.startswith("nodes=") else a)
        else:  # the value of the flag before it, e.g. `--cfg job`
            hydra_flags.append(a)
    multirun = any(a in ("-m", "--multirun") for a in hydra_flags)
    spec = resolve_launch(nnodes=flags.nnodes, node_rank=flags.node_rank,
                          rdzv_endpoint=flags.rdzv_endpoint, rdzv_id=flags.rdzv_id,
                          master_addr=flags.master_addr, master_port=flags.master_port,
                          nproc_per_node=flags.nproc, standalone=flags.standalone, env=env)
    if spec.nproc_per_node is not None:
        if spec.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node {spec.nproc_per_node} must be >= 1.")
        overrides.append(f"cluster.devices_per_node={spec.nproc_per_node}")
    if spec.min_nodes is not None:
        overrides.append(f"cluster.nodes={spec.min_nodes}")
    _LaunchArgs.spec, _LaunchArgs.flags = spec, flags
    _LaunchArgs.hosts_controller = False  # until _cluster_role says so
    if env is not None and spec.slurm is not None:
        _say(f"Slurm job {spec.slurm.job_id}: node {spec.node_rank} of {spec.slurm.nnodes} "
             f"({', '.join(spec.slurm.nodes[:4])}{', ...' if spec.slurm.nnodes > 4 else ''})")
    if flags.run_dir:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        overrides.append(f"{key}={Path(flags.run_dir).expanduser().resolve()}")
    return hydra_flags + overrides, spec.port


def compose_recipe(overrides: list[str]) -> DictConfig:
    """Compose the recipe tree with Hydra's compose API, as `phalanx run` would (no run)."""
    from hydra import compose, initialize_config_module

    register_schema()
    hydra_overrides, _ = _launcher_overrides(overrides)
    with initialize_config_module(config_module="phalanx.recipes", version_base="1.3"):
        return compose(config_name="config", overrides=hydra_overrides)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from phalanx.orchestrator.controller import Controller

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = validate(cfg)
        if (run_dir / "metrics.jsonl").exists() and not run.checkpoint.resume:
            raise ConfigError(f"run directory {run_dir} already holds a run; pick a new --run-dir "
                              "(or continue it with checkpoint.resume=latest).")
        cluster = _cluster_launch(run)
        resolved = OmegaConf.to_yaml(OmegaConf.structured(run))
        outcome = Controller(run, run_dir=run_dir, resolved_yaml=resolved,
                             port=_LaunchArgs.port, cluster=cluster).run_job()
    except ConfigError as e:
        _LaunchArgs.exit_codes.append(_error(str(e)))
        return
    s = outcome.summary
    if outcome.exit_code == 0:
        val = f", val {s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else ""
        log.info("done: %d steps, loss %.4f -> %.4f%s, %.0f tok/s, %.1f s. Run directory: %s",
                 s["steps"], s["initial_loss"], s["final_loss"], val, s["tokens_per_s"] or 0,
                 s["wall_s"], run_dir)
    else:
        print(f"phalanx: run failed: {outcome.message}\nRun directory: {run_dir}", file=sys.stderr)
    _LaunchArgs.exit_codes.append(outcome.exit_code)


def _cluster_launch(run: Any) -> Any:
    """The ClusterLaunch when this process is a cluster run's controller, else None (and a
    recipe that names more nodes than were launched is refused)."""
    from phalanx.orchestrator.agents import ClusterLaunch

    spec, flags = _LaunchArgs.spec, _LaunchArgs.flags
    if not _LaunchArgs.hosts_controller or spec is None or flags is None:
        if run.cluster.nodes > 1:
            n = run.cluster.nodes
            raise ConfigError(f"cluster.nodes={n}, but this is a single-node launch: run `phalanx "
                              f"run --nnodes {n} --node-rank R --rdzv-endpoint HOST:PORT` on each "
                              "node (README: multi-node), or set cluster.nodes=1.")
        return None
    if run.fault.spares:
        raise ConfigError(f"fault.spares={run.fault.spares}: warm spare workers are a single-node "
                          "feature; on a cluster, spare nodes take a lost node's ranks: launch "
                          f"--nnodes {spec.min_nodes}:{(spec.max_nodes or 1) + 1} and start an "
                          "agent on the extra node.")
    return ClusterLaunch(min_nodes=spec.min_nodes or 1, max_nodes=spec.max_nodes or 1,
                         nproc=run.cluster.devices_per_node, host=spec.host or "127.0.0.1",
                         port=spec.port, rdzv_id=spec.rdzv_id,
                         local_agent=not flags.controller_only,
                         join_timeout_s=flags.join_timeout)


def _cluster_role(hydra_argv: list[str]) -> Any:
    """For a cluster launch: None when this process hosts the controller (node 0, or
    --controller-only), else the node's Agent to run. Single node: None."""
    from phalanx.launch.agent import Agent, read_token
    from phalanx.orchestrator.control_plane import TOKEN_ENV

    spec, flags = _LaunchArgs.spec, _LaunchArgs.flags
    _LaunchArgs.hosts_controller = False
    if spec is None or flags is None or not (spec.multi_node or flags.controller_only):
        if flags is not None and (flags.controller or flags.controller_only):
            raise LaunchEnvError("--controller / --controller-only are for multi-node launches "
                                 "(--nnodes N with N > 1).")
        return None
    if (not spec.host or not spec.port) and not (flags.controller and not flags.controller_only):
        raise LaunchEnvError(f"{spec.describe_nodes()}: the nodes meet at the controller's store, "
                             "so give its address: --rdzv-endpoint HOST:PORT (or MASTER_ADDR and "
                             "MASTER_PORT), the same on every node.")
    if any(a in ("-m", "--multirun") for a in hydra_argv):
        raise LaunchEnvError("--multirun runs one job after another on one node; on a cluster, "
                             "launch one run per setting.")
    token = read_token(flags.token_file)
    if flags.controller_only or (spec.node_rank == 0 and not flags.controller):
        if not token:
            raise LaunchEnvError("a cluster run needs a shared secret for its control plane: set "
                                 "PHALANX_TOKEN to the same value on every node (e.g. `openssl "
                                 "rand -hex 32`), or pass --token-file FILE (mode 600).")
        os.environ[TOKEN_ENV] = token  # the controller signs with it and hands it to node 0
        _LaunchArgs.hosts_controller = True
        return None
    host, port = (parse_endpoint(flags.controller, what="--controller") if flags.controller
                  else (spec.host, spec.port))
    if not port:
        raise LaunchEnvError(f"--controller {flags.controller}: expected HOST:PORT.")
    return Agent(host=host, port=port, node=spec.node_rank, nproc=spec.nproc_per_node,
                 token=token, rdzv_id=spec.rdzv_id, join_timeout_s=flags.join_timeout)


def resolve_auto(argv: list[str]) -> list[str]:
    """`parallel=auto`: plan on this machine's calibrated profile (calibrating first when none
    is cached) and replace it with the chosen layout's keys; keys given by hand stay fixed."""
    from phalanx.launch.plan_cli import make_plan

    rest = [a for a in argv if a != "parallel=auto"]
    run = OmegaConf.to_object(compose_recipe(_flag_pairs(rest)))
    try:
        result, _, _ = make_plan(run, rest, top_k=3)
    except ConfigError as e:
        if "phalanx calibrate" not in str(e):
            raise
        from phalanx.launch.calibrate import calibrate

        _say("parallel=auto: no calibrated profile for this model here; calibrating (once)")
        calibrate(_flag_pairs(rest), quick=True, log=_say)
        result, _, _ = make_plan(run, rest, top_k=3)
    if not result.top:
        raise ConfigError("parallel=auto: no layout fits this machine's memory for this recipe "
                          "(see `phalanx plan` for what is short).")
    best = result.top[0]
    why = ", ".join(f"{s.cand.short()} {s.cost.total:.3f} s" for s in result.top[1:])
    _say(f"parallel=auto chose {best.cand.short()}: predicted {best.cost.total:.3f} s/step, "
         f"{best.tokens_per_s:.0f} tokens/s, {best.memory.total / 1e9:.2f} GB per rank "
         f"(next best: {why or 'none'})")
    return rest + [o for o in best.cand.overrides() if o.split("=")[0] not in
                   {a.split("=")[0] for a in rest}]


def _say(msg: str) -> None:
    # Before Hydra has configured logging: straight to stderr.
    print(f"phalanx: {msg}", file=sys.stderr, flush=True)


def _flag_pairs(argv: list[str]) -> list[str]:
    """The arguments compose_recipe understands: overrides and the launcher's own flags."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--nproc-per-node", "--nproc_per_node", "--nnodes"):
            out += argv[i:i + 2]
            i += 2
            continue
        if not a.startswith("-") and "=" in a:
            out.append(a)
        i += 1
    return out


def run_command(argv: list[str]) -> int:
    import hydra

    try:
        if "parallel=auto" in argv:
            argv = resolve_auto(argv)
        hydra_argv, _LaunchArgs.port = _launcher_overrides(argv, env=os.environ)
        agent = _cluster_role(hydra_argv)
    except ConfigError as e:
        return _error(str(e))
    if agent is not None:  # a node of a cluster run that does not host the controller
        return agent.run()
    _LaunchArgs.exit_codes = []
    register_schema()
    app = hydra.main(version_base="1.3", config_path="../recipes", config_name="config")(_task)
    saved = sys.argv
    sys.argv = ["phalanx run", *hydra_argv]
    try:
        app()
    finally:
        sys.argv = saved
    return max(_LaunchArgs.exit_codes, default=0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return run_command(rest)
    if cmd == "agent":
        from phalanx.launch.agent import main as agent_main

        return agent_main(rest)
    if cmd == "bench":
        from phalanx.bench import main as bench_main

        return bench_main(rest)
    if cmd == "plan":
        from phalanx.launch.plan_cli import main as plan_main

        return plan_main(rest)
    if cmd == "calibrate":
        from phalanx.launch.calibrate import main as calibrate_main

        return calibrate_main(rest)
    if cmd == "slurm":
        from phalanx.launch.slurm import main as slurm_main

        return slurm_main(rest)
    if cmd == "export":
        from phalanx.checkpoint.export import main as export_main

        return export_main(rest)
    return _error(f"unknown command {cmd!r}; see `phalanx --help`.")


if __name__ == "__main__":
    sys.exit(main())
