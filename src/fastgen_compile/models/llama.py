"""Llama-architecture decoder (Llama, Llama-2/3, Mistral, Qwen2, SmolLM2), written as equations.

Weights live in plain modules (fused QKV and gate/up, so each projection is one matmul);
the per-layer math is a free function over tensors, so one compiled graph serves every
layer: weights are inputs, not constants baked into 30 separate graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastgen_compile.errors import ModelLoadError


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg) -> LlamaArgs:
        heads = cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=None if kind == "default" else tuple(sorted(scaling.items())),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
        )


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the config's scaling rule."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.rope_scaling is None:
        return inv_freq
    s = dict(args.rope_scaling)
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, smoothed, scaled)
    raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def rope_table(args: LlamaArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_positions, head_dim), in fp32, the rotate-half layout."""
    pos = torch.arange(args.max_position_embeddings, dtype=torch.float64)
    freqs = torch.outer(pos, rope_inv_freq(args))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (1, tokens, heads, head_dim); cos/sin: (tokens, 1, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# attend(q, k_cache, v_cache, mask) -> (tokens, heads * head_dim); q: (1, tokens, heads, head_dim),
# caches: (1, slots, kv_heads, head_dim)
AttendFn = Callable[..., torch.Tensor]


def decoder_layer(
    x: torch.Tensor,
    attn_norm: torch.Tensor,
    wqkv: torch.Tensor,
    bqkv: torch.Tensor | None,
    wo: torch.Tensor,
    mlp_norm: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    mask,
    *,
    args: LlamaArgs,
    attend: AttendFn,
) -> torch.Tensor:
    """One pre-norm block: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x)).

    x: (tokens, hidden). New keys/values are written into the paged pool at `slots`
    before attention, so a token attends to its own sequence's past and itself.
    """
    n, hq, hkv, d = x.shape[0], args.num_heads, args.num_kv_heads, args.head_dim
    qkv = F.linear(rms_norm(x, attn_norm, args.rms_norm_eps), wqkv, bqkv)
    # 4-D all the way: torch 2.13's CPU flex lowering fails on 3-D buffers viewed as 4-D
    qkv = qkv.view(1, n, hq + 2 * hkv, d)
    q = apply_rope(qkv[:, :, :hq], cos, sin)
    k = apply_rope(qkv[:, :, hq : hq + hkv], cos, sin)
    kv_dtype = k_cache.dtype  # attention runs in the pool's dtype (fp32 on CPU: see docs/architecture.md)
    k_cache.index_copy_(1, slots, k.to(kv_dtype))
    v_cache.index_copy_(1, slots, qkv[:, :, hq + hkv :].to(kv_dtype))
    attn = attend(q.to(kv_dtype), k_cache, v_cache, mask)
    x = x + F.linear(attn.to(x.dtype), wo)
    gate, up = F.linear(rms_norm(x, mlp_norm, args.rms_norm_eps), w_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w_down)


class LlamaLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        qkv_out = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        self.attn_norm = nn.Parameter(torch.empty(args.hidden_size))
        self.wqkv = nn.Parameter(torch.empty(qkv_out, args.hidden_size))
        self.bqkv = nn.Parameter(torch.empty(qkv_out)) if args.attention_bias else None
        self.wo = nn.Parameter(torch.empty(args.hidden_size, args.num_heads * args.head_dim))
        self.mlp_norm = nn.Parameter(torch.empty(args.hidden_size))
        self.w_gate_up = nn.Parameter(torch.empty(2 * args.intermediate_size, args.hidden_size))
        self.w_down = nn.Parameter(torch.empty(args.hidden_size, args.intermediate_size))

    def weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.attn_norm, self.wqkv, self.bqkv, self.wo, self.mlp_norm, self.w_gate_up, self.w_down)


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(LlamaLayer(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.empty(args.hidden_size))
        self.lm_head = self.embed if args.tie_word_embeddings else nn.Parameter(torch.empty(args.vocab_size, args.hidden_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows to sample only (vocab is the biggest matmul)."""
        return F.linear(rms_norm(hidden, self.norm, self.args.rms_norm_eps), self.lm_head).float()
