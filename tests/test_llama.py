"""Tests for the Llama model: HF naming and parity, stage cuts, init, counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from phalanx.models import LlamaConfig, LlamaForCausalLM, flops_per_token, num_params

TINY = LlamaConfig(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500000.0,
)
TINY_TIED = dataclasses.replace(TINY, tie_word_embeddings=True)

LLAMA_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)


def _build(config: LlamaConfig, seed: int = 0, **kwargs) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, **kwargs)
    model.init_weights(seed)
    return model.eval()


def _tokens(
    config: LlamaConfig, batch: int = 2, seq: int = 16, seed: int = 1
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g)


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


@pytest.mark.parametrize("config", [TINY, TINY_TIED], ids=["untied", "tied"])
def test_state_dict_matches_hf_names_and_num_params(config: LlamaConfig) -> None:
    model = LlamaForCausalLM(config)
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert got == _expected_shapes(config)
    assert num_params(config) == sum(p.numel() for p in model.parameters())
    v_h = config.vocab_size * config.hidden_size
    assert num_params(config, include_embedding=False) == num_params(config) - v_h


def test_stage_keeps_global_layer_names() -> None:
    stage = LlamaForCausalLM(TINY, layer_ids=[2, 3], has_embedding=False)
    full = _expected_shapes(TINY)
    expected = {
        k: s
        for k, s in full.items()
        if k.startswith(
            ("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head.")
        )
    }
    assert {k: tuple(t.shape) for k, t in stage.state_dict().items()} == expected


def _hf_model(transformers, config: LlamaConfig, attn_implementation: str):
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attn_implementation=attn_implementation,
    )
    return transformers.LlamaForCausalLM(hf_config).to(torch.float32).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_hugging_face(attn_implementation: str) -> None:
    transformers = pytest.importorskip("transformers")
    ours = _build(TINY, seed=3)
    hf = _hf_model(transformers, TINY, attn_implementation)
    hf.load_state_dict(ours.state_dict(), strict=True)
    tokens = _tokens(TINY, seq=32)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tied_logits_match_hugging_face() -> None:
    transformers = pytest.importorskip("transformers")
    ours = _build(TINY_TIED, seed=4)
    hf = _hf_model(transformers, TINY_TIED, "sdpa")
    # HF registers the tied head under its own name; our state dict omits it.
    result = hf.load_state_dict(ours.state_dict(), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"}
    assert not result.unexpected_keys
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = _tokens(TINY_TIED)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens), hf(input_ids=tokens).logits, rtol=1e-5, atol=1e-5
        )


def test_stages_chain_to_full_model() -> None:
    full = _build(TINY, seed=7)
    stage_a = _build(TINY, seed=7, layer_ids=[0, 1], has_head=False)
    stage_b = _build(TINY, seed=7, layer_ids=[2, 3], has_embedding=False)
    for name, tensor in [*stage_a.state_dict().items(), *stage_b.state_dict().items()]:
        assert torch.equal(tensor, full.state_dict()[name]), name
    tokens = _tokens(TINY)
    with torch.no_grad():
        hidden = stage_a(tokens)
        assert hidden.shape == (*tokens.shape, TINY.hidden_size)
        torch.testing.assert_close(stage_b(hidden), full(tokens), rtol=0, atol=1e-6)


def test_causal() -> None:
    model = _build(TINY)
    tokens = _tokens(TINY, batch=1, seq=16)
    t = 9
    changed = tokens.clone()
    changed[0, t] = (tokens[0, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_counts() -> None:
    assert num_params(LLAMA_7B) == 6_738_415_616

    c = TINY
    h, i, v, layers = (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_hidden_layers,
    )
    kv = c.num_key_value_heads * c.head_dim
    matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + v * h
    assert flops_per_token(c, 32) == 6 * matmul + 12 * layers * h * 32
    # The tied head still does its matmul.
    assert flops_per_token(TINY_TIED, 32) == flops_per_token(c, 32)
    # 7B at 2k context: 6 * 6_607_077_376 matmul weights + 12 * 32 * 4096 * 2048.
    assert flops_per_token(LLAMA_7B, 2048) == 42_863_689_728


def test_seeded_init_reproducible() -> None:
    a, b, c = _build(TINY, seed=11), _build(TINY, seed=11), _build(TINY, seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(sa[name], sc[name]), name

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d, e = LlamaForCausalLM(TINY), LlamaForCausalLM(TINY)
    d.init_weights(g1)
    e.init_weights(g2)
    for name, tensor in d.state_dict().items():
        assert torch.equal(tensor, e.state_dict()[name]), name


def test_init_std_scaling() -> None:
    config = dataclasses.replace(TINY, hidden_size=128, intermediate_size=512)
    model = _build(config)
    layer = model.model.layers["0"]
    std = config.init_std
    residual = std / (2 * config.num_hidden_layers) ** 0.5
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(
        residual, rel=0.1
    )
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))


def test_meta_construction_then_init_matches() -> None:
    with torch.device("meta"):
        model = LlamaForCausalLM(TINY)
    model.to_empty(device="cpu")
    model.init_weights(21)
    reference = _build(TINY, seed=21)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    tokens = _tokens(TINY)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(tokens), reference(tokens), rtol=0, atol=0
        )


def test_bf16_forward_backward() -> None:
    model = _build(TINY).to(torch.bfloat16).train()
    logits = model(_tokens(TINY))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("changes", "kwargs"),
    [
        ({"num_attention_heads": 3}, {}),
        ({"num_key_value_heads": 3}, {}),
        ({"tie_word_embeddings": True}, {"has_head": False}),
        ({"tie_word_embeddings": True}, {"has_embedding": False}),
        ({}, {"layer_ids": [1, 0]}),
        ({}, {"layer_ids": [4]}),
    ],
)
def test_constructor_rejects(changes: dict, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LlamaForCausalLM(dataclasses.replace(TINY, **changes), **kwargs)


def test_too_long_sequence_rejected() -> None:
    model = _build(TINY)
    with pytest.raises(ValueError):
        model(torch.zeros(1, TINY.max_position_embeddings + 1, dtype=torch.long))
