"""dtype="auto": bf16 where the CPU computes it natively, fp32 where it would be emulated; an explicit dtype is honoured."""

from __future__ import annotations

import pytest

from fastgen_compile import EngineConfig
from fastgen_compile.hardware import auto_dtype, cpu_flags


@pytest.mark.parametrize("flags, dtype", [
    ({"avx512f", "avx512_bf16"}, "bfloat16"), ({"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),
    ({"avx512f", "avx2"}, "float32"), (set(), "float32"),
])
def test_auto_dtype_follows_the_cpu_flags(flags, dtype):
    chosen, why = auto_dtype("cpu", frozenset(flags))
    assert chosen == dtype
    assert ("natively" in why) == (dtype == "bfloat16") and ("emulated" in why) == (dtype == "float32")


def test_the_config_resolves_auto_for_this_machine_and_says_why():
    config = EngineConfig()
    want = "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"
    assert config.dtype == want and config.dtype_reason == auto_dtype("cpu")[1]
    explicit = EngineConfig(dtype="float16")
    assert explicit.dtype == "float16" and explicit.dtype_reason == "as asked"
