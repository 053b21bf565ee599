"""`phalanx bench lowcomm`: bytes on the slow link and loss, DDP vs DiLoCo vs Streaming DiLoCo
vs NoLoCo, on the same token budget.

The peer is torch's DDP (an all-reduce of every step's gradients across the replicas). Each
method runs the `tiny` model on 4 replicas (one process each, gloo, data parallel: every
byte between replicas crosses the slow link), seq 128, global batch 16, for the same steps:

    ddp                 lowcomm=none
    diloco_h10, _h20    DiLoCo, H = 10 / 20
    streaming           Streaming DiLoCo, P = 4 fragments, tau = 2 overlap steps, fp4, H = 20
    noloco              NoLoCo, H = 20, groups of 2

Two reference runs go with them (`context`): `alone`, one replica with no link (what each
replica reaches by itself), and `diloco_h1`, replicas averaged after every step.

Per method it records the loss curve (train loss per step, held-out loss at the end), the
bytes each worker sent to the others -- counted by the outer optimizer's link (DDP: its ring
all-reduce of the fp32 gradient, 2(M-1)/M x 4N bytes a step) and measured (bytes the process
wrote, /proc/self/io) -- the peak of one sync, and the time blocked.

The emulated link: the best method and DDP run again with every replica in a network
namespace of its own, joined through a bridge in a hub namespace by veth pairs whose
worker side is shaped with `tc ... tbf rate 100mbit` (the root namespace is left alone;
this kernel has no netem, so there is no added latency: bandwidth only). There the counters
are also compared with the veth interfaces' tx_bytes (TCP/IP and gloo headers are the
difference), and wall-clock time to the same loss is taken. It needs root and iproute2; where
those are missing the run says so and that figure is left out.

Figures (issue 8): bytes_reduction_{diloco,streaming,noloco} (DDP bytes / method's; diloco
is H = 20), loss_gap_{...} (final held-out loss / DDP's - 1), peak_ratio_streaming
(streaming peak bytes per sync / DiLoCo's), time_to_loss_speedup_100mbit (DDP wall-clock /
the best method's to the loss both reach, on the emulated link). "Best": the largest byte
reduction among methods within 5% of DDP's loss (else the smallest loss gap).

With 4 ranks on a 2-core machine, wall-clock figures measure the OS scheduler too
(DESIGN.md: larger worlds are reported, not goaled).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc
from phalanx.launch.world import run_world

NAME = "lowcomm"
_PREFIX = "phalanx.bench.lowcomm"


@dataclass(frozen=True)
class Case:
    steps: int
    replicas: int = 4
    seq_len: int = 128
    global_batch: int = 16
    model: str = "tiny"
    sync_every: int = 20
    diloco_fast: int = 10  # the second DiLoCo's H
    fragments: int = 4
    overlap_steps: int = 2
    link_mbit: float = 100.0
    emulate: bool = True
    context: bool = True  # the two reference runs (`context`), not needed for the figures
    timeout_s: float = 1800.0


FULL = Case(steps=600)
QUICK = Case(steps=80, sync_every=16, diloco_fast=8, fragments=4, overlap_steps=1,
             context=False)


def methods(case: Case) -> dict[str, list[str]]:
    h = case.sync_every
    return {
        "ddp": ["lowcomm=none"],
        "diloco_fast": ["lowcomm=diloco", f"lowcomm.sync_every={case.diloco_fast}"],
        "diloco": ["lowcomm=diloco", f"lowcomm.sync_every={h}"],
        "streaming": ["lowcomm=streaming_diloco", f"lowcomm.sync_every={h}",
                      f"lowcomm.fragments={case.fragments}",
                      f"lowcomm.overlap_steps={case.overlap_steps}", "lowcomm.quantize=fp4"],
        "noloco": ["lowcomm=noloco", f"lowcomm.sync_every={h}"],
    }


def context(case: Case) -> dict[str, tuple[Case, list[str]]]:
    """Two reference points that bracket what averaging replicas can do here: `alone`, one
    replica training on its share of each batch with no link at all (global batch / M, the
    same steps: what each replica reaches by itself), and `diloco_h1`, the replicas averaged
    after every inner step (outer lr 1, no momentum, fp32: DDP's bytes), where the only cost
    left is that each replica's AdamW normalises its own gradient."""
    alone = replace(case, replicas=1, global_batch=case.global_batch // case.replicas)
    return {"alone": (alone, ["lowcomm=none"]),
            "diloco_h1": (case, ["lowcomm=diloco", "lowcomm.sync_every=1",
                                 "lowcomm.outer_lr=1.0", "lowcomm.outer_momentum=0"])}


def _recipe(case: Case, overrides: list[str]) -> dict[str, Any]:
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe

    run = validate(compose_recipe([
        f"model={case.model}", "data=stdlib", f"trainer.seq_len={case.seq_len}",
        f"trainer.global_batch={case.global_batch}", f"trainer.steps={case.steps}",
        # Held-out loss on 32 sequences, whatever the global batch.
        f"trainer.eval_every={case.steps}", f"trainer.eval_batches={max(1, 32 // case.global_batch)}",
        f"parallel.micro_batch_size={case.global_batch // case.replicas}",
        "--nproc-per-node", str(case.replicas), *overrides]))
    return run.to_dict()


# -- the emulated link ---------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    """Why the emulated link cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


@contextlib.contextmanager
def emulated_link(replicas: int, mbit: float):
    """Namespaces {tag}r<i> (address 10.77.0.<i+1> on interface `lcp`, egress shaped to
    `mbit`) joined by a bridge in {tag}h. Yields the namespace names; removes them after."""
    tag = f"phx{os.getpid()}"
    hub, names = f"{tag}h", [f"{tag}r{i}" for i in range(replicas)]
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", "lcp", "netns", ns, "type", "veth", "peer", "name", f"lcv{i}",
                "netns", hub)
            _ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "lcp")
            _ip("-n", ns, "link", "set", "lcp", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "set", f"lcv{i}", "master", "br0")
            _ip("-n", hub, "link", "set", f"lcv{i}", "up")
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lcp", "root",
                            "tbf", "rate", f"{mbit:g}mbit", "burst", "64kb", "latency", "1s"],
                           check=True, capture_output=True)
        yield names
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- one method on one world -----------------------------------------------------------------
def run_method(case: Case, label: str, overrides: list[str], *, netns: list[str] | None = None
               ) -> dict[str, Any]:
    spec = {"label": label, "run": _recipe(case, overrides), "netns": netns}
    res = run_world(_PREFIX, spec, world=case.replicas, timeout=case.timeout_s,
                    label=f"bench lowcomm {label}")
    res["emulated_link_mbit"] = case.link_mbit if netns else None
    return res


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _tx_bytes(ifname: str | None) -> int | None:
    if ifname is None:
        return None
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ns = spec["netns"][rank] if spec.get("netns") else None
    if ns is not None and os.environ.get("PHALANX_BENCH_NETNS") != ns:
        # Into this replica's namespace; rank 0's address there hosts the store.
        os.environ.update({"PHALANX_BENCH_NETNS": ns, "MASTER_ADDR": "10.77.0.1",
                           "GLOO_SOCKET_IFNAME": "lcp"})
        os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, "-m", _PREFIX, "--worker",
                         spec_path])
    import torch
    import torch.distributed as dist

    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.corpus import prepare_corpus
    from phalanx.parallel.data_parallel import DataParallelTrainer
    from phalanx.parallel.mesh import Layout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    run = RunConfig.from_dict(spec["run"])
    tokens = open_tokens(prepare_corpus(run))
    trainer = DataParallelTrainer(run, rank=rank, layout=Layout(dp_replicate=world),
                                  tokens=tokens, device=torch.device("cpu"))
    numel = sum(p.numel() for p in trainer.model.parameters())
    ddp_step_bytes = round(2 * (world - 1) * 4 * numel / world)  # ring all-reduce of the grads
    iface = "lcp" if ns is not None else None
    dist.barrier()
    w0, x0, t0 = _wchar(), _tx_bytes(iface), time.perf_counter()
    steps = []
    for step in range(run.trainer.steps):
        res = trainer.train_step(step)
        rec = {"step": step, "loss": res.loss, "t": time.perf_counter() - t0}
        if trainer.lowcomm is not None:
            m = trainer.lowcomm.take_metrics()
            rec.update(bytes=m["lowcomm_bytes"], peak=m["lowcomm_peak_bytes"],
                       blocked_s=m["lowcomm_blocked_s"])
        else:
            rec.update(bytes=ddp_step_bytes, peak=ddp_step_bytes, blocked_s=None)
        steps.append(rec)
    wall = time.perf_counter() - t0
    dist.barrier()  # every peer has received what this rank sent before the counters are read
    time.sleep(0.2)
    wire, tx = _wchar() - w0, (_tx_bytes(iface) - x0) if iface else None
    val = trainer.evaluate()
    mine = {"rank": rank, "bytes": sum(s["bytes"] for s in steps), "wchar": wire, "tx_bytes": tx,
            "blocked_s": sum(s["blocked_s"] or 0.0 for s in steps)}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({
            "label": spec["label"], "lowcomm": spec["run"]["lowcomm"], "numel": numel,
            "replicas": world, "steps": run.trainer.steps,
            "tokens_per_step": run.trainer.global_batch * run.trainer.seq_len,
            "train_loss": [s["loss"] for s in steps], "t": [s["t"] for s in steps],
            "bytes_per_step": [s["bytes"] for s in steps],
            "peak_bytes_per_sync": max(s["peak"] for s in steps), "final_val_loss": val,
            "wall_s": wall, "ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


# -- figures ---------------------------------------------------------------------------------
def smooth(y: list[float], window: int = 10) -> list[float]:
    return [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1])
            for i in range(len(y))]


def time_to_loss(run: dict[str, Any], target: float) -> float | None:
    for loss, t in zip(smooth(run["train_loss"]), run["t"], strict=True):
        if loss <= target:
            return t
    return None


def bytes_per_worker(run: dict[str, Any]) -> float:
    """The most any worker sent (NoLoCo's groups can make workers differ)."""
    return max(r["bytes"] for r in run["ranks"])


def figures(runs: dict[str, dict[str, Any]], emulated: dict[str, dict[str, Any]] | None,
            ) -> tuple[dict[str, float], str]:
    ddp = runs["ddp"]
    figs: dict[str, float] = {}
    gaps: dict[str, float] = {}
    reductions: dict[str, float] = {}
    for key, label in (("diloco", "diloco"), ("streaming", "streaming"), ("noloco", "noloco")):
        reductions[label] = bytes_per_worker(ddp) / bytes_per_worker(runs[label])
        gaps[label] = runs[label]["final_val_loss"] / ddp["final_val_loss"] - 1
        figs[f"bytes_reduction_{key}"] = reductions[label]
        figs[f"loss_gap_{key}"] = gaps[label]
    for label in ("alone", "diloco_h1"):  # context: not goals
        if label in runs:
            figs[f"loss_gap_{label}"] = runs[label]["final_val_loss"] / ddp["final_val_loss"] - 1
    figs["peak_ratio_streaming"] = (runs["streaming"]["peak_bytes_per_sync"]
                                    / runs["diloco"]["peak_bytes_per_sync"])
    close = [m for m in reductions if gaps[m] <= 0.05]
    best = max(close, key=lambda m: reductions[m]) if close else min(gaps, key=lambda m: gaps[m])
    if emulated is not None:
        e_ddp, e_best = emulated["ddp"], emulated[best]
        target = max(smooth(e_ddp["train_loss"])[-1], smooth(e_best["train_loss"])[-1])
        t_ddp, t_best = time_to_loss(e_ddp, target), time_to_loss(e_best, target)
        if t_ddp is not None and t_best:
            figs["time_to_loss_speedup_100mbit"] = t_ddp / t_best
    return figs, best


def bench(case: Case, *, quick: bool) -> dict[str, Any]:
    runs = {label: run_method(case, label, ov) for label, ov in methods(case).items()}
    if case.context:
        runs.update({label: run_method(c, label, ov) for label, (c, ov) in context(case).items()})
    emulated, why = None, netns_unavailable() if case.emulate else "off for this case"
    best = figures(runs, None)[1]
    if why is None:
        emulated = {}
        for label in ("ddp", best):
            with emulated_link(case.replicas, case.link_mbit) as names:
                emulated[label] = run_method(case, label, methods(case)[label], netns=names)
    figs, best = figures(runs, emulated)
    from phalanx.kernels.quant import bits_per_value

    bits = bits_per_value(runs["streaming"]["lowcomm"]["quantize"],
                          runs["streaming"]["lowcomm"]["quant_block"])
    out_runs: list[dict[str, Any]] = [{
        "kind": "case", "case": asdict(case), "best": best,
        "emulated_link": why or f"{case.link_mbit:g} Mb/s tbf",
        # The peak ratio with the quantization taken out: ~1/P.
        "peak_ratio_streaming_per_value": figs["peak_ratio_streaming"] * 32 / bits,
        "streaming_bits_per_value": bits}]
    out_runs += [{"kind": "loopback", **r} for r in runs.values()]
    out_runs += [{"kind": "emulated", **r} for r in (emulated or {}).values()]
    return result_doc(NAME, quick=quick, runs=out_runs, figures=figs)


def run(*, quick: bool) -> dict[str, Any]:
    """The registered entry point: QUICK (< 5 min on 2 cores) or FULL."""
    return bench(QUICK if quick else FULL, quick=quick)


def write_extras(doc: dict[str, Any], out: str | Path) -> Path | None:
    """Loss vs tokens and bytes on the slow link vs tokens, next to the JSON (.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in (r for r in doc["runs"] if r.get("kind") == "loopback"):
        tokens = [(i + 1) * r["tokens_per_step"] for i in range(r["steps"])]
        ax1.plot(tokens, smooth(r["train_loss"]), label=r["label"], lw=1.2)
        cum, total = [], 0
        for b in r["bytes_per_step"]:
            total += b
            cum.append(total / 1e6)
        if total:  # `alone` sends nothing
            ax2.plot(tokens, cum, label=r["label"], lw=1.2)
    ax1.set(xlabel="tokens", ylabel="train loss (mean of 10 steps)", title="loss vs tokens")
    ax2.set(xlabel="tokens", ylabel="MB sent per worker (cumulative)", yscale="log",
            title="bytes on the slow link")
    ax2.legend()
    fig.tight_layout()
    path = Path(out).with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        sys.stdout.flush()
        os._exit(0)
    else:
        from phalanx.bench import main

        sys.exit(main([NAME, *sys.argv[1:]]))
