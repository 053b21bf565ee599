"""Llama-style decoder-only language model, cuttable into pipeline stages.

Numerics and parameter names follow Hugging Face ``LlamaForCausalLM`` so that
state dicts move between the two without renaming: RMSNorm in fp32, RoPE in the
rotate-half convention, SwiGLU MLP, grouped-query attention, no biases.

A ``LlamaForCausalLM`` may hold any strictly increasing subset of the decoder
layers, with or without the embedding and the head. Layers keep their global
index in parameter names (``model.layers.5.mlp.up_proj.weight``), and
``init_weights(seed)`` draws each layer from its own generator, so any cut of
the model built with one seed holds the same weights as the whole model.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "flops_per_token",
    "num_params",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyperparameters; field names match ``transformers.LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _check_shapes(config: LlamaConfig) -> None:
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be divisible by "
            f"num_attention_heads ({config.num_attention_heads})"
        )
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics keep bf16 training stable; the cast back happens
        # before the weight multiply exactly as in HF, for bitwise parity.
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


def _rope_tables(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # Always computed on CPU in fp32 so the tables do not depend on where the
    # module lives or was built (meta device included).
    d = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    )
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables; non-persistent so they never enter a checkpoint."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        cos, sin = _rope_tables(config)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        # Buffers are garbage after meta-device construction + ``to_empty``.
        cos, sin = _rope_tables(self.config)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(
        self, seq_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds "
                f"max_position_embeddings {self.cos.shape[0]}"
            )
        return self.cos[:seq_len].to(dtype), self.sin[:seq_len].to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)

        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        # Query head j reads kv head j // n_rep, the HF repeat_kv grouping that
        # checkpoints are trained with.
        n_rep = self.num_heads // self.num_kv_heads
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)

        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The ``model.`` prefix of HF names: embedding, layers, final norm.

    ``embed_tokens`` and ``norm`` are ``None`` in stages that do not own them.
    """

    def __init__(
        self,
        config: LlamaConfig,
        layer_ids: Sequence[int],
        *,
        has_embedding: bool,
        has_norm: bool,
    ) -> None:
        super().__init__()
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size)
            if has_embedding
            else None
        )
        # Keyed by global index so a stage's parameter names match the full model's.
        self.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(config, i) for i in layer_ids}
        )
        self.norm = (
            RMSNorm(config.hidden_size, config.rms_norm_eps) if has_norm else None
        )
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, x: torch.Tensor, *, embed: bool = True, norm: bool = True) -> torch.Tensor:
        h = self.embed_tokens(x) if embed and self.embed_tokens is not None else x
        cos, sin = self.rotary_emb(h.shape[1], h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if norm and self.norm is not None:
            h = self.norm(h)
        return h


def _derive_seed(base_seed: int, tag: str) -> int:
    # A hash rather than base + index so that nearby base seeds do not yield
    # overlapping streams across layers.
    digest = hashlib.blake2b(f"{base_seed}/{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _fill_normal_(param: torch.Tensor, std: float, generator: torch.Generator) -> None:
    # Drawn in fp32 on CPU, then copied: the weights are then identical
    # whatever the parameter's device or dtype, at the cost of a host buffer
    # the size of one parameter.
    values = torch.empty(param.shape, dtype=torch.float32).normal_(
        0.0, std, generator=generator
    )
    with torch.no_grad():
        param.copy_(values)


class LlamaForCausalLM(nn.Module):
    """A whole Llama model, or one pipeline stage of it.

    ``forward`` takes token ids ``[b, s]`` when ``has_embedding`` else hidden
    states ``[b, s, hidden]``, and returns logits ``[b, s, vocab]`` when
    ``has_head`` (final norm + ``lm_head``) else hidden states. Construction
    leaves PyTorch's default init in place; call ``init_weights`` for the
    reproducible one.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        layer_ids: Sequence[int] | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
    ) -> None:
        super().__init__()
        _check_shapes(config)
        ids = (
            list(range(config.num_hidden_layers))
            if layer_ids is None
            else list(layer_ids)
        )
        if any(not 0 <= i < config.num_hidden_layers for i in ids):
            raise ValueError(
                f"layer_ids {ids} out of range [0, {config.num_hidden_layers})"
            )
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise ValueError(f"layer_ids must be strictly increasing, got {ids}")
        if config.tie_word_embeddings and not (has_embedding and has_head):
            raise ValueError(
                "tie_word_embeddings needs the embedding and the head in one module"
            )

        self.config = config
        self.layer_ids = tuple(ids)
        self.has_embedding = has_embedding
        self.has_head = has_head
        self.model = LlamaModel(
            config, ids, has_embedding=has_embedding, has_norm=has_head
        )
        # When tied there is no separate lm_head module, which keeps
        # ``lm_head.weight`` out of the state dict as HF checkpoints do.
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if has_head and not config.tie_word_embeddings
            else None
        )

    def forward(self, x: torch.Tensor, *, first: bool | None = None,
                last: bool | None = None) -> torch.Tensor:
        """`first` / `last`: whether this stage starts / ends the micro-batch's route (None:
        as built). A stage that holds an embedding or head it does not use on this route
        (CheckFree+'s swapped routes, where they are mirrors) passes hidden states through."""
        first = self.has_embedding if first is None else first
        last = self.has_head if last is None else last
        if first and not self.has_embedding:
            raise ValueError(f"stage of layers {list(self.layer_ids)} starts a route but holds "
                             "no embedding")
        if last and not self.has_head:
            raise ValueError(f"stage of layers {list(self.layer_ids)} ends a route but holds "
                             "no head")
        h = self.model(x, embed=first, norm=last)
        if not last:
            return h
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def init_weights(self, seed: int | torch.Generator | None = None) -> None:
        """Deterministic init: N(0, init_std), residual projections scaled down.

        ``o_proj`` and ``down_proj`` use ``init_std / sqrt(2 * num_hidden_layers)``
        (GPT-2/Megatron) so the residual stream's variance does not grow with
        depth; norms are 1. Each component draws from its own generator seeded
        from (base seed, component name), so a stage gets the same weights as
        the same layers in the whole model.

        ``seed`` is the base seed; a ``torch.Generator`` supplies it by one
        draw; ``None`` draws it from torch's global RNG. Also refills the RoPE
        tables, so this is the whole init after meta-device construction and
        ``to_empty``.
        """
        if isinstance(seed, torch.Generator):
            base = int(
                torch.randint(0, 2**62, (1,), generator=seed, device=seed.device).item()
            )
        elif seed is None:
            base = int(torch.randint(0, 2**62, (1,)).item())
        else:
            base = int(seed)

        cfg = self.config
        std = cfg.init_std
        residual_std = std / math.sqrt(2 * cfg.num_hidden_layers)

        def generator(tag: str) -> torch.Generator:
            return torch.Generator().manual_seed(_derive_seed(base, tag))

        if self.model.embed_tokens is not None:
            _fill_normal_(
                self.model.embed_tokens.weight, std, generator("embed_tokens")
            )
        for key, layer in self.model.layers.items():
            g = generator(f"layers.{key}")
            attn, mlp = layer.self_attn, layer.mlp
            # Fixed draw order: changing it changes the weights of every seed.
            _fill_normal_(attn.q_proj.weight, std, g)
            _fill_normal_(attn.k_proj.weight, std, g)
            _fill_normal_(attn.v_proj.weight, std, g)
            _fill_normal_(attn.o_proj.weight, residual_std, g)
            _fill_normal_(mlp.gate_proj.weight, std, g)
            _fill_normal_(mlp.up_proj.weight, std, g)
            _fill_normal_(mlp.down_proj.weight, residual_std, g)
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
        if self.model.norm is not None:
            self.model.norm.reset_parameters()
        if self.lm_head is not None:
            _fill_normal_(self.lm_head.weight, std, generator("lm_head"))
        self.model.rotary_emb.reset_parameters()


def _layer_matmul_params(config: LlamaConfig) -> int:
    h = config.hidden_size
    kv = config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * config.intermediate_size
    return attn + mlp


def num_params(config: LlamaConfig, *, include_embedding: bool = True) -> int:
    """Exact parameter count of the whole model, a tied matrix counted once.

    ``include_embedding=False`` drops the token-embedding matrix; in a tied
    model that matrix is also the head, so neither is counted.
    """
    h, v = config.hidden_size, config.vocab_size
    per_layer = _layer_matmul_params(config) + 2 * h
    total = config.num_hidden_layers * per_layer + h
    total += v * h  # the embedding, or the one shared matrix when tied
    if not config.tie_word_embeddings:
        total += v * h
    if not include_embedding:
        total -= v * h
    return total


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), Kaplan/PaLM convention.

    ``6 * N + 12 * num_hidden_layers * hidden_size * seq_len`` where N counts
    the weights of every matmul: all attention and MLP projections and the
    ``lm_head`` (counted even when tied, since the logits matmul still runs).
    The embedding lookup and norms do no matmul and are excluded. The second
    term is QK^T and attention-times-V; it is not halved for causal masking
    (PaLM's convention), so MFU from this is comparable to published numbers.
    """
    n = config.num_hidden_layers * _layer_matmul_params(config)
    n += config.vocab_size * config.hidden_size
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(6 * n + attn)
