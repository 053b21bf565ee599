"""Calibration probes: what the training runs execute, timed on the real workers.

Each probe runs the same code a training step runs -- a decoder block as the pipeline
runtime calls it (``LlamaForCausalLM`` with one layer, RoPE tables included, TP and
recompute applied from outside in the trainer's order, autocast for bf16, fp32 stream),
the embedding and the head with our loss, gradient clipping and torch's AdamW built as
the trainers build them, and the collectives / P2P batches the trainers issue -- and
returns plain records (dicts of numbers). Fitting them and writing the profile is the
orchestrator's job (``phalanx.orchestrator.calibration``); starting the worker processes
is the launcher's (``phalanx calibrate``).

Timing rules: ``time.perf_counter``; warm-up iterations first; the cases of a probe (every
micro-batch size of every variant, every message size of every op) are run round-robin,
one iteration of each per round, so a slow spell of a shared machine hits all cases
alike instead of spoiling one; per case the median over rounds (and a 10%-trimmed mean,
which is what a sum of many operations adds up to when latencies are bimodal, as gloo's
are on pinned ranks). Every probe is bounded by a time budget: cases of the largest sizes
are dropped first when even the minimum number of rounds would not fit.

With a process group, every decision that changes how many operations run (rounds,
dropped cases) is taken on values agreed over the group (the max over ranks), so ranks
that time collectives -- or that must compute at the same time, as on an oversubscribed
machine -- stay in lockstep and never wait for an operation their peer skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from phalanx.models.llama import LlamaConfig, LlamaForCausalLM
from phalanx.parallel.optim import adamw, build_adamw
from phalanx.parallel.recompute import MODES as RECOMPUTE_MODES
from phalanx.parallel.recompute import apply_recompute
from phalanx.parallel.tensor import (
    apply_tensor_parallel,
    check_tensor_parallel,
    clip_grad_norm_global_,
    tp_loss_sum,
)

__all__ = [
    "COLLECTIVE_OPS",
    "PARTS",
    "probe_collectives",
    "probe_compute",
    "probe_optimizer",
    "run_probes",
    "variant_key",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("block", "embedding", "head")
# Byte counts are those of the full (unsharded) buffer: all_gather_into_tensor's output,
# reduce_scatter_tensor's input -- the flat buffer ZeRO hands them -- and one P2P message.
COLLECTIVE_OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "p2p", "p2p_bidir",
                  "p2p_idle")
# p2p_idle: the receiver has waited this long (a pipeline bubble) when the message leaves.
IDLE_S = 0.003

Record = dict[str, Any]


def variant_key(tp: int, sp: bool) -> str:
    """'tp1', 'tp2', 'tp2_sp': the layout variant a compute record was measured under."""
    return f"tp{tp}" + ("_sp" if sp and tp > 1 else "")


# -- the round-robin timing engine ---------------------------------------------------------------

def _agree(values: Sequence[float], group: dist.ProcessGroup | None) -> list[float]:
    """The elementwise max of ``values`` over ``group`` (the values themselves without one)."""
    if group is None or not dist.is_initialized() or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _sync(group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.is_initialized():
        dist.barrier(group=group)


def trimmed_mean(xs: Sequence[float], cut: float = 0.1) -> float:
    """Mean without the ``cut`` fraction of the smallest and of the largest values."""
    s = sorted(xs)
    k = int(len(s) * cut)
    return statistics.fmean(s[k:len(s) - k] if len(s) > 2 * k else s)


@dataclasses.dataclass
class _Case:
    """One thing to time: ``step()`` runs it once and returns the durations of its phases."""

    record: Record  # the fields that identify it in the output
    step: Callable[[], Sequence[float]]
    phases: tuple[str, ...]  # names of step()'s durations: "fwd", "bwd" -> fwd_s, bwd_s
    series: tuple  # cases of one series form one fit (at least min_points of them are kept)
    drop_order: float  # when the budget is short, a series' highest drop_order goes first
    # Pure computation on this thread (no communication): step() then returns the phases'
    # wall times followed by their thread CPU times, and a rep during which the thread lost
    # its core (wall time well above CPU time) was slowed by another process.
    cpu_bound: bool = False


def _preempted(wall_s: float, cpu_s: float) -> bool:
    return wall_s - cpu_s > max(0.05 * wall_s, 2e-4)


def _round_robin(cases: list[_Case], *, budget_s: float, warmup: int, min_reps: int,
                 max_reps: int, min_points: int, group: dist.ProcessGroup | None,
                 drop_preempted: bool = True) -> list[Record]:
    """Time ``cases`` round-robin within ``budget_s``: ``warmup`` rounds (the first also
    estimates each case's time, to drop the largest cases when even ``min_reps`` rounds
    would not fit), then rounds while the next one fits the budget, within [min_reps,
    max_reps]. Every decision is taken on values agreed over ``group``.

    ``drop_preempted``: a pinned rank owns its core in training, so what another tenant of
    a shared machine costs is not the model's. For a ``cpu_bound`` case the statistics
    use only the reps during which the thread kept its core (when at least a quarter of
    them, and 3, did); when the core was shared all along, they use the thread's CPU
    time instead of the wall time (``timing: "cpu"`` in the record; ``clean_reps`` says
    how many reps kept their core). Off where losing the core is the point (the
    oversubscribed world). ``cpu_bound`` records also carry ``<phase>_cpu_s``, the median
    thread CPU time over all reps.
    """
    start = time.perf_counter()
    # Round 1 is warm-up and estimate at once: each case's time, agreed over the group.
    est = []
    for c in cases:
        t0 = time.perf_counter()
        c.step()
        est.append(time.perf_counter() - t0)
    *est, spent = _agree([*est, time.perf_counter() - start], group)
    active = list(range(len(cases)))

    def round_s() -> float:
        return sum(est[i] for i in active)

    # While min_reps more rounds (plus the warm-up left) would not fit, drop the most
    # expensive of the cases first in their series' drop order (series keep min_points).
    while (min_reps + warmup - 1) * round_s() > budget_s - spent:
        counts: dict[tuple, int] = {}
        for i in active:
            counts[cases[i].series] = counts.get(cases[i].series, 0) + 1
        droppable = [i for i in active if counts[cases[i].series] > min_points
                     and cases[i].drop_order == max(cases[j].drop_order for j in active
                                                    if cases[j].series == cases[i].series)]
        if not droppable:
            break
        active.remove(max(droppable, key=lambda i: est[i]))
    for _ in range(warmup - 1):
        t_round = []
        for i in active:
            t0 = time.perf_counter()
            cases[i].step()
            t_round.append(time.perf_counter() - t0)
        for i, t in zip(active, _agree(t_round, group), strict=True):
            est[i] = t  # warm estimates
    samples: dict[int, list[Sequence[float]]] = {i: [] for i in active}
    n, last = 0, round_s()
    while n < max_reps:
        elapsed, next_s = _agree([time.perf_counter() - start, last], group)
        if n >= min_reps and elapsed + next_s > budget_s:
            break
        t0 = time.perf_counter()
        for i in active:
            samples[i].append(cases[i].step())
        n += 1
        last = time.perf_counter() - t0
    out = []
    for i in active:
        c = cases[i]
        rec = dict(c.record)
        k = len(c.phases)
        use, offset, timing = samples[i], 0, "wall"
        if c.cpu_bound:
            kept = [x for x in use if not _preempted(sum(x[:k]), sum(x[k:]))]
            rec["clean_reps"] = len(kept)
            if drop_preempted and len(kept) >= max(3, len(use) // 4):
                use = kept
            elif drop_preempted:
                offset, timing = k, "cpu"
        for j, name in enumerate(c.phases):
            col = [x[offset + j] for x in use]
            rec[f"{name}_s"] = statistics.median(col)
            rec[f"{name}_mean_s"] = trimmed_mean(col)
            rec[f"{name}_min_s"] = min(col)
            if c.cpu_bound:
                rec[f"{name}_cpu_s"] = statistics.median(x[k + j] for x in samples[i])
        rec["reps"] = n
        rec["timing"] = timing
        out.append(rec)
    return out


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


# -- compute: block, embedding, head ----------------------------------------------------------

def _build_part(part: str, cfg: LlamaConfig, *, recompute: str, tp_mesh: Any, sp: bool,
                seed: int) -> LlamaForCausalLM:
    if part == "block":
        m = LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=False, has_head=False)
    else:
        # A tied model cannot be cut into an embedding-only or head-only stage; the compute is
        # the same (one vocab x hidden matrix either way), so the probe unties it.
        untied = dataclasses.replace(cfg, tie_word_embeddings=False)
        m = LlamaForCausalLM(untied, layer_ids=[], has_embedding=part == "embedding",
                             has_head=part == "head")
    m.init_weights(seed)
    # The trainer's order: tensor parallel first, then recompute (pipeline_trainer.py).
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(m, tp_mesh, sequence_parallel=sp)
    apply_recompute(m, recompute)
    m.train()
    return m


def _compute_step(part: str, model: nn.Module, cfg: LlamaConfig, *, mbs: int, seq_len: int,
                  seq_local: int, dtype: torch.dtype,
                  gen: torch.Generator) -> Callable[[], tuple[float, ...]]:
    """One micro-batch's forward and backward: (fwd wall, bwd wall, fwd CPU, bwd CPU)."""
    if part == "embedding":
        inp = torch.randint(0, cfg.vocab_size, (mbs, seq_len), generator=gen)
    else:
        inp = torch.randn(mbs, seq_local, cfg.hidden_size, generator=gen).requires_grad_(True)
    targets = torch.randint(0, cfg.vocab_size, (mbs, seq_len), generator=gen)
    scale = 1.0 / (mbs * seq_len)
    grad_out: list[torch.Tensor] = []

    def step() -> tuple[float, float, float, float]:
        if inp.requires_grad:
            inp.grad = None
        c0, t0 = time.thread_time(), time.perf_counter()
        with _autocast(dtype):
            out = model(inp)
        if part == "head":  # outside autocast, as PipelineRuntime computes the loss
            out = tp_loss_sum(out, targets) * scale
        c1, t1 = time.thread_time(), time.perf_counter()
        if part == "head":
            out.backward()
        else:
            if not grad_out:
                grad_out.append(torch.randn(out.shape, dtype=out.dtype, generator=gen))
            torch.autograd.backward(out, grad_tensors=grad_out[0])
        c2, t2 = time.thread_time(), time.perf_counter()
        return t1 - t0, t2 - t1, c1 - c0, c2 - c1

    return step


def probe_compute(cfg: LlamaConfig, *, seq_len: int, compute_dtype: str, mbs_list: Sequence[int],
                  budget_s: float, parts: Sequence[str] = ("block",),
                  recompute_modes: Sequence[str] = ("none",), tp_mesh: Any = None,
                  sp_modes: Sequence[bool] = (False,), group: dist.ProcessGroup | None = None,
                  warmup: int = 2, min_reps: int = 3, max_reps: int = 15, min_points: int = 3,
                  seed: int = 0, drop_preempted: bool = True) -> list[Record]:
    """Forward and backward time of a decoder block / the embedding / the head vs micro-batch.

    ``block``: one ``LlamaDecoderLayer`` inside a one-layer stage module (RoPE tables built
    as in training), for each of ``recompute_modes``; ``embedding``: token ids -> hidden
    states; ``head``: final norm + lm_head + our summed cross-entropy with the runtime's
    loss scale. Under ``tp_mesh`` (size > 1) the modules are tensor-parallel, once per
    ``sp_modes`` setting, and times include their collectives. Forward runs under autocast
    for bf16 with an fp32 input that requires grad, as a pipeline stage receives it;
    backward is ``autograd.backward`` from the output with a fixed output gradient (from
    the loss for the head), accumulating into ``.grad`` as micro-batches do, and includes
    the recompute forward. One record per (part, variant, recompute, mbs): ``fwd_s``,
    ``bwd_s`` (medians), ``*_mean_s`` (trimmed means), ``*_min_s``, ``reps``,
    ``clean_reps`` (see ``_round_robin``'s ``drop_preempted``; TP cases communicate, so
    all their reps count).
    """
    tp = tp_mesh.size() if tp_mesh is not None else 1
    dtype = DTYPES[compute_dtype]
    gen = torch.Generator().manual_seed(seed + 1)
    cases: list[_Case] = []
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"part={part!r}: choose one of {', '.join(PARTS)}")
        for sp in sp_modes:
            sp = bool(sp and tp > 1)
            for rc in (recompute_modes if part == "block" else ("none",)):
                model = _build_part(part, cfg, recompute=rc, tp_mesh=tp_mesh, sp=sp, seed=seed)
                seq_local = seq_len // tp if sp else seq_len
                for mbs in sorted(set(mbs_list)):
                    rec = {"probe": part, "variant": variant_key(tp, sp), "tp": tp, "sp": sp,
                           "recompute": rc, "mbs": mbs}
                    step = _compute_step(part, model, cfg, mbs=mbs, seq_len=seq_len,
                                         seq_local=seq_local, dtype=dtype, gen=gen)
                    # The largest micro-batches go first (layouts use the small ones most).
                    cases.append(_Case(rec, step, ("fwd", "bwd"), (part, sp, rc), mbs,
                                       cpu_bound=tp == 1))
    gc.collect()
    _sync(group)
    return _round_robin(cases, budget_s=budget_s, warmup=warmup, min_reps=min_reps,
                        max_reps=max_reps, min_points=min_points, group=group,
                        drop_preempted=drop_preempted)


# -- optimizer ---------------------------------------------------------------------------------

def _param_sets(cfg: LlamaConfig, flat_sizes: Sequence[int] | None, max_model_numel: int,
                seed: int) -> list[tuple[str, str, nn.Module | list[nn.Parameter]]]:
    """(kind, name, parameters): ``flat`` sets are ZeRO's flat shards (one tensor each);
    ``list`` sets are parameter lists as a model holds them (DDP, pipeline without ZeRO):
    many tiny tensors (the per-tensor cost alone), one layer, half the layers, the model.
    Flat sizes default to 256K elements and the model's ZeRO shards at dp_shard = 4, 2, 1
    (the cost per element is not constant: large temporaries cost page faults)."""
    gen = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, str, nn.Module | list[nn.Parameter]]] = []
    with torch.device("meta"):
        total = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    if flat_sizes is None:
        n = min(total, max_model_numel)
        flat_sizes = sorted({1 << 18, n // 4, n // 2, n})
    for n in flat_sizes:
        sets.append(("flat", f"flat{n}", [nn.Parameter(torch.randn(n, generator=gen) * 0.02)]))
    sets.append(("list", "tiny64", [nn.Parameter(torch.randn(256, generator=gen) * 0.02)
                                    for _ in range(64)]))
    layer = LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=False, has_head=False)
    sets.append(("list", "layer", layer))
    per_layer = sum(p.numel() for p in layer.parameters())
    half = max(1, cfg.num_hidden_layers // 2)
    if half > 1 and half * per_layer <= max_model_numel:
        sets.append(("list", f"layers{half}", LlamaForCausalLM(
            cfg, layer_ids=range(half), has_embedding=False, has_head=False)))
    if total <= max_model_numel:
        sets.append(("list", "model", LlamaForCausalLM(cfg)))
    else:  # a large model: a stage of as many layers as the cap allows
        k = max(2, min(cfg.num_hidden_layers, max_model_numel // max(1, per_layer)))
        if k != half:
            sets.append(("list", f"layers{k}", LlamaForCausalLM(
                cfg, layer_ids=range(k), has_embedding=False, has_head=False)))
    return sets


def probe_optimizer(cfg: LlamaConfig, optim_cfg: Any, *, budget_s: float,
                    flat_sizes: Sequence[int] | None = None,
                    max_model_numel: int = 20_000_000, group: dist.ProcessGroup | None = None,
                    warmup: int = 2, min_reps: int = 3, max_reps: int = 12,
                    seed: int = 0) -> list[Record]:
    """Gradient clipping and AdamW step time on parameter sets as the trainers hold them.

    Sets (see ``_param_sets``): single flat tensors of ``flat_sizes`` elements (ZeRO's
    shards; by default the model's shard sizes) and model-held parameter lists. The
    optimizer is built the trainers' way (``build_adamw``: decay / no-decay groups,
    torch's default implementation for the device). Each rep runs a step's tail in the
    trainers' order: clipping both ways the trainers do it -- ``clip_grad_norm_`` of
    torch (DDP trainer) and ``clip_grad_norm_global_`` (pipeline trainer, no groups),
    each actually scaling the gradients -- then ``optimizer.step()``; the temporaries
    clipping allocates shape the allocator state the step then sees, as in training.
    Records: ``kind`` (flat / list), ``numel``, ``tensors``, ``adamw_s``, ``clip_s``,
    ``clip_ddp_s`` (medians; ``*_mean_s``, ``*_min_s`` too).
    """
    gen = torch.Generator().manual_seed(seed + 7)
    cases: list[_Case] = []
    for kind, name, holder in _param_sets(cfg, flat_sizes, max_model_numel, seed):
        if isinstance(holder, nn.Module):
            params = [p for p in holder.parameters() if p.requires_grad]
            opt = build_adamw(holder, optim_cfg)
        else:
            params = holder
            opt = adamw([{"params": params, "weight_decay": optim_cfg.weight_decay}], optim_cfg)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        with torch.no_grad():
            norm0 = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params])))
        # Just below the current norm: every call scales (as a clipped step does), while the
        # gradients shrink by a negligible factor (no drift towards subnormal numbers).
        max_norm = 0.999 * norm0

        def step(params: list = params, opt: Any = opt, max_norm: float = max_norm,
                 holder: Any = holder) -> tuple[float, ...]:
            c0, t0 = time.thread_time(), time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            c1, t1 = time.thread_time(), time.perf_counter()
            clip_grad_norm_global_(params, max_norm)
            c2, t2 = time.thread_time(), time.perf_counter()
            opt.step()
            c3, t3 = time.thread_time(), time.perf_counter()
            return t3 - t2, t2 - t1, t1 - t0, c3 - c2, c2 - c1, c1 - c0

        numel = sum(p.numel() for p in params)
        cases.append(_Case({"probe": "optimizer", "kind": kind, "case": name, "numel": numel,
                            "tensors": len(params)}, step, ("adamw", "clip", "clip_ddp"),
                           (kind, name), numel, cpu_bound=True))
    gc.collect()
    _sync(group)
    return _round_robin(cases, budget_s=budget_s, warmup=warmup, min_reps=min_reps,
                        max_reps=max_reps, min_points=1, group=group)


# -- collectives -------------------------------------------------------------------------------

def probe_collectives(*, sizes: Sequence[int], ops: Sequence[str] = COLLECTIVE_OPS,
                      budget_s: float, group: dist.ProcessGroup | None = None,
                      dtype: torch.dtype = torch.float32, op_suffix: str = "", warmup: int = 2,
                      min_reps: int = 5, max_reps: int = 30, min_points: int = 3) -> list[Record]:
    """Time of each collective over ``group`` vs message bytes (``budget_s`` for them all).

    Fresh tensors per size (shared by the ops); every iteration starts after a barrier and
    is timed on each rank until its own part completes; the record is this rank's (the
    fitting takes the slowest rank). ``p2p``: even group ranks send to the next odd one
    (``batch_isend_irecv``, as the pipeline runtime issues a batch); ``p2p_bidir``: both
    partners send and receive in one batch (1F1B's steady state pairs SEND_F with RECV_B);
    ``p2p_idle``: as ``p2p``, but the sender computes for ``IDLE_S`` first while the
    receiver waits, as in a pipeline bubble (time counted from the send; on a VM, waking
    the idle receiver costs more than the transfer of a small message). Records: ``op``,
    ``group_size``, ``bytes``, ``s`` (median), ``mean_s`` (trimmed mean), ``min_s``, ``reps``.
    """
    if group is None:
        group = dist.group.WORLD
    n = dist.get_world_size(group)
    me = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    elem = torch.tensor([], dtype=dtype).element_size()
    peer = ranks[me ^ 1] if me ^ 1 < n else None
    cases: list[_Case] = []
    sizes = sorted(set(sizes))
    # Short of budget, drop middle sizes first (largest first among them): the smallest
    # size pins alpha and the largest beta.
    drop_order = {b: (0 if k == 0 else 1 if k == len(sizes) - 1 else 1 + k)
                  for k, b in enumerate(sizes)}
    for nbytes in sizes:
        numel = max(n, nbytes // elem)
        numel -= numel % n
        full = torch.full((numel,), 1e-3, dtype=dtype)
        part = torch.full((numel // n,), 1e-3, dtype=dtype)
        recv = torch.empty(numel, dtype=dtype)
        for op in ops:
            if op not in COLLECTIVE_OPS:
                raise ValueError(f"op={op!r}: choose from {', '.join(COLLECTIVE_OPS)}")
            if op.startswith("p2p") and (n % 2 or n < 2):
                continue

            def run(op: str = op, full: torch.Tensor = full, part: torch.Tensor = part,
                    recv: torch.Tensor = recv) -> None:
                if op == "all_reduce":
                    dist.all_reduce(full, group=group)
                elif op == "all_gather_into_tensor":
                    dist.all_gather_into_tensor(full, part, group=group)
                elif op == "reduce_scatter_tensor":
                    dist.reduce_scatter_tensor(part, full, group=group)
                else:
                    if op == "p2p_idle" and me % 2 == 0:
                        t_end = time.perf_counter() + IDLE_S
                        while time.perf_counter() < t_end:  # busy, as a stage computing
                            pass
                    p2p = []
                    if op == "p2p_bidir" or me % 2 == 0:
                        p2p.append(dist.P2POp(dist.isend, full, peer, group, 11))
                    if op == "p2p_bidir" or me % 2 == 1:
                        p2p.append(dist.P2POp(dist.irecv, recv, peer, group, 11))
                    for w in dist.batch_isend_irecv(p2p):
                        w.wait()

            def step(run: Callable[[], None] = run,
                     wait: float = IDLE_S if op == "p2p_idle" else 0.0) -> tuple[float]:
                dist.barrier(group=group)
                t0 = time.perf_counter()
                run()
                return (time.perf_counter() - t0 - wait,)

            rec = {"probe": "collective", "op": op + op_suffix, "group_size": n,
                   "bytes": numel * elem, "dtype": str(dtype).removeprefix("torch.")}
            cases.append(_Case(rec, step, ("",), (op,), drop_order[nbytes]))
    _sync(group)
    out = _round_robin(cases, budget_s=budget_s, warmup=warmup, min_reps=min_reps,
                       max_reps=max_reps, min_points=min_points, group=group)
    for r in out:  # phase "" -> "_s", "_mean_s", "_min_s"
        r["s"], r["mean_s"], r["min_s"] = r.pop("_s"), r.pop("_mean_s"), r.pop("_min_s")
    return out


# -- the whole set, as a worker runs it ------------------------------------------------------

def run_probes(cfg: LlamaConfig, *, phase: str, seq_len: int, compute_dtype: str, optim_cfg: Any,
               mbs_list: Sequence[int], sizes: Sequence[int], budgets: Mapping[str, float],
               reduce_dtype: str = "fp32", group: dist.ProcessGroup | None = None,
               max_reps: int = 15, log: Callable[[str], None] | None = None) -> list[Record]:
    """The probes of one calibration world, in a fixed order every rank follows.

    ``phase="pinned"`` (one rank per core): blocks for every recompute mode, embedding and
    head; the same under tp = world size (with and without SP) when the world has 2 ranks
    and the model's heads divide; the optimizer; the collectives over ``group``.
    ``phase="oversubscribed"`` (more ranks than cores): the block without recompute and
    all_reduce / p2p, to compare with the pinned figures.
    Budgets (seconds, each for a whole probe): ``block``, ``embed_head``, ``tp``,
    ``optimizer``, ``collectives``. Returns the records, one ``{"probe": "wall"}`` per
    probe and ``{"probe": "skipped"}`` notes. ``max_reps``: rounds at most for compute
    (twice that for collectives).
    """
    world = dist.get_world_size(group) if (group is not None and dist.is_initialized()) else 1
    out: list[Record] = []
    say = log or (lambda _msg: None)

    def timed(what: str, fn: Callable[[], list[Record]]) -> None:
        t0 = time.perf_counter()
        recs = fn()
        out.extend(recs)
        out.append({"probe": "wall", "what": what, "s": time.perf_counter() - t0})
        say(f"{what}: {len(recs)} cases in {time.perf_counter() - t0:.1f} s")

    common = dict(seq_len=seq_len, compute_dtype=compute_dtype, mbs_list=mbs_list, group=group,
                  max_reps=max_reps)
    if phase == "oversubscribed":
        timed("block tp1", lambda: probe_compute(cfg, budget_s=budgets["block"],
                                                 drop_preempted=False, **common))
        if world > 1:
            timed("collectives", lambda: probe_collectives(
                sizes=sizes, ops=("all_reduce", "p2p"), budget_s=budgets["collectives"],
                group=group, min_points=2, max_reps=2 * max_reps))
        return out
    if phase != "pinned":
        raise ValueError(f"phase={phase!r}: choose pinned or oversubscribed")

    timed("block tp1", lambda: probe_compute(cfg, budget_s=budgets["block"],
                                             recompute_modes=RECOMPUTE_MODES, **common))
    timed("embedding+head tp1", lambda: probe_compute(
        cfg, budget_s=budgets["embed_head"], parts=("embedding", "head"), **common))
    reason = None
    if world != 2:
        reason = f"tensor-parallel probes run in a 2-rank world (this one has {world})"
    else:
        try:
            check_tensor_parallel(cfg, world)
        except ValueError as e:
            reason = str(e)
    if reason is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        sp_modes = [False] + ([True] if seq_len % world == 0 else [])
        if seq_len % world:
            out.append({"probe": "skipped", "what": variant_key(world, True),
                        "reason": f"seq_len={seq_len} is not divisible by tp={world}"})
        timed(f"tp{world}", lambda: probe_compute(
            cfg, budget_s=budgets["tp"], parts=PARTS, recompute_modes=RECOMPUTE_MODES,
            tp_mesh=mesh, sp_modes=sp_modes, **common))
    else:
        out.append({"probe": "skipped", "what": f"tp{world}", "reason": reason})

    timed("optimizer", lambda: probe_optimizer(cfg, optim_cfg, budget_s=budgets["optimizer"],
                                               group=group))
    if world > 1:
        timed("collectives", lambda: probe_collectives(
            sizes=sizes, budget_s=budgets["collectives"], group=group, max_reps=2 * max_reps))
        if reduce_dtype == "bf16":  # DDP's bf16 compress hook all-reduces bf16 buffers
            timed("collectives bf16", lambda: probe_collectives(
                sizes=sizes, ops=("all_reduce",), budget_s=budgets["collectives"] / 4,
                group=group, dtype=torch.bfloat16, op_suffix="_bf16", max_reps=2 * max_reps))
    return out
