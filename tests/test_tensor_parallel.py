"""Tensor / sequence parallelism: TP=2 on real gloo processes against a one-process reference.

Every case builds the reference model (whole, or as stages) and the TP model from one
seed in each rank, runs one forward and backward on the same batch, and checks the loss,
every parameter's local gradient shard against the slice of the reference gradient, the
inter-stage activations and their gradients, and the gradient norm. The ranks are spawned
once per world size and run all cases; each test reads its case's outcome.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from phalanx.models import LlamaConfig, LlamaForCausalLM
from phalanx.parallel.tensor import (
    apply_tensor_parallel,
    check_tensor_parallel,
    clip_grad_norm_global_,
    global_grad_norm,
    tp_loss_sum,
)

MHA = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
# GQA with an odd vocabulary (the byte tokenizer's 259): the vocab shards are uneven.
GQA = dataclasses.replace(MHA, vocab_size=259, num_hidden_layers=4, num_key_value_heads=2)
GQA_TIED = dataclasses.replace(GQA, num_hidden_layers=2, tie_word_embeddings=True)
SEED, BATCH, SEQ = 5, 2, 8
ATOL, RTOL = 1e-5, 1e-4
TIMEOUT_S = 90.0  # for a whole spawn: every case of one world size
COLLECTIVE_TIMEOUT_S = 20


def _batch(config: LlamaConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g)
    return w[:, :-1], w[:, 1:]


def _build(config: LlamaConfig, **kwargs) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, **kwargs)
    model.init_weights(SEED)
    return model


def _expected_shard(ref: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the full tensor `ref` that this rank holds of `like` (DTensor or plain)."""
    if not isinstance(like, DTensor):
        return ref
    out = ref
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            n, i = like.device_mesh.size(dim), like.device_mesh.get_local_rank(dim)
            out = torch.chunk(out, n, dim=placement.dim)[i]
        else:
            assert isinstance(placement, Replicate), (placement, like.placements)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _assert_grads_match(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names == list(ref_params), "TP must keep the HF parameter names"
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert isinstance(p.grad, DTensor) == isinstance(p, DTensor), name
        if isinstance(p, DTensor):
            assert p.grad.placements == p.placements, (name, p.grad.placements, p.placements)
        want = _expected_shard(ref_params[name].grad, p)
        got = _local(p.grad)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=name)


def _seq_chunk(h: torch.Tensor, sp: bool, tp: int, rank: int) -> torch.Tensor:
    return torch.chunk(h, tp, dim=1)[rank] if sp else h


# --------------------------------------------------------------------- cases (run in ranks)

def case_whole(mesh, *, config: LlamaConfig, sp: bool, tokens=None, targets=None) -> None:
    """Whole model: loss, every gradient shard, torch's clip_grad_norm_ and ours."""
    x, y = _batch(config) if tokens is None else (tokens, targets)
    ref = _build(config)
    model = _build(config)
    apply_tensor_parallel(model, mesh, sequence_parallel=sp)
    layer = next(iter(model.model.layers.values()))
    assert layer.self_attn.num_heads == config.num_attention_heads // mesh.size()
    assert layer.self_attn.num_kv_heads == config.num_key_value_heads // mesh.size()

    n = y.numel()
    ref_loss = F.cross_entropy(ref(x).reshape(-1, config.vocab_size), y.reshape(-1), reduction="sum")
    (ref_loss / n).backward()
    logits = model(x)
    assert isinstance(logits, DTensor) and logits.placements == (Shard(2),), logits
    loss = tp_loss_sum(logits, y)
    assert type(loss) is torch.Tensor and loss.dim() == 0
    (loss / n).backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL * n, rtol=RTOL)
    _assert_grads_match(model, ref)
    with torch.no_grad():  # evaluation takes the no-autograd path
        torch.testing.assert_close(tp_loss_sum(model(x), y), ref_loss, atol=ATOL * n, rtol=RTOL)

    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    torch.testing.assert_close(global_grad_norm(model.parameters()), ref_norm, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(global_grad_norm(model.parameters(), norm_type=float("inf")),
                               torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()],
                                                             norm_type=float("inf")))
    # torch's own clip_grad_norm_ over the DTensor (and, without SP, plain) gradients:
    # the returned norm is the global one, and clipping scales every shard alike.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 * ref_norm.item())
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    torch.testing.assert_close(norm, ref_norm, atol=ATOL, rtol=RTOL)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * ref_norm.item())
    _assert_grads_match(model, ref)
    # Ours (what the trainer uses: it also spans pp / dp_shard groups).
    before = clip_grad_norm_global_(model.parameters(), 0.25 * ref_norm.item())
    torch.testing.assert_close(before, 0.5 * ref_norm, atol=ATOL, rtol=RTOL)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25 * ref_norm.item())
    _assert_grads_match(model, ref)


def case_stages(mesh, *, config: LlamaConfig, sp: bool) -> None:
    """Three pipeline stages (embedding+layer 0 | layer 1 | layers 2-3+head) chained by hand.

    Checks the documented inter-stage layout: full hidden states without SP, this rank's
    sequence chunk with SP; and the gradients that flow back across the boundaries.
    """
    tp, rank = mesh.size(), mesh.get_local_rank()
    cuts = [dict(layer_ids=[0], has_head=False),
            dict(layer_ids=[1], has_embedding=False, has_head=False),
            dict(layer_ids=[2, 3], has_embedding=False)]
    refs = [_build(config, **kw) for kw in cuts]
    stages = [_build(config, **kw) for kw in cuts]
    for stage in stages:
        apply_tensor_parallel(stage, mesh, sequence_parallel=sp)
    x, y = _batch(config, seed=2)
    n = y.numel()

    r1 = refs[0](x)
    r1.retain_grad()
    r2 = refs[1](r1)
    r2.retain_grad()
    (F.cross_entropy(refs[2](r2).reshape(-1, config.vocab_size), y.reshape(-1),
                     reduction="sum") / n).backward()

    h1 = stages[0](x)
    assert type(h1) is torch.Tensor
    torch.testing.assert_close(h1, _seq_chunk(r1, sp, tp, rank), atol=ATOL, rtol=RTOL)
    in2 = h1.detach().requires_grad_()
    h2 = stages[1](in2)
    assert type(h2) is torch.Tensor
    torch.testing.assert_close(h2, _seq_chunk(r2, sp, tp, rank), atol=ATOL, rtol=RTOL)
    in3 = h2.detach().requires_grad_()
    (tp_loss_sum(stages[2](in3), y) / n).backward()
    torch.testing.assert_close(in3.grad, _seq_chunk(r2.grad, sp, tp, rank), atol=ATOL, rtol=RTOL)
    h2.backward(in3.grad)
    torch.testing.assert_close(in2.grad, _seq_chunk(r1.grad, sp, tp, rank), atol=ATOL, rtol=RTOL)
    h1.backward(in2.grad)
    for stage, ref in zip(stages, refs, strict=True):
        _assert_grads_match(stage, ref)

    # The global norm across "pipeline stages": here all three stages live on every rank,
    # so no pp group is needed; a real pp run passes the pp group in `groups`.
    all_params = [p for s in stages for p in s.parameters()]
    ref_norm = torch.nn.utils.get_total_norm([p.grad for r in refs for p in r.parameters()])
    torch.testing.assert_close(global_grad_norm(all_params), ref_norm, atol=ATOL, rtol=RTOL)


def case_errors(mesh) -> None:
    model = LlamaForCausalLM(dataclasses.replace(MHA, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="num_key_value_heads=1"):
        apply_tensor_parallel(model, mesh)
    model = _build(MHA)
    apply_tensor_parallel(model, mesh, sequence_parallel=True)
    with pytest.raises(ValueError, match="already applied"):
        apply_tensor_parallel(model, mesh)
    with pytest.raises(ValueError, match="sequence length 7 must be divisible by parallel.tp=2"):
        model(torch.zeros(1, 7, dtype=torch.long))


def case_comm_counts(mesh) -> None:
    """One decoder layer as a middle stage: Megatron's collectives, no more.

    Without SP: one all-reduce per attention and per MLP, forward and backward. With SP:
    an all-gather + reduce-scatter pair each, mirrored in backward, plus the all-reduce
    of each RMSNorm weight's gradient.
    """
    expected = {
        False: ({"all_reduce": 2}, {"all_reduce": 2}),
        True: ({"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2},
               {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2, "all_reduce": 2}),
    }
    for sp, (want_fwd, want_bwd) in expected.items():
        stage = _build(MHA, layer_ids=[1], has_embedding=False, has_head=False)
        apply_tensor_parallel(stage, mesh, sequence_parallel=sp)
        x = torch.randn(BATCH, SEQ // mesh.size() if sp else SEQ, MHA.hidden_size)
        with CommDebugMode() as fwd:
            h = stage(x)
        with CommDebugMode() as bwd:
            h.backward(torch.ones_like(h))
        for mode, want in ((fwd, want_fwd), (bwd, want_bwd)):
            got = {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
            assert got == want, (sp, got, want)


def case_tp_dp(mesh2d) -> None:
    """TP=2 x DP=2: each dp rank its own half of the batch; DP all-reduce of the local shards."""
    tp_mesh, dp_mesh = mesh2d["tp"], mesh2d["dp"]
    config = GQA
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, config.vocab_size, (4, SEQ + 1), generator=g)
    x, y = w[:, :-1], w[:, 1:]
    ref = _build(config)
    (F.cross_entropy(ref(x).reshape(-1, config.vocab_size), y.reshape(-1), reduction="sum")
     / y.numel()).backward()

    model = _build(config)
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=True)
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    xs, ys = x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank]
    (tp_loss_sum(model(xs), ys) * dp / y.numel()).backward()
    dp_group = dp_mesh.get_group()
    for p in model.parameters():
        local = _local(p.grad)
        dist.all_reduce(local, group=dp_group)
        local.div_(dp)
    _assert_grads_match(model, ref)
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    # dp replicas hold copies: no dp group in `groups`.
    torch.testing.assert_close(global_grad_norm(model.parameters()), ref_norm, atol=ATOL, rtol=RTOL)


CASES_TP2 = {
    "tp_mha": lambda m: case_whole(m, config=MHA, sp=False),
    "tp_gqa_uneven_vocab": lambda m: case_whole(m, config=GQA, sp=False),
    "sp_mha": lambda m: case_whole(m, config=MHA, sp=True),
    "sp_gqa_uneven_vocab": lambda m: case_whole(m, config=GQA, sp=True),
    "sp_tied": lambda m: case_whole(m, config=GQA_TIED, sp=True),
    "tp_tied": lambda m: case_whole(m, config=GQA_TIED, sp=False),
    "stages_tp": lambda m: case_stages(m, config=GQA, sp=False),
    "stages_sp": lambda m: case_stages(m, config=GQA, sp=True),
    "comm_counts": case_comm_counts,
    "errors": case_errors,
}
CASES_4 = {"tp2_dp2": case_tp_dp}


# --------------------------------------------------------------------- process harness

def _worker(rank: int, world: int, port: int, mesh_shape: tuple[int, ...], names: list[str],
            results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        # A collective left waiting by a failed case on the other rank errors out here
        # instead of hanging until TIMEOUT_S.
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        if len(mesh_shape) == 1:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("tp",))
        else:
            mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
        for name in names:
            try:
                t0 = time.perf_counter()
                (CASES_TP2.get(name) or CASES_4[name])(mesh)
                results.put((name, rank, None, time.perf_counter() - t0))
            except BaseException:  # reported to the test, which fails with the traceback
                results.put((name, rank, traceback.format_exc(), 0.0))
            dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(("<harness>", rank, traceback.format_exc(), 0.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(mesh_shape: tuple[int, ...], names: list[str]) -> dict[str, list[str | None]]:
    world = 1
    for n in mesh_shape:
        world *= n
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, mesh_shape, names, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[str, list[str | None]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    expected = world * len(names)
    got = 0
    try:
        while got < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"TP ranks hung: {got}/{expected} results after {TIMEOUT_S}s")
            try:
                name, rank, err, _ = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank died with exit code {dead[0].exitcode}") from None
                continue
            if name == "<harness>":
                failed = "".join(f"\n--- {case} rank {r}:\n{e}" for case, errs in out.items()
                                 for r, e in enumerate(errs) if e)
                raise RuntimeError(f"rank {rank} failed outside a case (setup, or a barrier after "
                                   f"a case that failed on one rank only):\n{err}{failed}")
            out.setdefault(name, [None] * world)[rank] = err
            got += 1
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return out


@pytest.fixture(scope="module")
def tp2_results() -> dict[str, list[str | None]]:
    return _run_ranks((2,), list(CASES_TP2))


@pytest.mark.parametrize("case", list(CASES_TP2))
def test_tp2(tp2_results: dict[str, list[str | None]], case: str) -> None:
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(tp2_results[case]) if e]
    assert not errors, "\n".join(errors)


def test_tp2_dp2() -> None:
    results = _run_ranks((2, 2), list(CASES_4))
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(results["tp2_dp2"]) if e]
    assert not errors, "\n".join(errors)


def test_check_tensor_parallel_messages() -> None:
    check_tensor_parallel(GQA, 2, sequence_parallel=True, seq_len=8)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2.*parallel.tp in \[1, 2\]"):
        check_tensor_parallel(GQA, 4)
    with pytest.raises(ValueError, match="num_attention_heads=4, num_key_value_heads=4"):
        check_tensor_parallel(MHA, 3)
    with pytest.raises(ValueError, match="seq_len=9 must be divisible by parallel.tp=2"):
        check_tensor_parallel(MHA, 2, sequence_parallel=True, seq_len=9)
    check_tensor_parallel(MHA, 2, sequence_parallel=False, seq_len=9)


def test_loss_without_tp_is_plain_cross_entropy() -> None:
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    want = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(tp_loss_sum(logits, targets), want)
