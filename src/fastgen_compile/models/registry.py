"""Which HF `model_type`s our model code serves, and how their configs map onto it."""

from __future__ import annotations

from dataclasses import replace

from fastgen_compile.errors import ModelLoadError
from fastgen_compile.models.llama import Llama, LlamaArgs, rope_inv_freq

# model_type -> whether q/k/v projections carry a bias regardless of the config's flag
LLAMA_FAMILY = {"llama": False, "mistral": False, "qwen2": True}


def supported() -> list[str]:
    return sorted(LLAMA_FAMILY)


def build_args(hf_config) -> LlamaArgs:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        arch = ", ".join(getattr(hf_config, "architectures", None) or []) or model_type
        raise ModelLoadError(f"unsupported architecture {arch!r} (model_type {model_type!r}); supported model types: {', '.join(supported())}")
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and getattr(hf_config, "use_sliding_window", True) and window < hf_config.max_position_embeddings:
        raise ModelLoadError(f"sliding-window attention (window {window}) is not supported yet")
    args = LlamaArgs.from_hf(hf_config)
    rope_inv_freq(args)  # an unsupported rope scaling fails here, at load time
    return replace(args, attention_bias=True) if LLAMA_FAMILY[model_type] else args


def build_model(hf_config) -> Llama:
    return Llama(build_args(hf_config))
