"""fastgen-compile: Dynamic SplitFuse serving as a torch.compile graph engine.

The top level imports lazily: `from fastgen_compile import SamplingParams` (the request types
and errors) needs no torch, so a client process does not pay for it; LLM and the rest load the
engine on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "SamplingParams": "fastgen_compile.request",
    "RequestOutput": "fastgen_compile.request",
    "FastGenError": "fastgen_compile.errors",
    "ConfigError": "fastgen_compile.errors",
    "ModelLoadError": "fastgen_compile.errors",
    "RequestError": "fastgen_compile.errors",
    "EngineDied": "fastgen_compile.errors",
    "EngineConfig": "fastgen_compile.config",
    "LLM": "fastgen_compile.entrypoints.llm",
    "Pipeline": "fastgen_compile.entrypoints.llm",
    "pipeline": "fastgen_compile.entrypoints.llm",
    "AsyncLLM": "fastgen_compile.entrypoints.async_llm",
    "ServerError": "fastgen_compile.errors",
    "client": "fastgen_compile.grpc_client",
}
__all__ = [  # noqa: F822 - resolved by __getattr__
    "LLM", "AsyncLLM", "ConfigError", "EngineConfig", "EngineDied", "FastGenError", "ModelLoadError",
    "Pipeline", "RequestError", "RequestOutput", "SamplingParams", "ServerError", "client", "pipeline",
]

if TYPE_CHECKING:
    from fastgen_compile.config import EngineConfig
    from fastgen_compile.entrypoints.async_llm import AsyncLLM
    from fastgen_compile.entrypoints.llm import LLM, Pipeline, pipeline
    from fastgen_compile.errors import ConfigError, EngineDied, FastGenError, ModelLoadError, RequestError, ServerError
    from fastgen_compile.grpc_client import client
    from fastgen_compile.request import RequestOutput, SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastgen_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
