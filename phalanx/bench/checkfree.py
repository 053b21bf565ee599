"""`phalanx bench checkfree`: what whole-stage recovery does to the loss.

A model cut into `n_stages` pipeline stages (`stage_layers`, as PipelineTrainer cuts it) trains
on the default corpus (the Python standard library's sources) while a whole stage -- every
replica of it, weights and optimizer state -- is lost at a fixed rate. Each variant trains for
the same number of *executed* steps (the same compute, a proxy for wall-clock time), with the
same seed, the same initial weights and the same data for each committed step:

- ``nofail``: no failure (the reference);
- ``checkfree``: an intermediate stage is rebuilt as the gradient-norm-weighted average of its
  neighbours; an end stage, which CheckFree cannot average, comes back from its last
  checkpoint (the authors' fallback); fresh optimizer, learning rate x1.1;
- ``checkfree_plus``: odd micro-batches run with stages 0<->1 and n-2<->n-1 swapped; a lost end
  stage is a copy of its swap partner plus the mirrored embedding / head; intermediate stages
  are averaged as in CheckFree; fresh optimizer, learning rate x1.1;
- ``rollback``: every stage and optimizer goes back to the last checkpoint (taken every
  `checkpoint_every` committed steps) and the steps since are redone, so it ends the budget
  at an earlier committed step (checkpoint save time is not charged: this favours rollback);
- ``random_init`` (labelled extra): the lost stage is re-initialised randomly, fresh optimizer,
  learning rate x1.1 (the authors' "ours-random" ablation);
- ``nofail_plus`` (labelled extra): CheckFree+'s swapped routes and no failure, which tells
  the cost of the swaps apart from the cost of the recoveries.

The recovery rules are the functions of `phalanx.checkpoint.checkfree`. One failure hits each
window of `fail_every` executed steps after the first, at a seeded random step; the stages come
from a seeded shuffle that makes every stage fail about equally often; the schedule is the same
for every variant.

**The pipeline is emulated in one process** (no torch.distributed): every micro-batch passes
through the stages' layers one stage after another in its route's order. What is measured is
the recovery algorithm's effect on the loss, not the runtime's; a stage's embedding and head
copies on its neighbour (CheckFree+'s mirrors) are exact replicas in a real pipeline, so the
emulation uses the owner's tensor for both and refreshes the mirror copy after every step.

Figures: ``final_loss_<variant>`` is the mean token loss on held-out windows (the end of the
corpus) after the budget; the curves (train loss per executed step, held-out loss every
`eval_every` steps) are in `runs`, and the plot is written next to ``--out`` as a PNG when
matplotlib (the ``plot`` extra) is installed.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from phalanx.bench import result_doc

NAME = "checkfree"
VARIANTS = ("nofail", "checkfree", "checkfree_plus", "rollback", "random_init", "nofail_plus")
EMULATION = ("pipeline emulated in one process: stages applied in sequence per micro-batch; "
             "measures the recovery algorithm's effect on the loss, not the runtime")


@dataclass(frozen=True)
class Case:
    model: str = "small"  # recipe phalanx/recipes/model/<model>.yaml
    n_stages: int = 4
    steps: int = 360  # executed steps per variant (the same compute budget for each)
    seq_len: int = 128
    micro_batch: int = 1
    n_micro: int = 4  # micro-batches per step (even: half of them are swapped by CheckFree+)
    fail_every: int = 72  # a whole stage is lost once per this many executed steps
    checkpoint_every: int = 20  # committed steps between checkpoints (rollback, CheckFree ends)
    warmup_steps: int = 20
    # phalanx's default; cosine to the end of the budget steadies the final weights, where a
    # constant rate (the authors' LLaMa runs) leaves them +-0.03 noisy at this scale.
    lr_schedule: str = "cosine"
    eval_every: int = 40
    eval_windows: int = 32  # held-out windows of seq_len tokens per evaluation
    seed: int = 1234  # weights and data order
    failure_seed: int = 0  # which stage fails when
    variants: tuple[str, ...] = VARIANTS


# About 0.3 s per step on 2 cores (idle machine): FULL is ~11 min for the 6 variants, QUICK ~3.
FULL = Case()
QUICK = Case(steps=100, fail_every=25, checkpoint_every=10, eval_every=25, eval_windows=16)


def failure_schedule(steps: int, every: int, n_stages: int, seed: int) -> list[tuple[int, int]]:
    """(executed step, stage) pairs at a rate of one per `every` steps: one failure at a seeded
    random point of each window [j*every, (j+1)*every), j >= 1, that ends within `steps` (a
    random phase, so a failure does not always land on a checkpoint); stages from a seeded
    shuffle of rounds of all stages, so each fails about equally often."""
    rng = random.Random(seed)
    at = [j * every + rng.randrange(every) for j in range(1, steps // every)]
    stages: list[int] = []
    while len(stages) < len(at):
        rnd = list(range(n_stages))
        rng.shuffle(rnd)
        stages += rnd
    return list(zip(at, stages, strict=False))


# ------------------------------------------------------------------ one emulated pipeline


class Emulation:
    """`n_stages` stage modules, each with its own AdamW and LR schedule (so one stage can get a
    fresh optimizer), trained one step at a time along per-micro-batch routes."""

    def __init__(self, case: Case, run: Any, tokens: Any, *, plus: bool) -> None:
        import torch

        from phalanx.checkpoint.checkfree import checkfree_plus_routes, mirror_keys
        from phalanx.data import GlobalBatchSampler, TokenWindows, train_val_split
        from phalanx.models import LlamaForCausalLM
        from phalanx.parallel.data_parallel import model_config
        from phalanx.parallel.optim import build_adamw, build_scheduler
        from phalanx.parallel.pipeline_trainer import stage_layers

        self.case, self.torch = case, torch
        self.cfg = model_config(run)
        self.optim_cfg = replace(run.optim, warmup_steps=case.warmup_steps, schedule=case.lr_schedule)
        self.grad_clip = run.trainer.grad_clip
        n = case.n_stages
        if self.cfg.num_hidden_layers % n:
            raise ValueError(f"{self.cfg.num_hidden_layers} layers do not cut into {n} stages")
        self.layer_ids = [list(stage_layers(s, n_stages=n, num_layers=self.cfg.num_hidden_layers))
                          for s in range(n)]

        def build(s: int) -> Any:
            return LlamaForCausalLM(self.cfg, layer_ids=self.layer_ids[s], has_embedding=s == 0,
                                    has_head=s == n - 1)

        self.build = build
        self.stages = []
        for s in range(n):
            m = build(s)
            m.init_weights(case.seed)
            self.stages.append(m)
        self.opts = [build_adamw(m, self.optim_cfg) for m in self.stages]
        self.scheds = [build_scheduler(o, self.optim_cfg, case.steps) for o in self.opts]
        self.lr_scale = [1.0] * n
        # The authors start every stage's "last gradient norm" at 1 before the first step.
        self.grad_norms = [1.0] * n
        plain = tuple(range(n))
        self.routes = (checkfree_plus_routes(case.n_micro, n) if plus
                       else tuple(plain for _ in range(case.n_micro)))
        self.plus = plus
        self.mirror_keys = {s: mirror_keys(s, n) for s in (0, n - 1)} if plus else {}
        self.mirrors: dict[int, dict[str, Any]] = {}
        self._refresh_mirrors()
        (tr0, tr1), (va0, va1) = train_val_split(len(tokens), run.data.val_fraction, case.seq_len)
        self.train = TokenWindows(tokens, case.seq_len, start=tr0, stop=tr1)
        self.val = TokenWindows(tokens, case.seq_len, start=va0, stop=va1)
        self.global_batch = case.n_micro * case.micro_batch
        self.sampler = GlobalBatchSampler(len(self.train), self.global_batch, case.seed)

    def params(self) -> list[Any]:
        return [p for m in self.stages for p in m.parameters()]

    def _refresh_mirrors(self) -> None:
        # In a real pipeline the neighbour's copy is kept identical; here it is refreshed after
        # every step so that a recovery reads the copy, never the lost stage.
        for s, keys in self.mirror_keys.items():
            sd = self.stages[s].state_dict()
            self.mirrors[s] = {k: sd[k].detach().clone() for k in keys}

    def forward(self, x: Any, route: Sequence[int]) -> Any:
        first, last = self.stages[0], self.stages[-1]
        h = first.model.embed_tokens(x)
        cos, sin = first.model.rotary_emb(h.shape[1], h.dtype)
        for s in route:
            for layer in self.stages[s].model.layers.values():
                h = layer(h, cos, sin)
        return last.lm_head(last.model.norm(h))

    def _loss_sum(self, x: Any, y: Any, route: Sequence[int]) -> Any:
        logits = self.forward(x, route)
        return self.torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    def step(self, step: int) -> float:
        """One optimizer step on committed step `step`'s data; returns the mean token loss."""
        torch = self.torch
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        tokens = self.global_batch * self.case.seq_len
        total = 0.0
        mbs = self.sampler.micro_batches(step, 0, 1, self.case.micro_batch)
        for mb, ids in enumerate(mbs):
            x, y = self.train.batch(ids)
            loss = self._loss_sum(x, y, self.routes[mb]) / tokens
            loss.backward()
            total += float(loss.detach())
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        torch.nn.utils.clip_grad_norm_(self.params(), clip)
        # Per-stage norms of the gradients the optimizer consumes (after the global clip).
        self.grad_norms = [float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in m.parameters() if p.grad is not None])))
            for m in self.stages]
        for o, sch in zip(self.opts, self.scheds, strict=True):
            o.step()
            sch.step()
        self._refresh_mirrors()
        return total

    def evaluate(self, n_windows: int) -> float:
        torch = self.torch
        n = min(n_windows, len(self.val))
        plain = tuple(range(self.case.n_stages))
        total = 0.0
        with torch.no_grad():
            for lo in range(0, n, self.case.micro_batch):
                x, y = self.val.batch(range(lo, min(n, lo + self.case.micro_batch)))
                total += float(self._loss_sum(x, y, plain))
        return total / (n * self.case.seq_len)

    # -------------------------------------------------------------- state, failure, recovery

    def snapshot(self, step: int) -> dict[str, Any]:
        return {"step": step, "stages": [copy.deepcopy(m.state_dict()) for m in self.stages],
                "opts": [copy.deepcopy(o.state_dict()) for o in self.opts],
                "scheds": [copy.deepcopy(s.state_dict()) for s in self.scheds],
                "lr_scale": list(self.lr_scale), "grad_norms": list(self.grad_norms)}

    def restore(self, snap: dict[str, Any]) -> int:
        for m, o, sch, sd, od, schd in zip(self.stages, self.opts, self.scheds, snap["stages"],
                                           snap["opts"], snap["scheds"], strict=True):
            m.load_state_dict(sd)
            o.load_state_dict(copy.deepcopy(od))
            sch.load_state_dict(schd)
        self.lr_scale, self.grad_norms = list(snap["lr_scale"]), list(snap["grad_norms"])
        self._refresh_mirrors()
        return snap["step"]

    def destroy(self, stage: int) -> None:
        """The stage's weights and optimizer state are gone: NaN, so that a recovery that read
        them would show in the loss."""
        with self.torch.no_grad():
            for p in self.stages[stage].parameters():
                p.fill_(math.nan)
                for v in self.opts[stage].state.get(p, {}).values():
                    v.fill_(math.nan)

    def rebuild(self, stage: int, weights: dict[str, Any]) -> None:
        """Load `weights` (all of the stage's tensors) and give the stage a fresh optimizer with
        the paper's learning-rate scale."""
        from phalanx.checkpoint.checkfree import LR_SCALE, fresh_optimizer_

        self.stages[stage].load_state_dict(weights, strict=True)
        fresh_optimizer_(self.opts[stage], self.stages[stage].parameters(),
                         base_lr=self.optim_cfg.lr, scheduler=self.scheds[stage])
        self.lr_scale[stage] = LR_SCALE


def _recover(em: Emulation, variant: str, stage: int, snap: dict[str, Any], k: int) -> str:
    """Rebuild lost `stage` by `variant`'s rule (not rollback); returns what was done."""
    from phalanx.checkpoint.checkfree import copy_stage, reconstruct_stage, recovery_plan

    ids = em.layer_ids[stage]
    if variant == "random_init":
        fresh = em.build(stage)
        fresh.init_weights(em.case.seed * 1_000_003 + 7919 * (k + 1))
        em.rebuild(stage, fresh.state_dict())
        return "random"
    plan = recovery_plan(stage, em.case.n_stages, plus=variant == "checkfree_plus")
    sd = [m.state_dict() for m in em.stages]
    if plan.kind == "average":
        a, b = plan.sources
        em.rebuild(stage, reconstruct_stage(sd[a], sd[b], em.grad_norms[a], em.grad_norms[b], ids))
        return f"average({a},{b})"
    if plan.kind == "copy":
        em.rebuild(stage, copy_stage(sd[plan.sources[0]], ids, em.mirrors[stage]))
        return f"copy({plan.sources[0]})+mirror"
    # CheckFree cannot average an end stage: that stage alone from its last checkpoint.
    em.rebuild(stage, copy.deepcopy(snap["stages"][stage]))
    return f"stage checkpoint(step {snap['step']})"


def train_variant(case: Case, variant: str, run: Any, tokens: Any,
                  failures: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Train one variant for `case.steps` executed steps with `failures` ((executed step,
    stage) pairs; ignored by ``nofail``); returns its curves and events."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    torch.manual_seed(case.seed)
    em = Emulation(case, run, tokens, plus=variant in ("checkfree_plus", "nofail_plus"))
    fail_at = {} if variant.startswith("nofail") else dict(failures)
    needs_ckpt = variant in ("rollback", "checkfree")
    snap = em.snapshot(0) if needs_ckpt else {}
    step = 0
    losses, steps, evals, events = [], [], [], []
    t0 = time.perf_counter()
    for it in range(case.steps):
        if it in fail_at:
            stage = fail_at[it]
            t1 = time.perf_counter()
            em.destroy(stage)
            before = step
            if variant == "rollback":
                step, how = em.restore(snap), f"rollback(step {snap['step']})"
            else:
                how = _recover(em, variant, stage, snap, len(events))
            if not all(bool(torch.isfinite(p).all()) for p in em.params()):
                raise AssertionError(f"{variant}: stage {stage} still holds lost values after {how}")
            events.append({"executed_step": it, "stage": stage, "recovery": how,
                           "steps_lost": before - step, "recover_s": time.perf_counter() - t1})
        losses.append(em.step(step))
        steps.append(step)
        step += 1
        if needs_ckpt and step % case.checkpoint_every == 0 and snap["step"] != step:
            snap = em.snapshot(step)
        if (it + 1) % case.eval_every == 0 or it + 1 == case.steps:
            evals.append({"executed_step": it + 1, "committed_step": step,
                          "val_loss": em.evaluate(case.eval_windows)})
    return {"kind": "variant", "variant": variant, "train_loss": losses, "committed_step": steps,
            "evals": evals, "failures": events, "final_loss": evals[-1]["val_loss"],
            "final_committed_step": step, "steps_lost": sum(e["steps_lost"] for e in events),
            "lr_scale_at_end": em.lr_scale, "wall_s": time.perf_counter() - t0,
            "tokens_per_step": em.global_batch * case.seq_len}


# ------------------------------------------------------------------ the document


def load_data(case: Case) -> tuple[Any, Any]:
    """The composed recipe for `case.model` and the default corpus's tokens."""
    from phalanx.config import validate
    from phalanx.data import open_tokens
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import prepare_corpus

    run = validate(compose_recipe([f"model={case.model}", f"trainer.seq_len={case.seq_len}",
                                   f"trainer.seed={case.seed}"]))
    return run, open_tokens(prepare_corpus(run))


def figures_from(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    by = {r["variant"]: r for r in runs if r.get("kind") == "variant"}
    figs = {f"final_loss_{v}": r["final_loss"] for v, r in by.items()}
    if "rollback" in by:
        figs["rollback_steps_lost"] = by["rollback"]["steps_lost"]
    figs["failures"] = max((len(r["failures"]) for r in by.values()), default=0)
    if "nofail" in by:
        # A yardstick for noise: how much the failure-free held-out loss moves over its last
        # three evaluations.
        last = [e["val_loss"] for e in by["nofail"]["evals"][-3:]]
        figs["nofail_loss_spread_last3"] = max(last) - min(last)
    return figs


def ranking_note(figs: dict[str, float]) -> str:
    """The measured order of the final losses, set against the paper's (lower is better)."""
    keys = [k for k in ("checkfree_plus", "checkfree", "rollback", "random_init", "nofail",
                        "nofail_plus")
            if f"final_loss_{k}" in figs]
    order = sorted(keys, key=lambda k: figs[f"final_loss_{k}"])
    text = " < ".join(f"{k} {figs[f'final_loss_{k}']:.4f}" for k in order)
    need = ("checkfree_plus", "checkfree", "rollback")
    if not all(f"final_loss_{k}" in figs for k in need):
        return f"final held-out loss, lower is better: {text}"
    cp, cf, rb = (figs[f"final_loss_{k}"] for k in need)
    agrees = cp <= cf < rb
    spread = figs.get("nofail_loss_spread_last3")
    noise = ("" if spread is None else f" (one seed, one failure schedule; the failure-free loss "
             f"moved by {spread:.4f} over its last three evaluations)")
    return (f"final held-out loss, lower is better: {text}{noise}. Paper (low failure rates): "
            f"CheckFree+ >= CheckFree > checkpoint rollback, i.e. loss cp <= cf < rollback: "
            f"{'same order here' if agrees else 'the order differs here'}.")


def bench(case: Case, *, quick: bool) -> dict[str, Any]:
    """Run every variant of `case` and return the bench document."""
    t0 = time.perf_counter()
    run, tokens = load_data(case)
    failures = failure_schedule(case.steps, case.fail_every, case.n_stages, case.failure_seed)
    runs: list[dict[str, Any]] = []
    for v in case.variants:
        print(f"checkfree bench: {v} ...", file=sys.stderr, flush=True)
        r = train_variant(case, v, run, tokens, failures)
        print(f"checkfree bench: {v} final loss {r['final_loss']:.4f} in {r['wall_s']:.0f} s",
              file=sys.stderr, flush=True)
        runs.append(r)
    return document(case, run, runs, quick=quick, wall_s=time.perf_counter() - t0)


def document(case: Case, run: Any, runs: Sequence[dict[str, Any]], *, quick: bool,
             wall_s: float) -> dict[str, Any]:
    """The bench document of `case` from its variants' records (`train_variant`)."""
    failures = failure_schedule(case.steps, case.fail_every, case.n_stages, case.failure_seed)
    figs = figures_from(runs)
    setup = {"kind": "setup", "emulation": EMULATION, "case": asdict(case),
             "failure_schedule": [list(f) for f in failures],
             "failure_rate_per_step": 1.0 / case.fail_every,
             "checkpoint_every": case.checkpoint_every, "executed_steps": case.steps,
             "lr": run.optim.lr, "weight_decay": run.optim.weight_decay,
             "grad_clip": run.trainer.grad_clip, "note": ranking_note(figs), "wall_s": wall_s}
    return result_doc(NAME, quick=quick, runs=[setup, *runs], figures=figs)


def run(*, quick: bool) -> dict[str, Any]:
    """The registered entry point: QUICK (< 5 min on 2 cores) or FULL (< 15 min)."""
    return bench(QUICK if quick else FULL, quick=quick)


def write_extras(doc: dict[str, Any], out: str | Path) -> Path | None:
    """The loss-curve plot next to the JSON (`out` with .png), when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    variants = [r for r in doc["runs"] if r.get("kind") == "variant"]
    setup = next(r for r in doc["runs"] if r.get("kind") == "setup")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    window = max(1, setup["executed_steps"] // 40)
    for r in variants:
        y = r["train_loss"]
        smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1])
                  for i in range(len(y))]
        ax1.plot(range(1, len(y) + 1), smooth, label=r["variant"], lw=1.2)
        ax2.plot([e["executed_step"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]],
                 marker="o", ms=3, label=r["variant"])
    for at, _stage in setup["failure_schedule"]:
        for ax in (ax1, ax2):
            ax.axvline(at, color="grey", ls=":", lw=0.8)
    ax1.set(xlabel="executed steps (same compute for every variant)",
            ylabel=f"train loss (mean of {window} steps)", title="training loss")
    ax2.set(xlabel="executed steps", ylabel="held-out loss", title="held-out loss")
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 4.0))
    ax2.legend()
    c = setup["case"]
    fig.suptitle(f"{c['model']} pp={c['n_stages']}, a whole stage lost every {c['fail_every']} "
                 f"steps (dotted), checkpoints every {c['checkpoint_every']}; "
                 "pipeline emulated in one process", fontsize=10)
    fig.tight_layout()
    path = Path(out).with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from phalanx.bench import main

    sys.exit(main([NAME, *sys.argv[1:]]))
