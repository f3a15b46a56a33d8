"""EngineConfig: every knob of the engine, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastgen_compile.errors import ConfigError
from fastgen_compile.scheduler import POLICIES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "bfloat16"
    device: str = "cpu"
    # row counts the forward pass is compiled for; the largest is the SplitFuse token budget.
    # Every bucket starts with `decode_rows` rows for decode tokens (buckets below it hold only
    # those: quick steps for a few decodes); the rest take prompt chunks.
    buckets: tuple[int, ...] = (8, 32, 96, 288)
    decode_rows: int = 32  # also the most decodes per step; 0: decodes share the prompt rows
    page_size: int = 64  # KV slots per page, also the attention kv block
    q_block: int = 32  # prompt rows per block-mask row (decode rows always use 1)
    kv_dtype: str | None = None  # KV pool and attention dtype; default float32 on CPU, else dtype
    max_seqs: int = 64  # sequences in one forward pass
    max_model_len: int | None = None  # default: the model's context length
    kv_pages: int | None = None  # pool size in pages, or
    kv_bytes: int | None = None  # in bytes, or by default
    kv_memory_fraction: float = 0.1  # this share of free memory
    policy: str = "splitfuse"  # or "prefill_first"
    pack_weights: bool = True  # CPU bf16: linears use weights packed once for oneDNN (models/packed.py)
    decode_kernel: bool = True  # CPU: decode rows attend through kernels/paged_decode.cpp, not FlexAttention
    compile: bool = True  # False: the same model eagerly (debugging, test reference)
    warmup: bool = True  # compile every bucket at start (else lazily on first use)
    # compiled graphs (and prepared copies of GGUF checkpoints) persist under graphs_dir/<key>/;
    # None: $FASTGEN_GRAPHS_DIR, else graphs/ of a source checkout, else ~/.cache/fastgen-compile/graphs
    graphs_dir: str | None = None
    graph_cache: bool = True  # False: neither load nor save persisted graphs
    strict_recompiles: bool = False  # a recompile after warmup raises RecompileError (tests) instead of a warning

    def __post_init__(self) -> None:
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
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.page_size < 1 or self.max_seqs < 1:
            raise ConfigError("page_size and max_seqs must be >= 1")

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

    def num_pages(self, bytes_per_token: int, max_model_len: int) -> int:
        """Pool size: as set, else a share of free memory, never more than max_seqs full sequences."""
        if self.kv_pages is not None:
            return self.kv_pages
        budget = self.kv_bytes if self.kv_bytes is not None else int(self.kv_memory_fraction * free_memory(self.device))
        pages = coarse(budget // (bytes_per_token * self.page_size))
        useful = -(-max_model_len // self.page_size) * self.max_seqs + 1
        return int(min(pages, useful))


def coarse(n: int) -> int:
    """n rounded down to m * 2**k with m in 4..7 (at most 25% less): a pool sized from free
    memory then keeps its size, and so its compiled graphs, as free memory drifts between runs."""
    step = 1 << max(n.bit_length() - 3, 0)
    return n // step * step


def free_memory(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
