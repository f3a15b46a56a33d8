"""What the machine at hand does well: the CPU's flags, and the compute dtype chosen from them.

The same engine lands on CPUs where bf16 matmuls run ~5x faster than fp32 (avx512_bf16, AMX)
and on CPUs where they run several times slower (emulated); a default right on one is wrong
on the other, so `dtype="auto"` asks the hardware.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what decides our kernels' speed


@cache
def cpu_flags() -> frozenset[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine(device: str = "cpu") -> str:
    """The machine a figure was measured on, in words: the CPU model, cores and the flags that
    matter (a GPU's name, for a CUDA device)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    flags = cpu_flags()
    has = [f for f in SPEED_FLAGS if f in flags]
    lacks = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    return f"{model}, {torch.get_num_threads()} threads, {' '.join(has) or 'no AVX2'}" + (f" (no {', '.join(lacks)})" if lacks else "")


def auto_dtype(device: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(dtype, why) for the device; flags: the CPU's (default: this one's)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(dev)} computes bf16 natively"
        return "float16", f"{torch.cuda.get_device_name(dev)} has no bf16"
    if dev.type != "cpu":
        return "float32", f"no rule for {dev.type} devices: float32"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU has {' and '.join(native)}: bf16 matmuls run natively"
    return "float32", "this CPU has neither avx512_bf16 nor AMX: bf16 matmuls would be emulated, slower than float32"


def resolve_dtype(dtype: str, device: str) -> str:
    """An explicit dtype as given; "auto" as auto_dtype chooses."""
    return auto_dtype(device)[0] if dtype == "auto" else dtype
