"""Our own CPU kernels (C++), built on first use and kept beside the compiled graphs.

`paged_decode.cpp` registers `torch.ops.fastgen.paged_decode`. It is built with the compiler
inductor already needs on CPU, straight to a shared library (no Python module, so one build
serves every Python of a torch version), cached under `<graphs root>/kernels/` by a hash of
its source, flags and torch version, and loaded into torch's op registry. Where it cannot be
built the engine keeps FlexAttention for decode rows and says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch
from torch.utils import cpp_extension

from fastgen_compile.artifacts import sha256
from fastgen_compile.progress import progress_bar

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.cpp")
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_loaded: bool | None = None  # this process: None not tried, else whether the op is registered
_lock = threading.Lock()  # engines made on several threads build and register it once


def paged_decode_fits(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel serves this model (before building it): CPU, fp32 or bf16 weights (its
    pool keeps the model's dtype), head_dim 16 to 128 in powers of two (one register block per head)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim in (16, 32, 64, 128)


def key_stride(page_size: int) -> int:
    """Length of a page's transposed key rows in the decode pool: page_size up to a whole number
    of vectors (16 floats on AVX-512, the widest we build for)."""
    return -(-page_size // 16) * 16


def paged_decode_available(root: Path) -> bool:
    """Build (once per source, flags and torch version) and load the paged-decode op."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                torch.ops.load_library(str(_build(root)))
                _register_fake()
                _loaded = True
            except (OSError, subprocess.CalledProcessError) as e:
                detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
                log.warning("CPU paged-decode kernel unavailable, decode rows use FlexAttention: %s", detail)
                _loaded = False
        return _loaded


def _flags() -> list[str]:
    isa = torch.backends.cpu.get_cpu_capability()
    isa = isa if isa in ISA_FLAGS else "DEFAULT"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    return [
        *("-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"),
        *(f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"),
        *ISA_FLAGS.get(isa, []),
        *includes,
        *libs,
        *("-lc10", "-ltorch_cpu"),
    ]


def _build(root: Path) -> Path:
    compiler, flags = os.environ.get("CXX", "g++"), _flags()
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *flags, torch.__version__]).encode()).hexdigest()[:16]
    target = root / "kernels" / f"paged_decode-{digest}.so"
    checksum = target.with_suffix(".sha256")
    # loading a damaged library kills the process (SIGBUS), so one is loaded only if its
    # checksum, written after the build, still matches
    if target.is_file() and checksum.is_file() and checksum.read_text() == sha256(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    with progress_bar("building") as bar:
        task = bar.add_task("the CPU paged-decode kernel (once per torch version)", total=1)
        subprocess.run([compiler, str(SOURCE), "-o", str(partial), *flags], check=True, capture_output=True, text=True)
        bar.advance(task)
    partial.replace(target)  # atomic: a concurrent engine never loads half a library
    checksum.write_text(sha256(target))
    return target


def _register_fake() -> None:
    @torch.library.register_fake("fastgen::paged_decode")
    def _(q, k_pages, v_pages, page_table, context_lens, page_size, window, scale):
        return torch.empty_like(q)
