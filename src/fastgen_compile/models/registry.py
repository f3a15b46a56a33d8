"""Supported families: `config.architectures` -> how the HF config maps onto ModelArgs, and
where each of our weights lives in the family's checkpoints (HF safetensors names, GGUF names)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fastgen_compile.errors import ModelLoadError
from fastgen_compile.models.decoder import ACTIVATIONS, ModelArgs
from fastgen_compile.models.rope import Rope, RopeArgs

# our weight -> checkpoint tensors, concatenated in this order (fused projections). In layer
# names "{e}" stands for an expert index: the tensors are gathered per expert, then stacked.
Names = dict[str, list[str]]


@dataclass(frozen=True)
class Family:
    name: str  # as the README lists it
    architectures: tuple[str, ...]  # config.architectures values
    model_type: str  # for configs without architectures (those read from GGUF)
    args: Callable[[object], ModelArgs]
    hf_layer_prefix: str  # "{i}": the layer index
    hf_layer: Names
    hf_top: Names
    gguf_layer: Names | None = None  # None: transformers reads no GGUF of this family
    gguf_top: Names | None = None
    gguf_rope_permuted: bool = False  # llama.cpp interleaves q/k rows for its rotary layout


def _window(cfg) -> int | None:
    """The sliding window, or None where it cannot bind (a window as long as the context changes nothing)."""
    window = getattr(cfg, "sliding_window", None)
    return window if window and window < cfg.max_position_embeddings else None


def _llama_args(cfg) -> ModelArgs:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelArgs(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope=RopeArgs.from_hf(cfg, head_dim),
        activation=getattr(cfg, "hidden_act", "silu"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        sliding_window=_window(cfg),
    )


def _qwen2_args(cfg) -> ModelArgs:
    args = replace(_llama_args(cfg), qkv_bias=True, o_bias=False)
    # use_sliding_window and max_window_layers become per-layer types: a window on all layers or none
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types == {"full_attention"}:
        return replace(args, sliding_window=None)
    if len(layer_types) > 1 and args.sliding_window:
        raise ModelLoadError(f"Qwen2 with a sliding window on some layers only (max_window_layers={cfg.max_window_layers}) is not supported")
    return args


def _mixtral_args(cfg) -> ModelArgs:
    return replace(_llama_args(cfg), num_experts=cfg.num_local_experts, experts_per_token=cfg.num_experts_per_tok)


def _opt_args(cfg) -> ModelArgs:
    if not cfg.layer_norm_elementwise_affine:
        raise ModelLoadError("OPT without LayerNorm weights (layer_norm_elementwise_affine=False) is not supported")
    return ModelArgs(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_dim,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        norm_eps=1e-5,  # torch's LayerNorm default, which OPT uses
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        rope=None,
        norm="layer",
        pre_norm=cfg.do_layer_norm_before,
        final_norm=cfg.do_layer_norm_before and not cfg._remove_final_layer_norm,
        activation=cfg.activation_function,
        gated_mlp=False,
        qkv_bias=cfg.enable_bias,
        o_bias=cfg.enable_bias,
        mlp_bias=cfg.enable_bias,
        embed_dim=cfg.word_embed_proj_dim,
        position_offset=2,
    )


LLAMA_HF_LAYER: Names = {
    "attn_norm": ["input_layernorm.weight"],
    "wqkv": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "bqkv": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "wo": ["self_attn.o_proj.weight"],
    "bo": ["self_attn.o_proj.bias"],
    "mlp_norm": ["post_attention_layernorm.weight"],
    "w_up": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "b_up": ["mlp.gate_proj.bias", "mlp.up_proj.bias"],
    "w_down": ["mlp.down_proj.weight"],
    "b_down": ["mlp.down_proj.bias"],
}
LLAMA_HF_TOP: Names = {"embed": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"], "lm_head": ["lm_head.weight"]}
LLAMA_GGUF_LAYER: Names = {
    "attn_norm": ["attn_norm.weight"],
    "wqkv": ["attn_q.weight", "attn_k.weight", "attn_v.weight"],
    "bqkv": ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
    "wo": ["attn_output.weight"],
    "bo": ["attn_output.bias"],
    "mlp_norm": ["ffn_norm.weight"],
    "w_up": ["ffn_gate.weight", "ffn_up.weight"],
    "w_down": ["ffn_down.weight"],
}
LLAMA_GGUF_TOP: Names = {"embed": ["token_embd.weight"], "norm": ["output_norm.weight"], "lm_head": ["output.weight"]}
LLAMA_LIKE = dict(hf_layer_prefix="model.layers.{i}.", hf_layer=LLAMA_HF_LAYER, hf_top=LLAMA_HF_TOP)
LLAMA_GGUF = dict(gguf_layer=LLAMA_GGUF_LAYER, gguf_top=LLAMA_GGUF_TOP)

FAMILIES = (
    Family("Llama / Llama 2 / Llama 3 / SmolLM2", ("LlamaForCausalLM",), "llama", _llama_args, **LLAMA_LIKE, **LLAMA_GGUF, gguf_rope_permuted=True),
    Family("Mistral", ("MistralForCausalLM",), "mistral", _llama_args, **LLAMA_LIKE, **LLAMA_GGUF, gguf_rope_permuted=True),
    Family("Qwen2", ("Qwen2ForCausalLM",), "qwen2", _qwen2_args, **LLAMA_LIKE, **LLAMA_GGUF),
    Family(
        "Phi-3",
        ("Phi3ForCausalLM",),
        "phi3",
        _llama_args,
        hf_layer_prefix="model.layers.{i}.",
        hf_layer=LLAMA_HF_LAYER | {"wqkv": ["self_attn.qkv_proj.weight"], "w_up": ["mlp.gate_up_proj.weight"]},
        hf_top=LLAMA_HF_TOP,
        gguf_layer=LLAMA_GGUF_LAYER | {"wqkv": ["attn_qkv.weight"], "w_up": ["ffn_up.weight"]},
        gguf_top=LLAMA_GGUF_TOP,
    ),
    Family(
        "Mixtral",
        ("MixtralForCausalLM",),
        "mixtral",
        _mixtral_args,
        hf_layer_prefix="model.layers.{i}.",
        hf_layer=LLAMA_HF_LAYER
        | {
            "router": ["block_sparse_moe.gate.weight"],
            "w_up": ["block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"],
            "w_down": ["block_sparse_moe.experts.{e}.w2.weight"],
        },
        hf_top=LLAMA_HF_TOP,
    ),
    Family(
        "OPT",
        ("OPTForCausalLM",),
        "opt",
        _opt_args,
        hf_layer_prefix="model.decoder.layers.{i}.",
        hf_layer={
            "attn_norm": ["self_attn_layer_norm.weight"],
            "attn_norm_bias": ["self_attn_layer_norm.bias"],
            "wqkv": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            "bqkv": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
            "wo": ["self_attn.out_proj.weight"],
            "bo": ["self_attn.out_proj.bias"],
            "mlp_norm": ["final_layer_norm.weight"],
            "mlp_norm_bias": ["final_layer_norm.bias"],
            "w_up": ["fc1.weight"],
            "b_up": ["fc1.bias"],
            "w_down": ["fc2.weight"],
            "b_down": ["fc2.bias"],
        },
        hf_top={
            "embed": ["model.decoder.embed_tokens.weight"],
            "pos_embed": ["model.decoder.embed_positions.weight"],
            "project_in": ["model.decoder.project_in.weight"],
            "norm": ["model.decoder.final_layer_norm.weight"],
            "norm_bias": ["model.decoder.final_layer_norm.bias"],
            "project_out": ["model.decoder.project_out.weight"],
            "lm_head": ["lm_head.weight"],
        },
    ),
)


def supported() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.architectures)


def family_of(hf_config) -> Family:
    archs = getattr(hf_config, "architectures", None) or []
    model_type = getattr(hf_config, "model_type", None)
    for f in FAMILIES:
        if set(archs) & set(f.architectures) or (not archs and model_type == f.model_type):
            return f
    named = ", ".join(archs) or f"model_type {model_type!r}"
    raise ModelLoadError(f"unsupported architecture {named}; supported architectures: {', '.join(supported())}")


def resolve(hf_config) -> tuple[Family, ModelArgs]:
    """The family and our arguments for a config; what we cannot run fails here, at load time."""
    family = family_of(hf_config)
    args = family.args(hf_config)
    if args.activation not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported activation {args.activation!r}; supported: {', '.join(ACTIVATIONS)}")
    if args.rope is not None:
        Rope(args.rope, torch.device("cpu"))
    return family, args
