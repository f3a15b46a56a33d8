"""One decoder for every supported family (Llama, Mistral, Qwen2, Phi-3, Mixtral, OPT), written as equations.

Families differ only in details that `ModelArgs` names: the norm (RMS or Layer, before or
after each block), the MLP (gated or not, its activation, dense experts), biases, and how
positions enter (rotary in the layer, or learned embeddings added to the input). Weights
live in plain modules with fused projections (one matmul for q/k/v, one for gate/up); the
per-layer math is a free function over tensors, so one compiled graph serves every layer:
weights are inputs, not constants baked into one graph per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastgen_compile.models.quantize import QuantizedWeight
from fastgen_compile.models.rope import RopeArgs

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeArgs | None  # None: learned positions (OPT)
    norm: str = "rms"  # or "layer" (LayerNorm with bias)
    pre_norm: bool = True  # False: norm after each residual add (OPT-350m)
    final_norm: bool = True
    activation: str = "silu"
    gated_mlp: bool = True  # act(gate) * up (SwiGLU); False: act(fc1)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # a query sees keys less than this many positions back
    num_experts: int = 0  # > 0: a mixture of experts MLP
    experts_per_token: int = 0
    embed_dim: int | None = None  # OPT's word_embed_proj_dim when it differs from hidden_size
    position_offset: int = 0  # learned positions: row of position p is p + offset (OPT: 2)
    vocab_shard: tuple[int, int] | None = None  # tensor parallelism: (first, count) of the vocabulary rows this rank's embed and lm_head hold

    @classmethod
    def from_json(cls, data: dict) -> ModelArgs:
        """`asdict(args)` read back from JSON: its lists as the tuples they were, the rope args as theirs."""
        fields = {name: _tuples(value) for name, value in data.items()}
        if data["rope"] is not None:
            fields["rope"] = RopeArgs(**{name: _tuples(value) for name, value in data["rope"].items()})
        return cls(**fields)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model runs; None: no limit of its own (dynamic NTK rope
        stretches its frequencies to any length, so max_model_len may go past the trained one)."""
        return None if self.rope is not None and self.rope.kind == "dynamic" else self.max_position_embeddings


def layer_shapes(a: ModelArgs) -> dict[str, tuple[int, ...] | None]:
    """Every layer weight and its shape; None: this family has no such weight."""
    h, qkv_out, attn_out = a.hidden_size, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim, a.num_heads * a.head_dim
    up = (2 if a.gated_mlp else 1) * a.intermediate_size
    layer_norm = a.norm == "layer"
    experts = (a.num_experts,) if a.num_experts else ()
    return {
        "attn_norm": (h,),
        "attn_norm_bias": (h,) if layer_norm else None,
        "wqkv": (qkv_out, h),
        "bqkv": (qkv_out,) if a.qkv_bias else None,
        "wo": (h, attn_out),
        "bo": (h,) if a.o_bias else None,
        "mlp_norm": (h,),
        "mlp_norm_bias": (h,) if layer_norm else None,
        "router": (a.num_experts, h) if a.num_experts else None,
        "w_up": (*experts, up, h),  # gated: gate rows, then up rows
        "b_up": (up,) if a.mlp_bias else None,
        "w_down": (*experts, h, a.intermediate_size),
        "b_down": (h,) if a.mlp_bias else None,
    }


def top_shapes(a: ModelArgs) -> dict[str, tuple[int, ...] | None]:
    h, e = a.hidden_size, a.embed_dim or a.hidden_size
    projected, vocab = e != h, a.vocab_shard[1] if a.vocab_shard else a.vocab_size
    return {
        "embed": (vocab, e),
        "pos_embed": (a.max_position_embeddings + a.position_offset, h) if a.rope is None else None,
        "project_in": (h, e) if projected else None,
        "norm": (h,) if a.final_norm else None,
        "norm_bias": (h,) if a.final_norm and a.norm == "layer" else None,
        "project_out": (e, h) if projected else None,
        "lm_head": None if a.tie_word_embeddings else (vocab, e),
    }


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: ModelArgs) -> torch.Tensor:
    if a.norm == "layer":
        return F.layer_norm(x, weight.shape, weight, bias, a.norm_eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + a.norm_eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (1, tokens, heads, head_dim); cos/sin: (tokens, 1, rotary_dim). Dims past rotary_dim pass through."""
    rot = cos.shape[-1]
    xr = x[..., :rot]
    rotated = torch.cat([-xr[..., rot // 2 :], xr[..., : rot // 2]], dim=-1)
    out = (xr.float() * cos + rotated.float() * sin).to(x.dtype)
    return out if rot == x.shape[-1] else torch.cat([out, x[..., rot:]], dim=-1)


# attend(q, k, v, kv_cache, slots, mask) -> (tokens, heads * head_dim): writes this step's k, v
# (1, tokens, kv_heads, head_dim) into the paged pool at slots, then attends q (1, tokens, heads,
# head_dim) over it; the pool's layout is the attention's business (attention.paged_attend)
AttendFn = Callable[..., torch.Tensor]
# linear(x, weight, bias) -> x @ weight.T + bias, weight a tensor or a QuantizedWeight: F.linear,
# or the kernel models/linears.py chose for this shape on this machine
LinearFn = Callable[[torch.Tensor, torch.Tensor | QuantizedWeight, torch.Tensor | None], torch.Tensor]
Weights = dict[str, torch.Tensor | QuantizedWeight | None]
LINEARS = ("wqkv", "wo", "w_up", "w_down")  # a layer's linear weights (2-D but for experts' stacked ones)
# tensor parallelism (models/shard.py, engine/parallel.py): reduce(x) sums a row-parallel output over
# the ranks; gather(x) concatenates every rank's x along the last dim (the lm_head's vocabulary shards)
Collective = Callable[[torch.Tensor], torch.Tensor]


def alone(x: torch.Tensor) -> torch.Tensor:
    """One rank holds the whole model: nothing to combine (traces to nothing)."""
    return x


def attention(
    x: torch.Tensor, w: Weights, kv_cache, cos, sin, slots, mask, a: ModelArgs, attend: AttendFn, linear: LinearFn, reduce: Collective = alone
) -> torch.Tensor:
    n, hq, hkv, d = x.shape[0], a.num_heads, a.num_kv_heads, a.head_dim
    # 4-D all the way: torch 2.13's CPU flex lowering fails on 3-D buffers viewed as 4-D
    qkv = linear(x, w["wqkv"], w["bqkv"]).view(1, n, hq + 2 * hkv, d)
    q, k = qkv[:, :, :hq], qkv[:, :, hq : hq + hkv]
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # attention runs in the pool's dtype (fp32 on CPU: see docs/architecture.md)
    out = attend(q, k, qkv[:, :, hq + hkv :], kv_cache, slots, mask)
    return reduce(linear(out.to(x.dtype), w["wo"], w["bo"]))


def mlp(x: torch.Tensor, w: Weights, a: ModelArgs, linear: LinearFn, reduce: Collective = alone) -> torch.Tensor:
    act = ACTIVATIONS[a.activation]
    up = linear(x, w["w_up"], w["b_up"])
    if a.gated_mlp:
        gate, up = up.chunk(2, dim=-1)
        up = act(gate) * up
    else:
        up = act(up)
    return reduce(linear(up, w["w_down"], w["b_down"]))


def experts(x: torch.Tensor, w: Weights, a: ModelArgs, reduce: Collective = alone) -> torch.Tensor:
    """Top-k mixture of experts at fixed shapes: every expert runs on every token and the
    router's renormalised top-k weights (zero elsewhere) mix them. No data-dependent
    control flow, so it compiles into the bucket's graph; the cost is num_experts / k
    times the FLOPs of routed dispatch (see docs/architecture.md)."""
    probs = F.linear(x, w["router"]).float().softmax(dim=-1)  # (tokens, experts)
    top, chosen = probs.topk(a.experts_per_token, dim=-1)
    mix = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(dim=-1, keepdim=True))
    up = torch.matmul(x, w["w_up"].transpose(1, 2))  # (experts, tokens, 2 * intermediate)
    gate, up = up.chunk(2, dim=-1)
    out = torch.matmul(ACTIVATIONS[a.activation](gate) * up, w["w_down"].transpose(1, 2))  # (experts, tokens, hidden)
    return reduce((out.float() * mix.t()[:, :, None]).sum(dim=0).to(x.dtype))


def decoder_layer(
    x: torch.Tensor,
    w: Weights,
    kv_cache,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    slots: torch.Tensor,
    mask,
    *,
    args: ModelArgs,
    attend: AttendFn,
    linear: LinearFn = F.linear,
    reduce: Collective = alone,
) -> torch.Tensor:
    """One block, x: (tokens, hidden). Pre-norm: x + Attn(Norm(x)), then + MLP(Norm(x));
    post-norm (OPT-350m): Norm(x + Attn(x)), then Norm(x + MLP(x))."""
    a = args
    h = norm(x, w["attn_norm"], w["attn_norm_bias"], a) if a.pre_norm else x
    x = x + attention(h, w, kv_cache, cos, sin, slots, mask, a, attend, linear, reduce)
    if not a.pre_norm:
        x = norm(x, w["attn_norm"], w["attn_norm_bias"], a)
    h = norm(x, w["mlp_norm"], w["mlp_norm_bias"], a) if a.pre_norm else x
    x = x + (experts(h, w, a, reduce) if a.num_experts else mlp(h, w, a, linear, reduce))
    return x if a.pre_norm else norm(x, w["mlp_norm"], w["mlp_norm_bias"], a)


def _parameters(module: nn.Module, shapes: dict[str, tuple[int, ...] | None]) -> None:
    for name, shape in shapes.items():
        module.register_parameter(name, None if shape is None else nn.Parameter(torch.empty(shape)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        _parameters(self, layer_shapes(args))
        self.quantized: dict[str, QuantizedWeight] = {}  # models/quantize.py

    def weights(self) -> Weights:
        return {**self._parameters, **self.quantized}


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        _parameters(self, top_shapes(args))
        if args.tie_word_embeddings:
            self.lm_head = self.embed
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.quantized: dict[str, QuantizedWeight] = {}  # the lm_head's, when quantized

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor, reduce: Collective = alone) -> torch.Tensor:
        if self.args.vocab_shard is None:
            x = self.embed[ids]
        else:  # this rank's rows, zeros for the others' tokens: the sum over ranks is the lookup
            first, count = self.args.vocab_shard
            local = ids - first
            held = (local >= 0) & (local < count)
            x = reduce(torch.where(held[:, None], self.embed[local.clamp(0, count - 1)], 0))
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        if self.pos_embed is not None:
            x = x + self.pos_embed[positions.long() + self.args.position_offset]
        return x

    def logits(self, hidden: torch.Tensor, linear: LinearFn = F.linear, gather: Collective = alone) -> torch.Tensor:
        """Final norm and lm_head on the rows to sample only (vocab is the biggest matmul)."""
        if self.norm is not None:
            hidden = norm(hidden, self.norm, self.norm_bias, self.args)
        if self.project_out is not None:
            hidden = F.linear(hidden, self.project_out)
        logits = linear(hidden, self.quantized.get("lm_head", self.lm_head), None)
        if self.args.vocab_shard is not None:  # every rank's vocabulary rows, less the padding past the vocabulary
            logits = gather(logits)[:, : self.args.vocab_size]
        return logits.float()
