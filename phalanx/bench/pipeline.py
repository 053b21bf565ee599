"""`phalanx bench pipeline`: phalanx's PipelineRuntime against torch.distributed.pipelining.

One run measures, side by side on the same machine:

- torch: `PipelineStage` + `Schedule1F1B` (vpp=1) and `ScheduleInterleaved1F1B` (vpp=2);
- phalanx: `PipelineRuntime` running `lower(build_schedule("1f1b" | "interleaved_1f1b"))`,
  the placement `PipelineTrainer` runs.

Both get the same Llama (phalanx.models), cut the same way (`stage_layers`), with the
same weights (`init_weights(seed)`), the same micro-batches and the same loss (summed
cross-entropy / global tokens; torch with `scale_grads=False`). Before timing, each
layout runs one step of both on one batch and checks that the losses and every
stage's gradients agree, so the comparison is apples to apples.

Timed region: one training step = forward + backward of every micro-batch, with its
P2P and loss, from a barrier to the step's return on the last rank (max end - min
start over ranks; perf_counter is CLOCK_MONOTONIC, shared by the processes of one
host). Excluded for both: `zero_grad`, the optimizer step, torch's one-off shape
inference (done in warm-up) and the gathering of timings. torch is run with
`return_outputs=False` so it does not concatenate logits that phalanx never builds.
After warm-up, steps alternate torch, phalanx, torch, phalanx... (ABAB) so drift
hits both; figures are medians.

Worlds: 2 processes pinned one per core (the goaled figures: DESIGN.md "Timing on
this 2-core machine"), then 4 processes on the same cores (pp=4; reported, not
goaled: with more ranks than cores the OS scheduler is part of the measurement).

Bubbles: `bubble_measured_*` is `measured_bubble` over all ranks' runtime events of a
step (compute = F/B/I/W actions; comm waits count as bubble); `bubble_simulated_*`
simulates the same lowered lists with the mean measured F and B durations. torch's
measured bubble comes from timing its `forward_one_chunk` / `backward_one_chunk`
(the loss of the last stage is outside those, so its compute is slightly smaller).

Each world runs as `python -m phalanx.bench.pipeline --worker SPEC` subprocesses
(OMP_NUM_THREADS=1, torch.set_num_threads(1)), with a deadline after which every
process is killed, and a gloo timeout so a hang fails rather than blocks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc
from phalanx.launch.world import pin, run_world, usable_cores

NAME = "pipeline"


@dataclass(frozen=True)
class Case:
    """Model, batch and repetition counts of one benchmark size."""

    hidden: int = 256
    intermediate: int = 688
    layers: int = 8
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 259  # the byte tokenizer's
    seq: int = 128
    micro_batch: int = 2
    n_micro: int = 8
    warmup: int = 3  # untimed steps per implementation and layout
    reps: int = 25  # timed steps per implementation and layout
    seed: int = 1234

    @property
    def tokens(self) -> int:
        """Tokens per training step (the global batch of one pipeline)."""
        return self.n_micro * self.micro_batch * self.seq


FULL = Case()
QUICK = Case(hidden=128, intermediate=352, seq=64, warmup=2, reps=15)

# (phalanx schedule name, torch schedule class, vpp)
VARIANTS: tuple[tuple[str, str, int], ...] = (
    ("1f1b", "Schedule1F1B", 1),
    ("interleaved_1f1b", "ScheduleInterleaved1F1B", 2),
)
_SHORT = {"1f1b": "1f1b", "interleaved_1f1b": "interleaved"}


# ------------------------------------------------------------------ parent: launch, collect


def measure(case: Case, *, world: int, timeout: float = 900.0,
            variants: Sequence[tuple[str, str, int]] = VARIANTS) -> list[dict[str, Any]]:
    """Run every variant at pp=`world` in `world` fresh processes; one raw record per
    (variant, implementation). Raises RuntimeError (with the ranks' log tails) if a rank
    fails or the world is still running after `timeout` seconds; no process outlives it."""
    cores = usable_cores()
    spec = {"case": asdict(case), "variants": [list(v) for v in variants],
            "cores": cores if world <= len(cores) else None,
            "pg_timeout_s": max(60.0, timeout / 2)}
    return run_world("phalanx.bench.pipeline", spec, world=world, timeout=timeout,
                     label="pipeline bench")


def figures_from(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The `figures` of the document: speedups and bubbles, per world size (suffix `_4proc`
    and so on for worlds other than 2)."""
    by = {(r["world"], r["schedule"], r["impl"]): r for r in runs}
    figs: dict[str, float] = {}
    for world in sorted({r["world"] for r in runs}):
        suffix = "" if world == 2 else f"_{world}proc"
        for sched, short in _SHORT.items():
            ph, tt = by.get((world, sched, "phalanx")), by.get((world, sched, "torch"))
            if ph is None or tt is None:
                continue
            figs[f"speedup_vs_torch_{short}{suffix}"] = ph["tokens_per_s"] / tt["tokens_per_s"]
            figs[f"bubble_measured_{short}{suffix}"] = ph["bubble_measured"]
            figs[f"bubble_simulated_{short}{suffix}"] = ph["bubble_simulated"]
            figs[f"bubble_measured_torch_{short}{suffix}"] = tt["bubble_measured"]
            figs[f"tokens_per_s_phalanx_{short}{suffix}"] = ph["tokens_per_s"]
            figs[f"tokens_per_s_torch_{short}{suffix}"] = tt["tokens_per_s"]
    return figs


def bench(case: Case, *, quick: bool, worlds: Sequence[int] = (2, 4),
          timeout: float = 900.0) -> dict[str, Any]:
    """Measure `case` at each world size and return the bench document."""
    runs: list[dict[str, Any]] = []
    for world in worlds:
        t0 = time.monotonic()
        print(f"pipeline bench: {world} processes ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        recs = measure(case, world=world, timeout=timeout)
        # Other work on the machine shows up in the step times; record how busy it was.
        for r in recs:
            r["load_avg_1m_before"], r["load_avg_1m_after"] = load_before, os.getloadavg()[0]
        runs += recs
        print(f"pipeline bench: {world} processes done in {time.monotonic() - t0:.0f} s",
              file=sys.stderr, flush=True)
    for r in runs:
        r["case"] = asdict(case)
    return result_doc(NAME, quick=quick, runs=runs, figures=figures_from(runs))


def run(*, quick: bool) -> dict[str, Any]:
    """The registered entry point: QUICK or FULL at 2 (goaled) and 4 (reported) processes."""
    return bench(QUICK if quick else FULL, quick=quick, timeout=600.0 if quick else 1200.0)


# ------------------------------------------------------------------ worker: one rank


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


class _Rank:
    """This process's share of one variant, for both implementations."""

    def __init__(self, case: Case, phalanx_name: str, torch_cls: str, vpp: int, *, rank: int,
                 world: int) -> None:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining import schedules as tsched

        from phalanx.models import LlamaConfig, LlamaForCausalLM
        from phalanx.parallel.pipeline.lowering import lower
        from phalanx.parallel.pipeline.runtime import PipelineRuntime
        from phalanx.parallel.pipeline.schedules import build_schedule
        from phalanx.parallel.pipeline_trainer import stage_layers

        self.case, self.rank, self.world, self.vpp = case, rank, world, vpp
        pp = world
        self.schedule = build_schedule(phalanx_name, pp=pp, vpp=vpp, n_microbatches=case.n_micro)
        self.lowered = lower(self.schedule)
        n_stages = self.schedule.n_stages
        if case.layers % n_stages:
            raise ValueError(f"{case.layers} layers do not cut into pp*vpp = {n_stages} stages")
        cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden,
                          intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                          num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                          max_position_embeddings=max(case.seq, 64))
        self.my_stages = self.schedule.rank_stages(rank)

        def build(s: int) -> torch.nn.Module:
            m = LlamaForCausalLM(cfg, layer_ids=stage_layers(s, n_stages=n_stages,
                                                             num_layers=cfg.num_hidden_layers),
                                 has_embedding=s == 0, has_head=s == n_stages - 1)
            m.init_weights(case.seed)
            return m

        # Two copies with the same weights: each implementation owns its modules and grads.
        self.torch_mods = {s: build(s) for s in self.my_stages}
        self.ph_mods = {s: build(s) for s in self.my_stages}
        ranks = list(range(pp))
        torch_group = dist.new_group(ranks)
        ph_group = dist.new_group(ranks)
        self.world_group = dist.new_group(list(range(world)))
        scale = 1.0 / case.tokens
        self.scale = scale
        vocab = case.vocab

        def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1),
                                   reduction="sum")

        def torch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return ce_sum(logits, targets) * scale

        # torch: the stage owning stage index s sits on rank s % pp for both schedules.
        device = torch.device("cpu")
        self.torch_events: list[tuple[str, float, float]] = []
        self.torch_stages = []
        for s in self.my_stages:
            st = PipelineStage(self.torch_mods[s], s, n_stages, device, group=torch_group)
            self._instrument(st, s)
            self.torch_stages.append(st)
        cls = getattr(tsched, torch_cls)
        stage_arg = self.torch_stages[0] if vpp == 1 else self.torch_stages
        self.torch_schedule = cls(stage_arg, n_microbatches=case.n_micro, loss_fn=torch_loss,
                                  scale_grads=False)

        mb_shape = (case.micro_batch, case.seq, case.hidden)
        self.runtime = PipelineRuntime(
            schedule=self.schedule, pp_rank=rank, actions=self.lowered[rank], stages=self.ph_mods,
            pp_ranks=ranks, pp_group=ph_group, activation=lambda _s: (mb_shape, torch.float32),
            loss_fn=ce_sum, loss_scale=scale, device=device, autocast=contextlib.nullcontext)

        # One batch, the same on every rank: m micro-batches of micro_batch sequences.
        g = torch.Generator().manual_seed(case.seed)
        tokens = torch.randint(0, vocab, (case.n_micro * case.micro_batch, case.seq + 1), generator=g)
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.xs = list(self.x.split(case.micro_batch))
        self.ys = list(self.y.split(case.micro_batch))
        self.first = 0 in self.my_stages
        self.last = n_stages - 1 in self.my_stages

    def _instrument(self, stage: Any, s: int) -> None:
        """Record torch's per-chunk compute times (F and full B) as events."""
        fwd, bwd = stage.forward_one_chunk, stage.backward_one_chunk
        events = self.torch_events

        def forward_one_chunk(chunk: int, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fwd(chunk, *args, **kwargs)
            finally:
                events.append((f"{s}F{chunk}", t0, time.perf_counter()))

        def backward_one_chunk(chunk: int, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return bwd(chunk, *args, **kwargs)
            finally:
                events.append((f"{s}B{chunk}", t0, time.perf_counter()))

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk

    # -------------------------------------------------------------- one step of each

    def torch_step(self) -> float | None:
        losses: list = []
        args = (self.x,) if self.first else ()
        kwargs: dict[str, Any] = {"return_outputs": False}
        if self.last:
            kwargs.update(target=self.y, losses=losses)
        self.torch_schedule.step(*args, **kwargs)
        return float(sum(float(v.detach()) for v in losses)) if self.last else None

    def phalanx_step(self) -> tuple[float | None, list]:
        out = self.runtime.step(self.xs, self.ys)
        loss = float(out.loss_sum) * self.scale if self.last else None
        return loss, out.events

    def zero_grad(self) -> None:
        for m in (*self.torch_mods.values(), *self.ph_mods.values()):
            m.zero_grad(set_to_none=True)

    def check_parity(self) -> dict[str, float]:
        """One step of each on the same batch: losses and every stage's gradients agree."""
        import torch

        self.zero_grad()
        t_loss = self.torch_step()
        p_loss, _ = self.phalanx_step()
        worst = 0.0
        for s in self.my_stages:
            tg = [p.grad for p in self.torch_mods[s].parameters()]
            pg = [p.grad for p in self.ph_mods[s].parameters()]
            if any(g is None for g in tg + pg):
                raise AssertionError(f"stage {s}: a parameter got no gradient")
            a = torch.cat([g.reshape(-1) for g in tg])
            b = torch.cat([g.reshape(-1) for g in pg])
            rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
            worst = max(worst, rel)
            if rel > 1e-4:
                raise AssertionError(f"stage {s}: torch and phalanx gradients differ (rel {rel:.2e})")
        if self.last:
            assert t_loss is not None and p_loss is not None
            if abs(t_loss - p_loss) > 1e-5 * max(1.0, abs(t_loss)):
                raise AssertionError(f"loss differs: torch {t_loss!r} vs phalanx {p_loss!r}")
        self.zero_grad()
        self.torch_events.clear()
        return {"loss_torch": t_loss if t_loss is not None else float("nan"),
                "loss_phalanx": p_loss if p_loss is not None else float("nan"),
                "grad_rel_diff": worst}

    def timed(self, fn: Any) -> tuple[float, float, Any]:
        import torch.distributed as dist

        self.zero_grad()
        gc.collect()
        dist.barrier(group=self.world_group)
        t0 = time.perf_counter()
        out = fn()
        return t0, time.perf_counter(), out


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pin(spec["cores"], rank)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    case = Case(**spec["case"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["pg_timeout_s"]))
    try:
        results = []
        for phalanx_name, torch_cls, vpp in spec["variants"]:
            results += _run_variant(case, phalanx_name, torch_cls, vpp, rank=rank, world=world,
                                    pinned=spec["cores"] is not None)
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_variant(case: Case, phalanx_name: str, torch_cls: str, vpp: int, *, rank: int, world: int,
                 pinned: bool) -> list[dict[str, Any]]:
    import torch.distributed as dist

    from phalanx.parallel.pipeline.simulator import Event, measured_bubble, simulate

    r = _Rank(case, phalanx_name, torch_cls, vpp, rank=rank, world=world)
    parity = r.check_parity()
    for _ in range(case.warmup):
        r.timed(r.torch_step)
        r.timed(r.phalanx_step)
    r.torch_events.clear()
    spans: dict[str, list[tuple[float, float]]] = {"torch": [], "phalanx": []}
    ph_events: list[list[tuple[str, float, float]]] = []
    torch_events: list[list[tuple[str, float, float]]] = []
    for _ in range(case.reps):  # ABAB: torch, phalanx, torch, phalanx, ...
        t0, t1, _ = r.timed(r.torch_step)
        spans["torch"].append((t0, t1))
        torch_events.append(list(r.torch_events))
        r.torch_events.clear()
        t0, t1, (_, events) = r.timed(r.phalanx_step)
        spans["phalanx"].append((t0, t1))
        ph_events.append([(e.action, e.start, e.end) for e in events])
    mine = {"spans": spans, "ph": ph_events, "torch": torch_events, "parity": parity}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=r.world_group)
    if rank != 0:
        return []

    pp = r.schedule.pp
    loss = next(g["parity"]["loss_phalanx"] for g in gathered
                if g["parity"]["loss_phalanx"] == g["parity"]["loss_phalanx"])
    grad_diff = max(g["parity"]["grad_rel_diff"] for g in gathered)

    def step_events(key: str, i: int) -> list[Event]:
        return [Event(rank=q, action=a, start=s, end=e) for q, g in enumerate(gathered)
                for a, s, e in g[key][i]]

    out = []
    for impl, key in (("torch", "torch"), ("phalanx", "ph")):
        times = [max(g["spans"][impl][i][1] for g in gathered) - min(g["spans"][impl][i][0] for g in gathered)
                 for i in range(case.reps)]
        bubbles = [measured_bubble(step_events(key, i), pp) for i in range(case.reps)]
        # Per rank: compute seconds per step (F/B) and, for phalanx, P2P batch wait seconds.
        compute = [_median([sum(e - s for a, s, e in g[key][i] if _kind(a) != "comm")
                            for i in range(case.reps)]) for g in gathered]
        rec: dict[str, Any] = {
            "world": world, "pinned": pinned, "schedule": phalanx_name, "pp": pp, "vpp": vpp,
            "impl": impl, "torch_schedule": torch_cls if impl == "torch" else None,
            "step_s": times, "step_s_median": _median(times),
            "tokens_per_step": case.tokens, "tokens_per_s": case.tokens / _median(times),
            "bubble_measured": _median(bubbles), "bubble_measured_per_step": bubbles,
            "compute_s_per_rank": compute, "loss": loss, "grad_rel_diff_vs_other": grad_diff,
        }
        if impl == "phalanx":
            comm = [_median([sum(e - s for a, s, e in g[key][i] if _kind(a) == "comm")
                             for i in range(case.reps)]) for g in gathered]
            f = [e - s for g in gathered for ev in g[key] for a, s, e in ev if _kind(a) == "F"]
            b = [e - s for g in gathered for ev in g[key] for a, s, e in ev if _kind(a) == "B"]
            costs = {"F": statistics.fmean(f), "B": statistics.fmean(b)}
            sim = simulate(r.lowered, r.schedule, costs=costs)
            rec.update({"comm_wait_s_per_rank": comm, "mean_F_s": costs["F"], "mean_B_s": costs["B"],
                        "bubble_simulated": sim.bubble_fraction,
                        "simulated_step_s": sim.makespan})
        out.append(rec)
    # Steps run in torch/phalanx pairs: the median of the per-pair ratios is less exposed to
    # drift than the ratio of medians (the figure), so it is kept alongside.
    t_steps, p_steps = out[0]["step_s"], out[1]["step_s"]
    out[1]["speedup_vs_torch_paired_median"] = _median([t / p for t, p in zip(t_steps, p_steps, strict=True)])
    return out


def _kind(action: str) -> str:
    k = action.lstrip("0123456789").rstrip("0123456789")
    return k if k in ("F", "B", "I", "W") else "comm"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        from phalanx.bench import main

        sys.exit(main([NAME, *sys.argv[1:]]))
