"""`phalanx slurm`: an sbatch script that runs `phalanx run` on N nodes of a Slurm cluster.

The script asks for N nodes with one task each (a phalanx launcher per node, which starts
that node's workers itself), rendezvous on the first node of the allocation, requeue on
node failure, and SIGTERM a while before the time limit (the controller then stops at a
step boundary). The control-plane token lives in the job directory with mode 600, made
on the first start and kept across requeues, so a requeued job can verify the checkpoints
it signed. A requeued job continues its run directory from the newest checkpoint.

Inside the allocation `phalanx run` reads SLURM_* (slurm_env.py) for its node rank.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from phalanx.config import ConfigError

EXIT_CONFIG = 2
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and no limit at all).
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")
# Names that go into #SBATCH lines, which cannot quote.
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_NAMES = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
_LAUNCH_KEYS = {"nodes": "--nodes", "cluster.nodes": "--nodes",
                "cluster.devices_per_node": "--nproc-per-node / --gpus-per-node"}
CPUS_PER_GPU = 8  # --cpus-per-task default on GPU nodes (data loading, the launcher)


@dataclass(frozen=True)
class SlurmRequest:
    job_dir: str  # absolute; holds the script, the token, the Slurm log and the run directories
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # workers per node; default: one per GPU, else the recipe's
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "phalanx"
    token_file: str | None = None  # default: JOB_DIR/token, made on first start
    port: int | None = None  # default: 20000 + job id % 10000
    signal_grace_s: int = 120
    python: str | None = None  # default: `phalanx` from PATH (sbatch exports the submit shell's)
    sbatch_options: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    @property
    def workers_per_node(self) -> int | None:
        return self.nproc_per_node or (self.gpus_per_node or None)

    @property
    def cpus(self) -> int:
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        if self.gpus_per_node:
            return CPUS_PER_GPU * self.gpus_per_node
        return self.nproc_per_node or 2  # the default recipe's 2 CPU workers, a core each

    def check(self) -> None:
        """Reject what sbatch or phalanx would reject later, with the fix."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.nodes >= 1, f"--nodes {self.nodes} must be >= 1.")
        need(self.gpus_per_node >= 0, f"--gpus-per-node {self.gpus_per_node} must be >= 0.")
        need(self.nproc_per_node is None or self.nproc_per_node >= 1,
             f"--nproc-per-node {self.nproc_per_node} must be >= 1.")
        need(not (self.gpus_per_node and self.nproc_per_node
                  and self.nproc_per_node > self.gpus_per_node),
             f"--nproc-per-node {self.nproc_per_node} workers on {self.gpus_per_node} GPUs per "
             "node: phalanx runs one worker per GPU; lower --nproc-per-node.")
        need(self.cpus >= 1, f"--cpus-per-task {self.cpus} must be >= 1.")
        need(self.time is None or bool(_TIME.fullmatch(self.time)),
             f"--time {self.time}: Slurm wants MM, HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00).")
        need(bool(_NAME.fullmatch(self.job_name)),
             f"--job-name {self.job_name!r}: use letters, digits and . _ + - only.")
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            need(value is None or bool(_NAMES.fullmatch(value)),
                 f"{flag} {value!r}: use letters, digits and . _ + - (commas between names).")
        need(Path(self.job_dir).is_absolute(), f"--job-dir {self.job_dir} must be absolute.")
        need(not re.search(r"[\s%'\"\\$`]", self.job_dir),
             f"--job-dir {self.job_dir!r}: #SBATCH --output cannot quote spaces, quotes, $ or "
             "%; choose a plainer path.")
        need(self.port is None or 1024 <= self.port < 65536,
             f"--port {self.port}: choose 1024..65535.")
        need(self.signal_grace_s >= 1, f"--signal-grace {self.signal_grace_s} must be >= 1 s.")
        for opt in self.sbatch_options:
            need(opt.startswith("--") and "\n" not in opt,
                 f"--sbatch-option {opt!r}: give one long option, like --qos=high.")
        for value in (*self.overrides, self.token_file, self.python, self.time):
            need(value is None or not re.search(r"[\n\r]", value),
                 f"{value!r}: a line break cannot go into a batch script line.")
        for o in self.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            need(key not in _LAUNCH_KEYS, f"override {o!r}: {key} comes from {_LAUNCH_KEYS.get(key)} "
                 "in a Slurm job; drop the override.")


def _ckpt_root(req: SlurmRequest) -> str | None:
    """The checkpoint directory when an override moves it (default: RUN_DIR/checkpoints)."""
    for o in reversed(req.overrides):
        if o.split("=", 1)[0].lstrip("+") == "checkpoint.dir" and "=" in o:
            value = o.split("=", 1)[1]
            return None if value in ("", "null") else value
    return None


def render_script(req: SlurmRequest, *, argv: list[str] | None = None) -> str:
    """The sbatch script, deterministic for a request (golden-tested)."""
    q = shlex.quote
    job_dir = req.job_dir.rstrip("/") or "/"
    gpus = f" x {req.gpus_per_node} GPUs" if req.gpus_per_node else " (CPU only)"
    nproc = req.workers_per_node
    lines = ["#!/bin/bash",
             f"# phalanx on {req.nodes} node{'s' if req.nodes > 1 else ''}{gpus}: one launcher "
             "per node, rendezvous on the first."]
    if argv is not None:  # a comment: no newline may end it early (check() refuses them too)
        lines.append("# Made by: phalanx slurm " + shlex.join(argv).replace("\n", "\\n")
                     .replace("\r", "\\r"))
    lines.append(f"# Submit: sbatch {job_dir}/{req.job_name}.sbatch   (or phalanx slurm ... --submit)")
    sb = [f"--job-name={req.job_name}", f"--nodes={req.nodes}", "--ntasks-per-node=1"]
    if req.gpus_per_node:
        sb.append(f"--gpus-per-node={req.gpus_per_node}")
    sb.append(f"--cpus-per-task={req.cpus}")
    if req.time:
        sb.append(f"--time={req.time}")
    if req.partition:
        sb.append(f"--partition={req.partition}")
    if req.account:
        sb.append(f"--account={req.account}")
    sb += ["--requeue", f"--signal=TERM@{req.signal_grace_s}",
           f"--output={job_dir}/slurm-%j.out", "--open-mode=append", *req.sbatch_options]
    lines += [f"#SBATCH {s}" for s in sb]
    lines += ["set -euo pipefail", "", f"JOB_DIR={q(job_dir)}", 'mkdir -p "$JOB_DIR"', ""]

    lines.append("# Control-plane secret (every store value is signed with it; DESIGN.md).")
    if req.token_file:
        lines += [f"TOKEN_FILE={q(req.token_file)}",
                  'if [ ! -s "$TOKEN_FILE" ]; then',
                  '  echo "phalanx: token file $TOKEN_FILE is missing or empty" >&2; exit 2',
                  "fi"]
    else:
        lines += ["# Made on the first start, mode 600, kept across requeues: a requeued job "
                  "verifies the",
                  "# checkpoints it signed.",
                  'TOKEN_FILE="$JOB_DIR/token"',
                  'if [ ! -s "$TOKEN_FILE" ]; then',
                  "  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' "
                  '> "$TOKEN_FILE")',
                  "fi"]
    lines += ['case "$(stat -c %a "$TOKEN_FILE")" in',
              "  ?00) ;;",
              '  *) echo "phalanx: $TOKEN_FILE is readable by others; chmod 600 it" >&2; exit 2 ;;',
              "esac",
              'PHALANX_TOKEN="$(cat "$TOKEN_FILE")"',
              "export PHALANX_TOKEN",
              ""]

    lines.append("# Rendezvous on the first node of the allocation.")
    lines.append('RDZV_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"')
    if req.port is None:
        lines += ["# Port from the job id: two jobs that share a node do not collide.",
                  "RDZV_PORT=$((20000 + SLURM_JOB_ID % 10000))"]
    else:
        lines.append(f"RDZV_PORT={req.port}")
    lines.append("")

    ckpt = _ckpt_root(req)
    lines += ["# One run directory per job. A requeued job (node failure, preemption) continues "
              "it from",
              "# its newest checkpoint, or starts a fresh one beside it when it has none.",
              'RUN_DIR="$JOB_DIR/run-$SLURM_JOB_ID"',
              f"CKPT_DIR={q(ckpt.rstrip('/') or '/')}" if ckpt else 'CKPT_DIR="$RUN_DIR/checkpoints"',
              "RESUME=()",
              'if [ -e "$RUN_DIR/metrics.jsonl" ]; then',
              '  if compgen -G "$CKPT_DIR/step_*/manifest.json" > /dev/null; then',
              "    RESUME=(checkpoint.resume=latest)",
              "  else",
              '    RUN_DIR="$RUN_DIR-restart${SLURM_RESTART_COUNT:-0}"',
              "  fi",
              "fi",
              ""]

    srun = ["srun", f"--nodes={req.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={req.cpus}"]
    if req.gpus_per_node:
        srun.append(f"--gpus-per-node={req.gpus_per_node}")
    exe = f"{q(req.python)} -m phalanx" if req.python else "phalanx"
    run = [f"{exe} run --nnodes {req.nodes}"
           + (f" --nproc-per-node {nproc}" if nproc else ""),
           '--rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID"',
           '--run-dir "$RUN_DIR" "${RESUME[@]}"',
           *[q(o) for o in req.overrides]]
    workers = f"{nproc} workers" if nproc else "the recipe's workers"
    lines += [f"# One phalanx launcher per node; each reads its node rank from SLURM_NODEID and "
              f"starts {workers}.",
              " ".join(srun) + " \\"]
    lines += [f"  {part} \\" for part in run[:-1]] + [f"  {run[-1]}"]
    return "\n".join(lines) + "\n"


def _check_recipe(req: SlurmRequest) -> None:
    """Compose the recipe now, so an unknown key or group fails at submission, not after the
    queue wait. (The full validation runs on the node at job start: it depends on the node's
    hardware, like CUDA for bf16 gradient reduction.)"""
    from hydra.errors import HydraException

    from phalanx.launch.cli import compose_recipe

    args = ["--nnodes", str(req.nodes), *req.overrides]
    if req.workers_per_node:
        args[:0] = ["--nproc-per-node", str(req.workers_per_node)]
    try:
        compose_recipe(args)
    except HydraException as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ConfigError(f"the overrides do not compose: {e}{cause}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phalanx slurm", description="Write (or submit) an sbatch script that runs "
        "`phalanx run` on N nodes, one launcher per node.",
        epilog="Everything else is a recipe override for `phalanx run` (key=value, group=option).")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU-only nodes")
    p.add_argument("--nproc-per-node", type=int,
                   help="workers per node (default: one per GPU; CPU: the recipe's)")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPUs for each node's launcher and its workers (default: {CPUS_PER_GPU} "
                   "per GPU; CPU: one per worker)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="phalanx")
    p.add_argument("--job-dir", help="script, token, Slurm log and run directories "
                   "(default: ./slurm/JOB_NAME)")
    p.add_argument("--token-file", help="control-plane secret, mode 600 (default: JOB_DIR/token, "
                   "made on the job's first start)")
    p.add_argument("--port", type=int, help="rendezvous port (default: from the job id)")
    p.add_argument("--signal-grace", type=int, default=120, dest="signal_grace_s",
                   help="seconds before the time limit when the job gets SIGTERM (default 120)")
    p.add_argument("--python", help="run `PYTHON -m phalanx` (default: `phalanx` on PATH)")
    p.add_argument("--sbatch-option", action="append", default=[], dest="sbatch_options",
                   metavar="OPT", help="an extra #SBATCH option, e.g. --qos=high (repeatable)")
    p.add_argument("--out", help="write the script here instead of printing it")
    p.add_argument("--submit", action="store_true",
                   help="write JOB_DIR/JOB_NAME.sbatch and submit it with sbatch")
    p.add_argument("overrides", nargs="*", help="recipe overrides for phalanx run")
    return p


def request_from_args(argv: list[str]) -> tuple[SlurmRequest, argparse.Namespace]:
    a = _parser().parse_intermixed_args(argv)
    job_dir = Path(a.job_dir or Path("slurm") / a.job_name).expanduser()
    token = str(Path(a.token_file).expanduser().resolve()) if a.token_file else None
    req = SlurmRequest(
        job_dir=str(job_dir if job_dir.is_absolute() else job_dir.resolve()), nodes=a.nodes,
        gpus_per_node=a.gpus_per_node, nproc_per_node=a.nproc_per_node,
        cpus_per_task=a.cpus_per_task, time=a.time, partition=a.partition, account=a.account,
        job_name=a.job_name, token_file=token, port=a.port, signal_grace_s=a.signal_grace_s,
        python=a.python, sbatch_options=tuple(a.sbatch_options), overrides=tuple(a.overrides))
    return req, a


def _error(msg: str) -> int:
    print(f"phalanx: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def _note(msg: str) -> None:
    print(f"phalanx: {msg}", file=sys.stderr)


def main(argv: list[str]) -> int:
    req, a = request_from_args(argv)
    try:
        req.check()
        if req.token_file:
            tf = Path(req.token_file)
            if tf.exists() and tf.stat().st_mode & 0o077:
                raise ConfigError(f"--token-file {tf} is readable by others; chmod 600 {tf}.")
        _check_recipe(req)
    except ConfigError as e:
        return _error(str(e))
    script = render_script(req, argv=argv)
    if not (a.submit or a.out):
        sys.stdout.write(script)
        return 0
    sbatch = shutil.which("sbatch") if a.submit else None
    if a.submit and sbatch is None:
        return _error("--submit needs Slurm's `sbatch` on PATH (run this on a login node of the "
                      "cluster), or drop --submit to print the script.")
    job_dir = Path(req.job_dir)
    if not job_dir.exists():  # #SBATCH --output needs it before the job starts
        job_dir.mkdir(parents=True, mode=0o700)
    path = Path(a.out).expanduser() if a.out else job_dir / f"{req.job_name}.sbatch"
    path.write_text(script)
    if not a.submit:
        _note(f"wrote {path}; submit it with: sbatch {path}")
        return 0
    assert sbatch is not None
    out = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"phalanx: error: sbatch failed (exit {out.returncode}): {out.stderr.strip()}",
              file=sys.stderr)
        return 1
    job_id = out.stdout.strip().split(";")[0]
    print(job_id)
    _note(f"submitted job {job_id}: script {path}, log {job_dir}/slurm-{job_id}.out, run "
          f"directory {job_dir}/run-{job_id}")
    return 0
