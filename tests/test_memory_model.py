"""The planner's memory model against what really holds memory.

- per-layer / per-stage activation bytes against the bytes autograd saves for a real
  block or stage (`saved_tensors_hooks`, dedup by storage), over shapes, recompute modes,
  fp32 and bf16 autocast, and TP / SP on a single-process fake process group;
- parameter counts per stage against the modules' own;
- in-flight micro-batches against the pipeline simulator's `peak_inflight`;
- model states against the ZeRO formulas, and DeepSpeed's own estimators under
  DeepSpeed's assumptions;
- a whole rank's step peak against the allocator's, for real training steps
  (PipelineTrainer on the fake process group, profiler memory events).

Single process, a few seconds.
"""

from __future__ import annotations

import contextlib
import gc
import itertools

import pytest
import torch
import torch.nn.functional as F

from phalanx.models.llama import LlamaConfig, LlamaForCausalLM, num_params
from phalanx.orchestrator.candidate import Candidate
from phalanx.orchestrator.memory import (
    Dtypes,
    MemoryBreakdown,
    activation_bytes_per_layer,
    deepspeed_estimate,
    embedding_activation_bytes,
    head_activation_bytes,
    inflight_microbatches,
    memory_per_rank,
    model_state_bytes,
    peak_memory,
    stage_numel,
)
from phalanx.parallel.recompute import apply_recompute


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a second intra-op thread only spins, and on a busy machine it costs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FP32 = Dtypes.from_precision("fp32", "fp32")
BF16_AUTOCAST = Dtypes.from_precision("fp32", "bf16")
BF16 = Dtypes.from_precision("bf16", "bf16")  # bf16 weights, no autocast (not in recipes yet)
DTYPES = {"fp32": FP32, "bf16-autocast": BF16_AUTOCAST, "bf16": BF16}


def _cfg(h=64, inter=96, heads=4, kv=2, layers=4, vocab=300, tied=False) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, max_position_embeddings=128,
                       tie_word_embeddings=tied)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _storage(t: torch.Tensor):
    return _local(t).untyped_storage()


def _saved_bytes(module: torch.nn.Module, fn, *, keep=()) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters, buffers
    and the tensors in `keep` (inputs that exist anyway) excluded."""
    skip = {_storage(t).data_ptr() for t in itertools.chain(module.parameters(), module.buffers(), keep)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = _storage(t)
        if st.data_ptr() not in skip and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _autocast(dtypes: Dtypes):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtypes.autocast else contextlib.nullcontext()


# ---------------------------------------------------------------------- per-layer bytes

SHAPES = [  # h, I, heads, kv, micro_batch, seq
    (64, 96, 4, 2, 2, 32),
    (96, 256, 6, 1, 3, 16),
    (128, 344, 8, 8, 1, 48),
]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-i{}-a{}-kv{}-b{}-s{}".format(*s))
def test_layer_bytes_match_autograd(shape, dtypes, recompute):
    h, inter, heads, kv, b, s = shape
    cfg = _cfg(h=h, inter=inter, heads=heads, kv=kv, layers=1)
    stage = LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=False, has_head=False)
    apply_recompute(stage, recompute)
    dtype = torch.bfloat16 if dtypes.param == 2 else torch.float32
    stage.to(dtype)
    x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)

    def run():
        with _autocast(dtypes):
            stage(x)

    # The layer's input is saved by its first norm (or the checkpoint): part of its bytes.
    measured = _saved_bytes(stage, run)
    predicted = activation_bytes_per_layer(cfg, seq_len=s, micro_batch=b, recompute=recompute,
                                           dtypes=dtypes)
    assert predicted == pytest.approx(measured, rel=0.01)


def test_layer_formula_coefficients():
    # fp32, no TP: 4 b s (10 h + 4 I + H + 2) bytes; selective drops the attention's 6 h + H
    # (keeps its input h); full keeps the block input.
    cfg = _cfg(h=256, inter=688, heads=8, kv=2)
    b, s, h, i, a = 2, 128, 256, 688, 8
    kw = dict(seq_len=s, micro_batch=b, dtypes=FP32)
    assert activation_bytes_per_layer(cfg, **kw) == 4 * b * s * (10 * h + 4 * i + a + 2)
    assert activation_bytes_per_layer(cfg, recompute="selective", **kw) == 4 * b * s * (6 * h + 4 * i + 2)
    assert activation_bytes_per_layer(cfg, recompute="full", **kw) == 4 * b * s * h
    # TP without SP: norms and both linear inputs stay full; SP shards the norms only.
    t = 2
    assert activation_bytes_per_layer(cfg, tp=t, **kw) == 4 * b * s * (6 * h + 2 + (4 * h + 4 * i + a) / t)
    assert activation_bytes_per_layer(cfg, tp=t, sp=True, **kw) == \
        4 * b * s * (2 * h + (8 * h + 4 * i + a + 2) / t)
    # bf16 params (no autocast): every activation 2 bytes, norms' fp32 up-cast 4.
    assert activation_bytes_per_layer(cfg, **{**kw, "dtypes": BF16}) == \
        b * s * (24 * h + 8 * i + 4 * a + 8)


@pytest.mark.parametrize("dtypes", [FP32, BF16_AUTOCAST], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("tied", [False, True])
def test_whole_stage_bytes_match_autograd(dtypes, tied):
    """Embedding + 2 layers + final norm + lm_head + our loss (cross_entropy on logits.float())."""
    cfg = _cfg(layers=2, vocab=1000, tied=tied)
    b, s = 2, 32
    model = LlamaForCausalLM(cfg)
    ids, targets = torch.randint(0, cfg.vocab_size, (b, s)), torch.randint(0, cfg.vocab_size, (b, s))

    def run():
        with _autocast(dtypes):
            logits = model(ids)
        F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1), reduction="sum")

    measured = _saved_bytes(model, run, keep=(ids, targets))
    kw = dict(seq_len=s, micro_batch=b, dtypes=dtypes)
    predicted = (2 * activation_bytes_per_layer(cfg, **kw) + embedding_activation_bytes(cfg, **kw)
                 + head_activation_bytes(cfg, **kw))
    assert predicted == pytest.approx(measured, rel=0.02)


# -------------------------------------------------------------- TP / SP on a fake group


@contextlib.contextmanager
def _fake_world(rank: int, world: int):
    """One process plays `rank` of `world` on torch's fake process group: collectives and
    P2P are no-ops, shapes, saved tensors and allocations are real."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:  # pragma: no cover - torch without its testing package
        pytest.skip("torch's fake process group is not available")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def tp2_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    with _fake_world(0, 2):
        yield init_device_mesh("cpu", (2,))


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_layer_bytes(tp2_mesh, sp, recompute):
    from phalanx.parallel.tensor import apply_tensor_parallel

    cfg = _cfg(layers=1)
    b, s, tp = 2, 32, 2
    stage = LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=False, has_head=False)
    apply_tensor_parallel(stage, tp2_mesh, sequence_parallel=sp)
    apply_recompute(stage, recompute)
    x = torch.randn(b, s // tp if sp else s, cfg.hidden_size, requires_grad=True)
    measured = _saved_bytes(stage, lambda: stage(x))
    predicted = activation_bytes_per_layer(cfg, seq_len=s, micro_batch=b, tp=tp, sp=sp,
                                           recompute=recompute, dtypes=FP32)
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_head_and_numel(tp2_mesh, sp):
    from phalanx.parallel.tensor import apply_tensor_parallel, tp_loss_sum

    cfg = _cfg(layers=2, vocab=259)  # uneven vocab shards: 130 + 129
    b, s, tp = 2, 32, 2
    head = LlamaForCausalLM(cfg, layer_ids=[1], has_embedding=False, has_head=True)
    apply_tensor_parallel(head, tp2_mesh, sequence_parallel=sp)
    x = torch.randn(b, s // tp if sp else s, cfg.hidden_size, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (b, s))
    measured = _saved_bytes(head, lambda: tp_loss_sum(head(x), targets), keep=(targets,))
    kw = dict(seq_len=s, micro_batch=b, tp=tp, sp=sp, dtypes=FP32)
    predicted = activation_bytes_per_layer(cfg, **kw) + head_activation_bytes(cfg, **kw)
    # The loss's detached fp32 leaf (the local logits) is held by its autograd ctx, not saved.
    measured += b * s * 130 * 4
    assert predicted == pytest.approx(measured, rel=0.02)
    # Parameters on a TP rank: the larger vocab shard, matrices / tp, norms replicated.
    local = sum(_local(p).numel() for p in head.parameters())
    assert stage_numel(cfg, stage=1, n_stages=2, tp=tp) == local
    first = LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=True, has_head=False)
    apply_tensor_parallel(first, tp2_mesh, sequence_parallel=sp)
    assert stage_numel(cfg, stage=0, n_stages=2, tp=tp) == sum(_local(p).numel() for p in first.parameters())


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_stages", [1, 2, 4])
def test_stage_numel_counts_the_modules(n_stages, tied):
    cfg = _cfg(layers=4, tied=tied)
    total = sum(stage_numel(cfg, stage=s, n_stages=n_stages, tp=1) for s in range(n_stages))
    assert total == num_params(cfg)
    if tied and n_stages > 1:
        with pytest.raises(ValueError, match="tie_word_embeddings"):
            LlamaForCausalLM(cfg, layer_ids=[0], has_embedding=True, has_head=False)
        return
    per = cfg.num_hidden_layers // n_stages
    for s in range(n_stages):
        with torch.device("meta"):
            m = LlamaForCausalLM(cfg, layer_ids=range(s * per, (s + 1) * per), has_embedding=s == 0,
                                 has_head=s == n_stages - 1)
        assert stage_numel(cfg, stage=s, n_stages=n_stages, tp=1) == sum(p.numel() for p in m.parameters())


def test_tied_model_cut_into_stages_is_refused():
    cand = Candidate(dp_replicate=1, dp_shard=1, tp=1, pp=2, vpp=1, micro_batch_size=1, zero_stage=0,
                     recompute="none", sp=False, schedule="1f1b")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        memory_per_rank(_cfg(tied=True), cand, seq_len=16, global_batch=4, dtypes=FP32)


# ------------------------------------------------------------------------- model states


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_model_states_fp32_adam_match_our_zero(n):
    psi = 1_000_003
    expect = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}
    for stage, value in expect.items():
        got = model_state_bytes(numel=psi, zero_stage=stage, dp_shard=n, dtypes=FP32)
        assert got["params"] + got["grads"] + got["optimizer"] == pytest.approx(value)
        assert got["device"] == pytest.approx(value) and got["host"] == 0
    z1 = model_state_bytes(numel=psi, zero_stage=1, dp_shard=n, dtypes=FP32)
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (4 * psi, 4 * psi, pytest.approx(8 * psi / n))


@pytest.mark.parametrize("n", [1, 4, 64])
def test_model_states_bf16_match_the_zero_paper(n):
    # Rajbhandari et al. 2020, K = 12 (fp32 master + Adam m, v), 2-byte params and grads.
    psi = 7_500_000_000
    d = Dtypes.from_precision("bf16", "bf16")
    expect = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    for stage, value in expect.items():
        got = model_state_bytes(numel=psi, zero_stage=stage, dp_shard=n, dtypes=d)
        assert got["device"] == pytest.approx(value)


def test_offload_moves_optimizer_and_master_to_host():
    psi, n = 10**6, 4
    for stage in (1, 2, 3):
        got = model_state_bytes(numel=psi, zero_stage=stage, dp_shard=n, dtypes=FP32, offload=True)
        assert got["host"] == pytest.approx(16 * psi / n)  # fp32 master + fp32 grads + m + v
        assert got["grads"] == got["optimizer"] == 0
        assert got["params"] == (4 * psi / n if stage == 3 else 4 * psi)
    with pytest.raises(ValueError):
        model_state_bytes(numel=psi, zero_stage=0, dp_shard=1, dtypes=FP32, offload=True)


def test_more_zero_means_less_state_per_rank():
    for d, n in itertools.product([FP32, Dtypes.from_precision("bf16", "bf16"), Dtypes.deepspeed()],
                                  [2, 4, 16]):
        totals = [model_state_bytes(numel=10**8, zero_stage=z, dp_shard=n, dtypes=d)["device"]
                  for z in range(4)]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


# ---------------------------------------------------------------------------- DeepSpeed


DS_CASES = [  # total params, largest layer, gpus per node, nodes
    (10**9, 10**7, 1, 1),
    (10**9, 10**7, 8, 1),
    (3_000_000_007, 52_428_800, 4, 1),
    (125_000_000, 2_359_296, 8, 2),
    (7_000_000_000, 131_072_000, 8, 4),
]


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
@pytest.mark.parametrize("case", DS_CASES, ids=lambda c: f"{c[0]:.0e}-g{c[2]}-n{c[3]}")
def test_reproduces_deepspeed_zero2_estimate(case, offload):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, _, gpus, nodes = case
    for factor in (1.0, 1.5):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=nodes,
                                                         cpu_offload=offload,
                                                         additional_buffer_factor=factor)
        our_cpu, our_gpu = deepspeed_estimate(total_params=total, zero_stage=2, num_gpus_per_node=gpus,
                                              num_nodes=nodes, cpu_offload=offload,
                                              additional_buffer_factor=factor)
        assert our_gpu == pytest.approx(gpu, abs=1)  # DeepSpeed truncates to int
        assert our_cpu == pytest.approx(cpu, abs=1)


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
@pytest.mark.parametrize("case", DS_CASES, ids=lambda c: f"{c[0]:.0e}-g{c[2]}-n{c[3]}")
def test_reproduces_deepspeed_zero3_estimate(case, offload, zero_init):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total, largest, gpus, nodes = case
    cpu_offload, offload_params = offload != "none", offload == "optimizer+params"
    cpu, gpu, largest_mem = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=cpu_offload,
        cpu_offload_params=offload_params, zero_init=zero_init, additional_buffer_factor=1.5)
    our_cpu, our_gpu = deepspeed_estimate(
        total_params=total, zero_stage=3, num_gpus_per_node=gpus, num_nodes=nodes,
        cpu_offload=cpu_offload, cpu_offload_params=offload_params, largest_layer_params=largest,
        zero_init=zero_init, additional_buffer_factor=1.5)
    assert our_gpu == pytest.approx(gpu, abs=1)
    assert our_cpu == pytest.approx(cpu, abs=1)
    d = Dtypes.deepspeed()
    assert largest_mem == (d.param + d.grad) * largest


def test_deepspeed_dtypes_are_our_model_states():
    # Without DeepSpeed: its no-offload ZeRO-2 number is 2Ψ + 18Ψ/N, straight from model_state_bytes.
    psi, n = 10**9, 8
    got = model_state_bytes(numel=psi, zero_stage=2, dp_shard=n, dtypes=Dtypes.deepspeed())
    assert got["device"] == pytest.approx(2 * psi + 18 * psi / n)


# ----------------------------------------------------------------------------- schedule


def _simulated_peaks(name: str, pp: int, vpp: int, m: int) -> tuple[int, ...]:
    from phalanx.parallel.pipeline.lowering import lower
    from phalanx.parallel.pipeline.schedules import build_schedule
    from phalanx.parallel.pipeline.simulator import simulate

    s = build_schedule(name, pp=pp, vpp=vpp, n_microbatches=m)
    return simulate(lower(s), s).peak_inflight


GRID = ([("gpipe", p, 1, m) for p in (1, 2, 4) for m in (1, 3, 8)]
        + [("1f1b", p, 1, m) for p in (1, 2, 3, 4) for m in (1, 2, 4, 7)]
        + [("zb_h1", p, 1, m) for p in (2, 3, 4) for m in (1, 3, 4, 9)]
        + [("interleaved_1f1b", p, v, m) for p in (1, 2, 3, 4) for v in (1, 2, 3)
           for m in (p, 3 * p)]
        + [("zb_v", p, 2, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 5, 8)])


@pytest.mark.parametrize("case", GRID, ids=lambda c: "{}-p{}-v{}-m{}".format(*c))
def test_inflight_matches_simulator(case):
    name, pp, vpp, m = case
    peaks = _simulated_peaks(name, pp, vpp, m)
    for r in range(pp):
        assert inflight_microbatches(name, pp=pp, vpp=vpp, n_microbatches=m, pp_rank=r) == peaks[r] / vpp


def test_inflight_closed_forms():
    assert inflight_microbatches("1f1b", pp=4, vpp=1, n_microbatches=16, pp_rank=0) == 4
    assert inflight_microbatches("1f1b", pp=4, vpp=1, n_microbatches=16, pp_rank=3) == 1
    assert inflight_microbatches("gpipe", pp=4, vpp=1, n_microbatches=16, pp_rank=3) == 16
    for p, v in itertools.product((2, 4, 8), (2, 3, 4)):
        first = inflight_microbatches("interleaved_1f1b", pp=p, vpp=v, n_microbatches=4 * p, pp_rank=0)
        assert first == pytest.approx(p * (1 + (p - 1) / (p * v)))
    with pytest.raises(ValueError):
        inflight_microbatches("1f1b", pp=2, vpp=1, n_microbatches=4, pp_rank=2)


# ------------------------------------------------------------------------------ per rank


def _cand(**kw) -> Candidate:
    base = dict(dp_replicate=1, dp_shard=1, tp=1, pp=1, vpp=1, micro_batch_size=2, zero_stage=0,
                recompute="none", sp=False, schedule="1f1b")
    return Candidate(**{**base, **kw})


def test_recompute_orders_activations():
    cfg = _cfg(h=256, inter=688, heads=8, kv=2, layers=8, vocab=512)
    kw = dict(seq_len=256, global_batch=16, dtypes=FP32)
    acts = {}
    for rc in ("none", "selective", "full"):
        layer = activation_bytes_per_layer(cfg, seq_len=256, micro_batch=2, recompute=rc, dtypes=FP32)
        acts[rc] = (layer, peak_memory(cfg, _cand(pp=2, recompute=rc), **kw).activations)
    assert acts["full"][0] < acts["selective"][0] < acts["none"][0]
    assert acts["full"][1] < acts["selective"][1] < acts["none"][1]


def test_pipeline_ranks_and_zero():
    cfg = _cfg(h=128, inter=344, heads=4, kv=2, layers=8, vocab=2000)
    kw = dict(seq_len=64, global_batch=32, dtypes=FP32)
    ranks = memory_per_rank(cfg, _cand(pp=4, dp_shard=2, zero_stage=1), **kw)
    assert [r.pp_rank for r in ranks] == [0, 1, 2, 3]
    assert all(isinstance(r, MemoryBreakdown) for r in ranks)
    # 1F1B: rank r holds pp - r micro-batches; middle ranks have the same layers.
    assert ranks[1].activations > ranks[2].activations
    # Each rank's model states are its stages' ZeRO-1 bytes.
    for r in ranks:
        psi = stage_numel(cfg, stage=r.pp_rank, n_stages=4, tp=1)
        assert r.model_states == pytest.approx(8 * psi + 8 * psi / 2)
    # More ZeRO: fewer model states per rank; ZeRO-3's gathered stage is a buffer.
    states = [peak_memory(cfg, _cand(pp=2, dp_shard=4, zero_stage=z), **kw) for z in (1, 2, 3)]
    assert states[0].model_states > states[1].model_states > states[2].model_states
    assert states[0].buffers == 0 < states[1].buffers < states[2].buffers
    # Interleaving holds more on the first rank than 1F1B (same micro-batches, same layers).
    plain = memory_per_rank(cfg, _cand(pp=2, schedule="1f1b"), **kw)[0].activations
    inter = memory_per_rank(cfg, _cand(pp=2, vpp=2, schedule="interleaved_1f1b"), **kw)[0].activations
    assert inter > plain
    d = peak_memory(cfg, _cand(pp=1, dp_replicate=2, offload=True, zero_stage=2), **kw)
    assert d.host > 0 and d.optimizer == 0
    assert set(d.to_dict()) >= {"params", "grads", "optimizer", "activations", "buffers", "host",
                                "model_states", "total"}


def test_gpipe_holds_every_microbatch():
    cfg = _cfg(layers=4)
    kw = dict(seq_len=32, global_batch=16, dtypes=FP32)
    one = memory_per_rank(cfg, _cand(pp=2, schedule="1f1b"), **kw)[0].activations
    all_ = memory_per_rank(cfg, _cand(pp=2, schedule="gpipe"), **kw)[0].activations
    assert all_ > 3 * one


def test_walk_counts_the_simulators_inflight():
    # The per-rank walk in memory_per_rank, with 1 byte per micro-batch and no extras,
    # reproduces the simulator's peak_inflight.
    from phalanx.orchestrator.memory import _compute_orders, _StageBytes, _walk

    for name, pp, vpp, m in [("1f1b", 4, 1, 8), ("gpipe", 3, 1, 5), ("zb_h1", 4, 1, 6),
                             ("interleaved_1f1b", 4, 2, 8), ("interleaved_1f1b", 2, 3, 4), ("zb_v", 3, 2, 7)]:
        _, orders = _compute_orders(name, pp, vpp, m)
        unit = {s: _StageBytes(held=1.0, fwd_work=0.0, bwd_work=0.0, grad_in=0.0, w_pending=0.0)
                for s in range(pp * vpp)}
        peaks = _simulated_peaks(name, pp, vpp, m)
        for r in range(pp):
            assert _walk(orders[r], unit, {}) == (peaks[r], 0)


# Every schedule the planner enumerates (runs written down without the schedule) and two
# that come from the schedule itself, over warm-up-capped and steady-state micro-batch counts.
RUN_GRID = ([(name, p, 1, m) for name in ("1f1b", "zb_h1", "gpipe") for p in (1, 2, 3, 5)
             for m in range(1, 3 * p + 3)]
            + [("interleaved_1f1b", p, v, m) for p in (1, 2, 3, 4) for v in (1, 2, 3, 4)
               for m in range(p, 4 * p + 1, p)]
            + [("zb_v", p, 2, m) for p in (2, 3) for m in (1, 4, 7)]
            + [("1f1b", 16, 1, 64), ("zb_h1", 12, 1, 40), ("interleaved_1f1b", 8, 4, 32)])


def test_compute_runs_expand_to_the_schedules_order_and_walk_alike():
    # memory_per_rank walks run-length encoded compute orders (O(runs) per rank instead of
    # O(m)); they must be the schedule's own orders and give the plain walk's bytes.
    import random

    from phalanx.orchestrator.memory import (
        _compute_orders,
        _compute_runs,
        _StageBytes,
        _walk,
        _walk_runs,
    )

    rng = random.Random(0)
    for name, pp, vpp, m in RUN_GRID:
        stage_to_rank, orders = _compute_orders(name, pp, vpp, m)
        placed, runs = _compute_runs(name, pp, vpp, m)
        assert placed == stage_to_rank, (name, pp, vpp, m)
        for r in range(pp):
            assert [a for block, n in runs[r] for _ in range(n) for a in block] == orders[r]
            stages = {s: _StageBytes(*(rng.uniform(0, 1e6) for _ in range(5)))
                      for s in range(pp * vpp)}
            for late in ({}, {s: rng.uniform(0, 1e6) for s in range(pp * vpp)
                              if stage_to_rank[s] == r}):
                want, got = _walk(orders[r], stages, late), _walk_runs(runs[r], stages, late)
                assert got == pytest.approx(want, rel=1e-12, abs=1e-6), (name, pp, vpp, m, r)
    with pytest.raises(ValueError, match="multiple of pp"):
        _compute_runs("interleaved_1f1b", 4, 2, 6)  # the schedule's own error


def test_ddp_accumulation_keeps_a_second_gradient():
    cfg = _cfg(layers=4)
    kw = dict(seq_len=32, dtypes=FP32)
    one = peak_memory(cfg, _cand(dp_replicate=2), global_batch=4, **kw)  # 1 micro-batch
    two = peak_memory(cfg, _cand(dp_replicate=2), global_batch=8, **kw)  # 2: no_sync first
    assert one.buffers == 0 and two.buffers == pytest.approx(one.grads)


# ------------------------------------------------- a real training step, allocator-level

E2E = {  # overrides on the tiny model (vocab 512, seq 32, micro-batch 2, global batch 4)
    "pp2-vpp2-interleaved": ["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"],
    "pp2-gpipe-full-bf16": ["parallel.pp=2", "parallel.schedule=gpipe", "parallel.recompute=full",
                            "precision=bf16"],
    "zero3-selective": ["parallel.dp_shard=2", "parallel.zero.stage=3", "parallel.recompute=selective"],
    "tp2-sp": ["parallel.tp=2", "parallel.sp=true"],
}


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("case", list(E2E))
def test_predicts_a_real_steps_peak(case, monkeypatch):
    """Each pipeline rank of a 2-rank layout, in turn, on the fake group: the allocator's peak
    during a training step (profiler memory events), above what was live when the step
    began, against memory_per_rank's total above its model states. The fake group
    allocates nothing for collectives, as NCCL: backend="nccl"."""
    from torch.profiler import ProfilerActivity, profile

    from phalanx.config import validate
    from phalanx.data import open_tokens
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import prepare_corpus
    from phalanx.parallel import pipeline_trainer
    from phalanx.parallel.data_parallel import model_config
    from phalanx.parallel.mesh import Layout
    from phalanx.parallel.pipeline_trainer import PipelineTrainer

    # Received tensors are uninitialised on the fake group, so gradients may be NaN and the
    # step skipped (no optimizer states): report a finite norm so every step commits.
    clip = pipeline_trainer.clip_grad_norm_global_

    def finite_clip(params, max_norm, **kw):
        clip(params, max_norm, **kw)
        return torch.tensor(1.0)

    monkeypatch.setattr(pipeline_trainer, "clip_grad_norm_global_", finite_clip)

    run = validate(compose_recipe([
        "model=tiny", "model.vocab_size=512", "data=synthetic", "data.synthetic_tokens=20000",
        "trainer.seq_len=32", "parallel.micro_batch_size=2", "trainer.global_batch=4",
        *E2E[case], "--nproc-per-node", "2"]))
    p = run.parallel
    layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, vpp=p.vpp)
    cand = Candidate(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, vpp=p.vpp,
                     micro_batch_size=p.micro_batch_size, zero_stage=p.zero.stage,
                     recompute=p.recompute, sp=p.sp, schedule=p.schedule)
    predicted = memory_per_rank(model_config(run), cand, seq_len=run.trainer.seq_len,
                                global_batch=run.trainer.global_batch, backend="nccl",
                                dtypes=Dtypes.from_precision(run.precision.param, run.precision.compute))
    tokens = open_tokens(prepare_corpus(run))
    # One rank per pipeline rank: ranks that differ only in tp / dp hold the same.
    for rank in {layout.coords(r)["pp"]: r for r in range(2)}.values():
        # Profiled from construction on, so every free matches an allocation it saw; and
        # nothing allocated under an earlier profile may be freed under this one (the
        # allocator's reporter remembers it and would log a free this run never saw).
        gc.collect()
        with _fake_world(rank, 2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer = PipelineTrainer(run, rank=rank, layout=layout, tokens=tokens,
                                      device=torch.device("cpu"))
            trainer.train_step(0)
            with torch.profiler.record_function("measured_step"):
                trainer.train_step(1)
        events = prof.profiler.kineto_results.events()
        t0 = min(e.start_ns() for e in events if e.name() == "measured_step")
        live, start, peak = 0, None, 0
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            if start is None and e.start_ns() >= t0:
                start = live  # live bytes when the measured step began
            live += e.nbytes()
            if start is not None:
                peak = max(peak, live)
        del trainer, prof
        gc.collect()
        mine = predicted[layout.coords(rank)["pp"]]
        # At the step boundary: the model states (and a little else: token arrays, RoPE tables).
        assert mine.model_states == pytest.approx(start, rel=0.05)
        assert mine.total - mine.model_states == pytest.approx(peak - start, rel=0.10), (rank, mine)
