"""`phalanx bench checkpoint`: checkpoint blocking time, time to durable, and training-throughput
cost of synchronous `torch.save` + fsync, DCP `async_save` and phalanx's `CheckpointManager`,
side by side in one world of 2 workers training the same model.

Setup. One Llama (h=512, 6 layers, ~19M parameters) trained with AdamW under DDP on 2
workers (dp=2), each pinned to its own core (OMP_NUM_THREADS=1). A checkpoint is the model
state: parameters + AdamW `exp_avg` / `exp_avg_sq` (+ step counters, this worker's RNG
state), 12 bytes a parameter in fp32; gradients are not saved. DDP replicates it, so one
copy is the checkpoint: `state_mb` counts it once (MiB, 2^20 bytes, summed over the
tensors of one worker's state), and every method writes about that many bytes per
checkpoint in total (recorded per method in `runs`):

- `torch_save` -- the durable baseline: rank 0 calls `torch.save({"model":
  model.state_dict(), "optimizer": optimizer.state_dict()}, f)`, `f.flush()`,
  `os.fsync(f)`, then fsyncs the directory; every rank then meets at a barrier (rank 1
  would wait at the next all-reduce anyway). Blocking = durable = the whole call.
- `dcp_async` -- `torch.distributed.checkpoint.async_save(get_state_dict(model,
  optimizer), checkpoint_id=DIR, process_group=<a dedicated gloo group>)` with DCP's
  defaults (DefaultStager: a synchronous copy into fresh CPU buffers; a writer thread;
  `FileSystemWriter(sync_files=True)`: data files and `.metadata` fsynced, the directory
  not). Replicated tensors are written once, split between the ranks. Blocking = until
  `async_save` returns (plus, at cadence 1, waiting for the previous save, which must
  finish before the next starts); durable = until its future completes.
- `phalanx` -- `CheckpointManager.after_step`: a host snapshot copied in a thread while the
  next step computes (the next optimizer step waits for it), handed to the background
  persister process, which writes a DCP checkpoint (replicated tensors once), hashes it,
  and commits the manifest (files, manifest and directories fsynced). Blocking = the
  `after_step` call + the time the next optimizer step waits for the copy (measured by
  optimizer pre-step hooks around the manager's); durable = from the `after_step` call
  until the persister returns from the save with the manifest durable (CLOCK_MONOTONIC,
  shared by the processes of one host). `phalanx_memory` is `memory_every=1` (no disk).

Schedule. After warm-up (steps, and one untimed checkpoint of each method, which also
starts the persister), each of `rounds` rounds runs `pairs` pairs of adjacent blocks of
`pair_steps` steps, baseline (no checkpoint) and `phalanx_memory` (a snapshot before
every step), in alternating order, then one block of each disk method in rotated order: a
block of N=`every` steps with, at its start, one checkpoint of the state after the
previous step, ending when that checkpoint is durable (a write that outlasts the block is
charged to it). `throughput_cost_memory_every_step` = 1 - median(baseline step time) /
median(memory step time), a step time being the slowest rank's `after_step` call + step;
`_paired` is the median over adjacent block pairs. A disk method's
`throughput_cost_<method>_every_<N>` = median over rounds of 1 - N x (that round's median
baseline step) / (block time). Then a stress segment: baseline, DCP checkpointing every
step, phalanx checkpointing every step, baseline (`*_every_step`); there the previous write
may still be running, and waiting for it (DCP: its future; phalanx: a free buffer set)
counts as blocking.

CPU time (`cpu_*`): `time.process_time` of the training process (all its threads: compute,
gloo, the snapshot copy, DCP's writer) plus the persister's utime+stime from /proc, minus
the baseline's; unlike wall time it does not move with other work on the machine.

Blocking and durable times per checkpoint are the slowest rank's; figures are medians.
On this machine one core per worker is shared by training, the snapshot copy thread,
DCP's writer thread and phalanx's persister process: background work is not free here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc
from phalanx.launch.world import pin, run_world, usable_cores

NAME = "checkpoint"
MIB = 1 << 20
METHODS = ("baseline", "phalanx_memory", "torch_save", "dcp_async", "phalanx")
DISK = ("torch_save", "dcp_async", "phalanx")
FSYNC = {
    "torch_save": "yes (by the bench): file fsync after flush, then the directory",
    "dcp_async": "DCP default FileSystemWriter(sync_files=True): each data file and .metadata "
                 "fsynced; the directory is not",
    "phalanx": "yes: data files, .metadata, manifest (tmp, fsync, rename) and both directories",
    "phalanx_memory": "n/a (host memory only)",
}


@dataclass(frozen=True)
class Case:
    """Model, batch and repetition counts of one benchmark size."""

    model: tuple[str, ...] = ("model.hidden_size=512", "model.intermediate_size=1376",
                              "model.num_hidden_layers=6", "model.num_attention_heads=8",
                              "model.num_key_value_heads=8")
    seq_len: int = 64
    global_batch: int = 16
    micro_batch: int = 8
    every: int = 4  # N: steps per block = the checkpoint cadence of the disk methods
    rounds: int = 6  # blocks of each disk method (>= 5 checkpoints each)
    pairs: int = 3  # per round: baseline / memory-every-step block pairs, alternating
    pair_steps: int = 2  # steps per block of those pairs
    stress_steps: int = 5  # the checkpoint-every-step blocks of DCP and phalanx
    warmup: int = 2
    seed: int = 1234

    def overrides(self) -> list[str]:
        return ["model=small", "model.name=ckbench", *self.model, "data=synthetic",
                "data.synthetic_tokens=400000", f"trainer.seq_len={self.seq_len}",
                f"trainer.global_batch={self.global_batch}",
                f"parallel.micro_batch_size={self.micro_batch}", "trainer.steps=100000",
                "trainer.eval_every=100000", f"trainer.seed={self.seed}", "parallel.dp=2",
                "--nproc-per-node", "2"]


FULL = Case()
# Same model and state size (the blocking goals are about >= 200 MB), half the batch, fewer
# blocks.
QUICK = Case(global_batch=8, micro_batch=4, every=3, rounds=5, pairs=2)


# ------------------------------------------------------------------ parent: launch, collect


def measure(case: Case, *, root: str | os.PathLike[str] | None = None,
            timeout: float = 900.0) -> list[dict[str, Any]]:
    """Run `case` in 2 fresh pinned processes; raw records (one "setup", then one per block).
    Checkpoints go under `root` (default: a temporary directory), removed afterwards."""
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus

    run = validate(compose_recipe(case.overrides()))
    cores = usable_cores()
    tmp = Path(tempfile.mkdtemp(prefix="phalanx-ckbench-", dir=root))
    try:
        spec = {"case": asdict(case), "run": run.to_dict(),
                "corpus": corpus_to_dict(prepare_corpus(run)), "root": str(tmp),
                "cores": cores if len(cores) >= 2 else None, "pg_timeout_s": max(60.0, timeout / 2)}
        return run_world("phalanx.bench.checkpoint", spec, world=2, timeout=timeout,
                         label="checkpoint bench")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _blocks(runs: Sequence[dict[str, Any]], method: str, kind: str = "block") -> list[dict]:
    return [r for r in runs if r.get("kind") == kind and r["method"] == method]


def figures_from(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The document's figures from the raw records (see the module docstring)."""
    setup = next(r for r in runs if r.get("kind") == "setup")
    n, tokens = setup["every"], setup["tokens_per_step"]

    def ckpts(method: str, kind: str = "block") -> list[dict[str, Any]]:
        return [c for b in _blocks(runs, method, kind) for c in b["checkpoints"]]

    def units(method: str, key: str = "unit_s", kind: str = "block", round_: int | None = None
              ) -> list[float]:
        return [u for b in _blocks(runs, method, kind) for u in b[key]
                if round_ is None or b["round"] == round_]

    blocking = {m: _median([c["blocking_s"] for c in ckpts(m)]) for m in (*DISK, "phalanx_memory")}
    durable = {m: _median([c["durable_s"] for c in ckpts(m)]) for m in DISK}
    base, mem = units("baseline"), units("phalanx_memory")
    base_cpu, mem_cpu = units("baseline", "cpu_s"), units("phalanx_memory", "cpu_s")
    figs: dict[str, float] = {
        "blocking_vs_torch_save": blocking["phalanx"] / blocking["torch_save"],
        "blocking_vs_dcp_async": blocking["phalanx"] / blocking["dcp_async"],
        "throughput_cost_memory_every_step": 1.0 - _median(base) / _median(mem),
        "state_mb": setup["state_bytes"] / MIB,
        "blocking_s_torch_save": blocking["torch_save"],
        "blocking_s_dcp_async": blocking["dcp_async"],
        "blocking_s_phalanx": blocking["phalanx"],
        "blocking_s_phalanx_memory": blocking["phalanx_memory"],
        "durable_s_torch_save": durable["torch_save"],
        "durable_s_dcp_async": durable["dcp_async"],
        "durable_s_phalanx": durable["phalanx"],
        "persist_s_phalanx": _median([c["persist_s"] for c in ckpts("phalanx")]),
        "step_s_baseline": _median(base),
        "tokens_per_s_baseline": tokens / _median(base),
    }
    for m in DISK:  # what each wrote: about state_mb each
        figs[f"checkpoint_mb_{m}"] = _median([c["bytes"] for c in ckpts(m)]) / MIB
    # Adjacent baseline / memory blocks (same round and pair): less exposed to drift.
    paired = []
    for b in _blocks(runs, "baseline"):
        for m in _blocks(runs, "phalanx_memory"):
            if (b["round"], b["pair"]) == (m["round"], m["pair"]):
                paired.append(1.0 - b["window_s"] / m["window_s"])
    figs["throughput_cost_memory_every_step_paired"] = _median(paired)
    # CPU time per step of the training process (all its threads): insensitive to other load.
    figs["cpu_cost_memory_every_step"] = _median(mem_cpu) / _median(base_cpu) - 1.0
    rounds = sorted({b["round"] for b in _blocks(runs, "baseline")})
    for m in DISK:
        costs, cpus = [], []
        for r in rounds:
            bs = units("baseline", round_=r)
            bc = units("baseline", "cpu_s", round_=r)
            for b in _blocks(runs, m):
                if b["round"] == r and bs:
                    # N steps at this round's baseline speed vs the block's N steps + checkpoint.
                    costs.append(1.0 - b["steps"] * _median(bs) / b["window_s"])
                    cpus.append(b["cpu_window_s"] + b["persister_cpu_s"] - b["steps"] * _median(bc))
        figs[f"throughput_cost_{m}_every_{n}"] = _median(costs)
        figs[f"cpu_s_per_checkpoint_{m}"] = _median(cpus)
    figs["cpu_s_per_snapshot_memory"] = _median(mem_cpu) - _median(base_cpu)
    stress_base = units("baseline", kind="stress")
    for m in ("dcp_async", "phalanx"):
        st = _blocks(runs, m, "stress")
        if not st or not stress_base:
            continue
        figs[f"blocking_s_{m}_every_step"] = _median([c["blocking_s"] for c in ckpts(m, "stress")])
        figs[f"throughput_cost_{m}_every_step"] = _median(
            [1.0 - b["steps"] * _median(stress_base) / b["window_s"] for b in st])
    if "blocking_s_phalanx_every_step" in figs and "blocking_s_dcp_async_every_step" in figs:
        figs["blocking_vs_dcp_async_every_step"] = (figs["blocking_s_phalanx_every_step"]
                                                   / figs["blocking_s_dcp_async_every_step"])
    return figs


def bench(case: Case, *, quick: bool, timeout: float = 900.0,
          root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    print(f"checkpoint bench: 2 processes, {case.rounds} rounds of {case.every} steps per "
          "method ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    runs = measure(case, root=root, timeout=timeout)
    setup = next(r for r in runs if r.get("kind") == "setup")
    # Other work on the machine shows up in the step times; record how busy it was.
    setup.update(load_avg_1m_before=load_before, load_avg_1m_after=os.getloadavg()[0],
                 wall_s=time.monotonic() - t0, case=asdict(case))
    print(f"checkpoint bench: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return result_doc(NAME, quick=quick, runs=runs, figures=figures_from(runs))


def run(*, quick: bool) -> dict[str, Any]:
    """The registered entry point: QUICK or FULL."""
    return bench(QUICK if quick else FULL, quick=quick, timeout=600.0 if quick else 900.0)


# ------------------------------------------------------------------ worker: one rank


class _HookTimer:
    """Optimizer pre-step hooks registered before and after the checkpoint managers' own:
    the time between them is what the optimizer step waited for a snapshot copy."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.wait_s = 0.0

    def before(self, *_a: Any, **_k: Any) -> None:
        self.t0 = time.perf_counter()

    def after(self, *_a: Any, **_k: Any) -> None:
        self.wait_s += time.perf_counter() - self.t0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Rank:
    def __init__(self, spec: dict[str, Any], rank: int, world: int) -> None:
        import torch
        import torch.distributed as dist

        from phalanx.checkpoint.manager import CheckpointManager
        from phalanx.config import RunConfig
        from phalanx.data import open_tokens
        from phalanx.orchestrator.corpus import corpus_from_dict
        from phalanx.parallel.factory import build_trainer
        from phalanx.parallel.mesh import Layout

        self.case = Case(**{**spec["case"], "model": tuple(spec["case"]["model"])})
        self.rank, self.world = rank, world
        self.root = Path(spec["root"])
        run = RunConfig.from_dict(spec["run"])
        p = run.parallel
        layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp,
                        vpp=p.vpp)
        self.trainer = build_trainer(run, rank=rank, layout=layout, schedule=None,
                                     tokens=open_tokens(corpus_from_dict(spec["corpus"])),
                                     device=torch.device("cpu"))
        self.step = 0  # optimizer steps completed
        for _ in range(self.case.warmup):
            self._train()
        # DCP's saves get their own gloo group: never the training collectives' group.
        self.dcp_group = dist.new_group(backend="gloo")
        self.events: list[dict[str, Any]] = []
        self.hooks = _HookTimer()
        opt = self.trainer.optimizer
        opt.register_step_pre_hook(self.hooks.before)
        ck = run.checkpoint

        def with_ckpt(**kw: Any) -> Any:
            return dataclasses.replace(run, checkpoint=dataclasses.replace(
                ck, peer_every=0, keep_last=2, keep_every=0, **kw))

        self.memory = CheckpointManager(with_ckpt(memory_every=1, disk_every=0), self.trainer,
                                        root=self.root / "phalanx_memory", rank=rank,
                                        world=world, token=None, events=self.events.append)
        # disk_every=1: every after_step call persists; the bench decides when to call it.
        self.disk = CheckpointManager(with_ckpt(memory_every=1, disk_every=1), self.trainer,
                                      root=self.root / "phalanx", rank=rank, world=world,
                                      token=None, events=self.events.append)
        opt.register_step_pre_hook(self.hooks.after)
        self.dcp_future: Any = None
        self.phalanx_pending: list[dict[str, Any]] = []

    # -------------------------------------------------------------- pieces

    def _train(self) -> None:
        self.trainer.train_step(self.step)
        self.step += 1

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def _checkpoint(self, method: str) -> dict[str, Any]:
        """Start (or make) one checkpoint of the state after `self.step` steps; its record."""
        step = self.step
        rec: dict[str, Any] = {"step": step}
        t0, mono0 = time.perf_counter(), time.monotonic()
        if method == "phalanx_memory":
            self.memory.after_step(step)
        elif method == "phalanx":
            self.disk.after_step(step)
            rec["t_call_mono"] = mono0
            self.phalanx_pending.append(rec)
        elif method == "torch_save":
            self._torch_save(step)
        elif method == "dcp_async":
            rec["wait_previous_s"] = self._dcp_wait()
            t0 = time.perf_counter()
            self._dcp_async_save(step, rec)
        else:
            raise ValueError(method)
        rec["call_s"] = time.perf_counter() - t0
        if method == "dcp_async":
            rec["call_s"] += rec["wait_previous_s"]
        if method == "torch_save":
            rec["durable_s"] = rec["call_s"]
        return rec

    def _torch_save(self, step: int) -> None:
        import torch

        if self.rank == 0:
            path = self.root / "torch" / f"step_{step:09d}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {"model": self.trainer.model.state_dict(),
                     "optimizer": self.trainer.optimizer.state_dict(), "step": step}
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(path.parent)
        self._barrier()

    def _dcp_async_save(self, step: int, rec: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()  # durable counts from here, the start of the call
        model_sd, optim_sd = get_state_dict(self.trainer.model, self.trainer.optimizer)
        fut = dcp.async_save({"model": model_sd, "optim": optim_sd},
                             checkpoint_id=str(self.root / "dcp" / f"step_{step:09d}"),
                             process_group=self.dcp_group)

        def done(_f: Any) -> None:  # in DCP's writer thread, or here if already done
            rec["durable_s"] = time.perf_counter() - t0

        fut.add_done_callback(done)
        self.dcp_future = fut

    def _dcp_wait(self) -> float:
        if self.dcp_future is None:
            return 0.0
        t0 = time.perf_counter()
        self.dcp_future.result()
        self.dcp_future = None
        return time.perf_counter() - t0

    def _phalanx_drain(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        self.disk.snap.wait()  # the copy hands the buffers to the persister when it is done
        while self.disk.in_use:
            self.disk.poll(block_s=0.5)
            if time.monotonic() > deadline:
                raise TimeoutError("phalanx persister did not finish the checkpoint")
        saved = {s["step"]: s for s in self.disk.saved}
        for rec in self.phalanx_pending:
            info = saved.get(rec["step"])
            if info is None or self.disk.failed:
                raise RuntimeError(f"phalanx checkpoint at step {rec['step']} not saved: "
                                   f"{self.disk.failed or self.events[-3:]}")
            rec["persist_s"] = info["durable_s"]
            rec["durable_s"] = info["done_monotonic"] - rec.pop("t_call_mono")
            rec["bytes"] = info["bytes"]
        self.phalanx_pending = []

    def _drain(self, method: str) -> None:
        if method == "dcp_async":
            self._dcp_wait()
        elif method == "phalanx":
            self._phalanx_drain()
        elif method == "phalanx_memory":
            self.memory.snap.wait()

    def _discard(self, method: str, recs: list[dict[str, Any]]) -> None:
        """After a block (untimed): record the bytes written, delete the baselines' files
        (phalanx's retention prunes its own)."""
        self._barrier()
        if self.rank == 0 and method in ("torch_save", "dcp_async"):
            for rec in recs:
                name = f"step_{rec['step']:09d}" + (".pt" if method == "torch_save" else "")
                path = self.root / ("torch" if method == "torch_save" else "dcp") / name
                rec["bytes"] = _dir_bytes(path)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self._barrier()

    # -------------------------------------------------------------- blocks

    def _persister_cpu(self) -> float:
        """CPU seconds the persister process has used so far (0 without one)."""
        proc = self.disk.proc
        if proc is None or proc.pid is None:
            return 0.0
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def block(self, method: str, *, steps: int, every: int, round_: int,
              kind: str = "block", pair: int | None = None) -> dict[str, Any]:
        gc.collect()
        self._barrier()
        units, cpu, step_s, hook_s, recs = [], [], [], [], []
        p_start = self._persister_cpu()
        c_start = time.process_time()
        t_start = time.perf_counter()
        for i in range(steps):
            c0 = time.process_time()
            t0 = time.perf_counter()
            rec = None
            if method != "baseline" and i % every == 0:
                rec = self._checkpoint(method)
                recs.append(rec)
            self.hooks.wait_s = 0.0
            t1 = time.perf_counter()
            self._train()
            t2 = time.perf_counter()
            cpu.append(time.process_time() - c0)
            units.append(t2 - t0)
            step_s.append(t2 - t1)
            hook_s.append(self.hooks.wait_s)
            if rec is not None:
                rec["hook_wait_s"] = self.hooks.wait_s
                waits = self.hooks.wait_s if method.startswith("phalanx") else 0.0
                rec["blocking_s"] = rec["call_s"] + waits
        self._drain(method)
        window = time.perf_counter() - t_start
        cpu_window = time.process_time() - c_start
        persister_cpu = self._persister_cpu() - p_start
        self._discard(method, recs)
        return {"kind": kind, "method": method, "round": round_, "pair": pair, "steps": steps,
                "every": every, "window_s": window, "unit_s": units, "cpu_s": cpu,
                "step_s": step_s, "hook_wait_s": hook_s, "cpu_window_s": cpu_window,
                "persister_cpu_s": persister_cpu, "checkpoints": recs}

    def warm(self) -> None:
        """One untimed checkpoint of each method: imports, the persister's start, caches."""
        for method in METHODS[1:]:
            self.block(method, steps=1, every=1, round_=-1, kind="warmup")

    def setup(self) -> dict[str, Any]:
        from phalanx.checkpoint.snapshot import as_boxes, state_bytes
        from phalanx.checkpoint.state import trainer_state

        st = trainer_state(self.trainer, step=self.step)
        model = sum(p.numel() for p in self.trainer.model.parameters())
        return {"kind": "setup", "rank": self.rank, "world": self.world,
                "state_bytes": state_bytes({k: as_boxes(v) for k, v in st.items()}),
                "snapshot_bytes": self.memory.snap.nbytes, "parameters": model,
                "tokens_per_step": self.trainer.global_tokens, "every": self.case.every,
                "layout": self.trainer.layout.to_dict()}


def _merge(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per block: windows and per-step times of the slowest rank; per checkpoint,
    the slowest rank's blocking and durable times (per-rank values kept)."""
    setup = dict(per_rank[0]["setup"])
    setup.pop("rank")
    setup["state_bytes_per_rank"] = [r["setup"]["state_bytes"] for r in per_rank]
    setup["fsync"] = FSYNC
    setup["pinned"] = per_rank[0]["pinned"]
    out: list[dict[str, Any]] = [setup]
    tokens = setup["tokens_per_step"]
    for blocks in zip(*(r["blocks"] for r in per_rank), strict=True):
        b0 = blocks[0]
        rec = {k: b0[k] for k in ("kind", "method", "round", "pair", "steps", "every")}
        for key in ("window_s", "cpu_window_s", "persister_cpu_s"):
            rec[key] = max(b[key] for b in blocks)
        rec["tokens_per_s"] = b0["steps"] * tokens / rec["window_s"]
        for key in ("unit_s", "cpu_s", "step_s", "hook_wait_s"):
            rec[key] = [max(v) for v in zip(*(b[key] for b in blocks), strict=True)]
        cks = []
        for cs in zip(*(b["checkpoints"] for b in blocks), strict=True):
            c: dict[str, Any] = {"step": cs[0]["step"]}
            for key in ("blocking_s", "call_s", "hook_wait_s", "durable_s", "persist_s",
                        "wait_previous_s"):
                if key in cs[0]:
                    c[key] = max(x[key] for x in cs)
                    c[f"{key}_per_rank"] = [x[key] for x in cs]
            if b0["method"] != "phalanx_memory":  # bytes of the whole checkpoint, all ranks
                c["bytes"] = max(x.get("bytes", 0) for x in cs)
            cks.append(c)
        rec["checkpoints"] = cks
        out.append(rec)
    return out


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pin(spec["cores"], rank)  # inherited by the persister process and DCP's writer thread
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["pg_timeout_s"]))
    r: _Rank | None = None
    try:
        r = _Rank(spec, rank, world)
        case = r.case
        r.warm()
        blocks = []
        for rnd in range(case.rounds):
            # Baseline and memory-every-step blocks alternate (which goes first alternates too).
            for j in range(case.pairs):
                pair = ("baseline", "phalanx_memory")
                for method in pair if (rnd + j) % 2 == 0 else pair[::-1]:
                    blocks.append(r.block(method, steps=case.pair_steps, every=1, round_=rnd,
                                          pair=j))
            k = rnd % len(DISK)
            for method in DISK[k:] + DISK[:k]:  # rotated: drift hits every method alike
                blocks.append(r.block(method, steps=case.every, every=case.every, round_=rnd))
        for method in ("baseline", "dcp_async", "phalanx", "baseline"):
            blocks.append(r.block(method, steps=case.stress_steps, every=1, round_=case.rounds,
                                  kind="stress"))
        mine = {"setup": r.setup(), "blocks": [b for b in blocks if b["kind"] != "warmup"],
                "pinned": spec["cores"] is not None}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(_merge(gathered)))
        dist.barrier()
    finally:
        if r is not None:
            with contextlib.suppress(Exception):
                r._dcp_wait()
            r.disk.close(timeout_s=60)
            r.memory.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        sys.stdout.flush()
        os._exit(0)
    else:
        from phalanx.bench import main

        sys.exit(main([NAME, *sys.argv[1:]]))
