"""EngineConfig: every knob of the engine, validated once."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch

from fastgen_compile.engine.batch import BITS
from fastgen_compile.engine.scheduler import POLICIES
from fastgen_compile.errors import ConfigError
from fastgen_compile.hardware import auto_dtype
from fastgen_compile.models.linears import KERNELS
from fastgen_compile.models.quantize import METHODS

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def knob(default, help: str, **flag):
    """An EngineConfig field that is also a command-line flag (--name-with-dashes) of every
    command that builds an engine; flag: extra argparse arguments (type, nargs, choices), and
    aliases: more option strings for it."""
    return field(default=default, metadata={"help": help, "flag": flag})


# measured on an AVX2-only EPYC: pages of 8 give wrong decode attention once compiled, 16 is exact
MIN_CPU_COMPILED_PAGE = 16


@dataclass
class EngineConfig:
    model: str | None = knob(None, "HF folder (config.json + *.safetensors) or .gguf file; default: the embedded SmolLM2-135M-Instruct")
    dtype: str = knob("auto", "compute (weight) dtype; auto: what this hardware does well (hardware.auto_dtype)", choices=["auto", *sorted(DTYPES)])
    device: str = knob("cpu", "torch device, e.g. cuda")
    tensor_parallel_size: int = knob(1, "processes the model is sharded over (tensor parallelism, engine/parallel.py): this one and N-1 workers "
                                        "it starts; on CUDA one GPU each", type=int, aliases=["--tensor-parallel"])
    # every bucket starts with `decode_rows` rows for decode tokens (buckets below it hold only
    # those: quick steps for a few decodes); the rest take prompt chunks
    buckets: tuple[int, ...] = knob((1, 2, 4, 8, 32, 96, 288), "row counts the forward pass is compiled for; the largest is the SplitFuse token budget",
                                    type=int, nargs="+")
    decode_rows: int = knob(32, "rows for decode tokens in every bucket, also the most decodes per step; 0: decodes share the prompt rows", type=int)
    page_size: int = knob(64, "KV slots per page, also the attention kv block", type=int)
    q_block: int = knob(32, "prompt rows per block-mask row (decode rows always use 1)", type=int)
    kv_dtype: str | None = knob(None, "KV pool and attention dtype; default float32 on CPU, else the weight dtype", choices=sorted(DTYPES))
    max_seqs: int = knob(64, "sequences in one forward pass", type=int)
    max_model_len: int | None = knob(None, "longest prompt + output; default: the model's context length", type=int)
    kv_pages: int | None = knob(None, "KV pool size in pages; default: kv_memory_fraction of free memory", type=int)
    kv_bytes: int | None = knob(None, "KV pool size in bytes, if kv_pages is not given", type=int)
    kv_memory_fraction: float = knob(0.1, "share of free memory for the KV pool, if neither kv_pages nor kv_bytes is given", type=float)
    policy: str = knob("splitfuse", "scheduling policy", choices=POLICIES)
    itl_target_ms: float | None = knob(None, "SplitFuse: while decodes run, each step's prompt chunk is sized so its predicted time stays within "
                                             "this (step costs measured at warmup, engine/step_costs.py); default: the curve's knee, the smallest "
                                             "chunk with 0.9 of the best prompt throughput; 0: every step may fill the largest bucket "
                                             "(a fixed budget)", type=float)
    prompt_rate: float = knob(512.0, "prompt tokens/s owed to each prompt from its arrival (the paper's SLA): a prompt that would miss "
                                     "that deadline under the ITL cap gets a larger step if one still makes it, and while every prompt is on time "
                                     "steps are no larger than that needs; 0: no deadline", type=float)
    prefix_caching: bool = knob(True, "reuse the KV pages of a prompt's leading full pages when an earlier request computed them "
                                      "(engine/pages.py); sliding-window models never do")
    quantization: str = knob("auto", "weight-only quantization of the linears and lm_head (CPU): int4 (groups of 32), int8 (per channel), "
                                     "none; auto: as the checkpoint stores them (a Q4_1 GGUF: int4), else none",
                             choices=["auto", "none", *METHODS])
    linear_kernel: str = knob("auto", "how linears are computed; auto: the fastest measured per weight shape and bucket at warmup "
                                      "(models/linears.py), else that kernel wherever it applies", choices=["auto", *KERNELS])
    layers_per_graph: int = knob(3, "decoder layers in one compiled call (the largest divisor of the layer count up to this): fewer calls, "
                                    "less Python per step, longer compiles", type=int)
    decode_kernel: bool = knob(True, "CPU: decode rows attend through kernels/paged_decode.cpp, not FlexAttention")
    compile: bool = knob(True, "compile the model (off: run it eagerly, for debugging)")
    warmup: bool = knob(True, "compile every bucket at start (off: each on first use)")
    graphs_dir: str | None = knob(None, "where compiled graphs (and prepared GGUF copies) persist, one folder per key; "
                                        "default: $FASTGEN_GRAPHS_DIR, the checkout's graphs/, or ~/.cache/fastgen-compile/graphs")
    graph_cache: bool = knob(True, "load and save persisted graphs")
    strict_recompiles: bool = False  # a recompile after warmup raises RecompileError (tests) instead of a warning
    dtype_reason: str = field(default="as asked", compare=False)  # why dtype is what it is (set when it was "auto")

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            self.dtype, self.dtype_reason = auto_dtype(self.device)
        for name in ("dtype", "kv_dtype"):
            value = getattr(self, name)
            if value not in DTYPES and (name == "dtype" or value is not None):
                raise ConfigError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
        self.buckets = tuple(sorted(set(self.buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ConfigError(f"buckets must be positive token counts, got {self.buckets}")
        if self.q_block < 1 or self.decode_rows < 0:
            raise ConfigError("q_block must be >= 1 and decode_rows >= 0")
        bad = [b for b in self.buckets if b > self.decode_rows and (b - self.decode_rows) % self.q_block]
        if bad:
            rule = f"at most decode_rows={self.decode_rows} (decode rows only) or decode_rows plus a multiple of q_block={self.q_block}"
            raise ConfigError(f"every bucket must be {rule}: {bad}")
        if self.buckets[-1] <= self.decode_rows:
            raise ConfigError(f"the largest bucket must leave rows for prompts beyond decode_rows={self.decode_rows}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        self._check_kernels()
        if (self.itl_target_ms is not None and self.itl_target_ms < 0) or self.prompt_rate < 0:
            raise ConfigError(f"itl_target_ms and prompt_rate must be >= 0, got {self.itl_target_ms} and {self.prompt_rate}")
        if self.layers_per_graph < 1:
            raise ConfigError(f"layers_per_graph must be >= 1, got {self.layers_per_graph}")
        if self.prefix_caching and self.q_block > BITS:
            raise ConfigError(f"prefix caching needs q_block <= {BITS} (one bit per sequence of a query block), got {self.q_block}; "
                              "use a smaller q_block or prefix_caching=False")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.page_size < 1 or self.max_seqs < 1:
            raise ConfigError("page_size and max_seqs must be >= 1")
        if self.compile and torch.device(self.device).type == "cpu" and self.page_size < MIN_CPU_COMPILED_PAGE:
            raise ConfigError(f"page_size must be >= {MIN_CPU_COMPILED_PAGE} for the compiled CPU engine, got {self.page_size}: torch 2.13's "
                              "compiled CPU FlexAttention reads KV blocks of 8 wrongly on AVX2-only CPUs (decode logits off by ~10)")

    def _check_kernels(self) -> None:
        cpu = torch.device(self.device).type == "cpu"
        if self.quantization not in ("auto", "none", *METHODS) or (self.quantization in METHODS and not cpu):
            raise ConfigError(f"quantization must be auto, none, or one of {', '.join(METHODS)} on a CPU device, got {self.quantization!r} on {self.device}")
        if self.linear_kernel != "auto":
            kernel = KERNELS.get(self.linear_kernel)
            if kernel is None:
                raise ConfigError(f"linear_kernel must be auto or one of {', '.join(KERNELS)}, got {self.linear_kernel!r}")
            if kernel.bits is not None and self.quantization not in ("auto", f"int{kernel.bits}"):
                raise ConfigError(f"linear_kernel {self.linear_kernel} reads int{kernel.bits} weights: it needs quantization='int{kernel.bits}'")
            if self.linear_kernel == "onednn" and not (cpu and self.dtype == "bfloat16"):
                raise ConfigError("linear_kernel onednn runs bf16 on a CPU: it needs dtype='bfloat16' and a CPU device")
            if kernel.bf16_activations and self.dtype == "bfloat16":
                raise ConfigError(f"linear_kernel {self.linear_kernel} is for models computing in another dtype; with bfloat16 use {self.linear_kernel[:4]}")

    def quantized_parts(self, stored_as: dict[str, str], device: torch.device) -> dict[str, str]:
        """How this engine quantizes the layers' linears and the lm_head ({"layers": "int4", ...}; absent: dense)."""
        if self.quantization == "auto":
            return dict(stored_as) if device.type == "cpu" else {}
        return {} if self.quantization == "none" else {"layers": self.quantization, "lm_head": self.quantization}

    @property
    def token_budget(self) -> int:
        return self.buckets[-1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        # CPU flex_attention repacks the whole bf16 pool on every call; fp32 skips that (3x faster)
        if self.kv_dtype is None:
            return torch.float32 if torch.device(self.device).type == "cpu" else self.torch_dtype
        return DTYPES[self.kv_dtype]

    def num_pages(self, bytes_per_token: int, max_model_len: int, warmed: Iterable[int] = ()) -> int:
        """Pool size: as set, else a share of free memory, never more than max_seqs full sequences.
        warmed: pool sizes the graphs folder holds graphs for (GraphCache.warmed_pool_sizes); the
        graphs are shaped by the pool, so a free-memory size drifting across a step of `coarse`
        between `fastgen-compile warmup` and the next start recompiled every bucket (minutes):
        the warmed size nearest the share wins while it lies within half and 1.5x of it."""
        if self.kv_pages is not None:
            return self.kv_pages
        budget = self.kv_bytes if self.kv_bytes is not None else int(self.kv_memory_fraction * free_memory(self.device))
        useful = -(-max_model_len // self.page_size) * self.max_seqs + 1
        pages = budget // (bytes_per_token * self.page_size)
        share = min(pages, useful)
        near = [w for w in warmed if share / 2 <= w <= min(1.5 * share, useful)]
        if near:
            return min(near, key=lambda w: abs(math.log(w / share)))
        return int(min(coarse(pages), useful))


def coarse(n: int) -> int:
    """n rounded down to m * 2**k with m in 4..7 (at most 25% less): a pool sized from free
    memory then keeps its size, and so its compiled graphs, as free memory drifts between runs."""
    step = 1 << max(n.bit_length() - 3, 0)
    return n // step * step


def free_memory(device: str) -> int:
    """What a new allocation can have: CUDA's free memory; on Linux MemAvailable (page cache
    counts as free: MemFree drops by every file read, and the pool size drifted with it)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every EngineConfig knob as a flag; a True switch gets --no-NAME. Defaults are EngineConfig's."""
    for f in fields(EngineConfig):
        if "flag" not in f.metadata:
            continue
        name, help, flag = f.name.replace("_", "-"), f.metadata["help"], dict(f.metadata["flag"])
        aliases = flag.pop("aliases", [])
        if f.default is True:
            parser.add_argument(f"--no-{name}", dest=f.name, action="store_false", help=f"do not: {help}")
        else:
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            default = f"(default: {shown})" if f.default is not None else ""
            parser.add_argument(f"--{name}", *aliases, default=f.default, help=f"{help} {default}".strip(), **flag)


def engine_overrides(args: argparse.Namespace) -> dict:
    """The engine knobs parsed by add_engine_flags, as EngineConfig keyword arguments."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if "flag" in f.metadata and hasattr(args, f.name)}
