"""fastgen-compile: Dynamic SplitFuse serving as a torch.compile graph engine."""

from fastgen_compile.api import LLM, EngineDied, Pipeline, pipeline
from fastgen_compile.config import EngineConfig
from fastgen_compile.errors import ConfigError, FastGenError, ModelLoadError, RequestError
from fastgen_compile.sampling import SamplingParams
from fastgen_compile.sequence import RequestOutput

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "ConfigError",
    "EngineConfig",
    "EngineDied",
    "FastGenError",
    "ModelLoadError",
    "Pipeline",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "pipeline",
]
