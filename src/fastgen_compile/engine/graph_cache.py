"""Compiled graphs persisted under <root>/<key>/, so a warm start compiles nothing.

A key folder holds inductor's own caches (FX graph, AOT autograd, the built C++/Triton
kernels): while our backend compiles, TORCHINDUCTOR_CACHE_DIR points into the folder.
That beat torch.compiler.save/load_cache_artifacts on this CPU: the mega-cache restores
graph entries but not the built kernels, so a warm start rebuilt every C++ kernel (60 s
against 13 s for three buckets). The key covers everything that makes a graph invalid
(artifacts.py checks the folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastgen_compile.artifacts import FORMAT, as_saved, exclusive, key, open_trusted, saved_fields, version, write_manifest
from fastgen_compile.hardware import cpu_flags
from fastgen_compile.models.shard import WHOLE, Shard


def device_capability(device: torch.device) -> str:
    """What compiled kernels are specific to: the GPU arch, or the CPU's vector ISA."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    isa = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} flags:{isa}"


def inductor_options(device: torch.device) -> dict:
    """Inductor's options for our graphs (in the key: other options make other code). Nothing
    replays a CPU step as a CUDA graph does, so the Python between a graph's kernels is step time
    there: the wrapper that calls them is built as C++ (cpp_wrapper), and it no longer checks each
    input's size and stride on every call (75 checks a call of 3 layers at bucket 1), which the
    graph's guards already do once a call. One int4 stream, same process: 72 -> 80 tok/s without
    the checks, 86 -> 95 with the C++ wrapper (docs/architecture.md)."""
    return {"size_asserts": False, "cpp_wrapper": device.type == "cpu"}


@dataclass(frozen=True)
class BucketWarmup:
    bucket: int
    seconds: float
    cache: str  # "hit": loaded from graphs/, "miss": compiled


class GraphCache:
    """The compile artifacts of one engine shape: graphs/<key>/ (inductor's caches) + manifest.json."""

    def __init__(self, root: Path, name: str, fields: dict):
        """Not read yet: `open` it inside `exclusive`."""
        self.name, self.fields = name, {"format": FORMAT, **fields}
        self.folder = Path(root) / key(name, self.fields)
        self.loaded = False
        self._held = False  # this process holds the folder's lock

    def open(self) -> GraphCache:
        """Reads whether the folder holds trusted graphs (`loaded`); a partial, stale or corrupt one is wiped."""
        self.loaded = open_trusted(self.folder, self.fields, "the compiled-graph cache")
        return self

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held from open through warmup and for every save, so two processes warming the same
        key (replicas on one machine) compile once: the second waits, then loads (re-entrant)."""
        if self._held:
            yield
            return
        with exclusive(self.folder, "the compiled-graph cache"):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    @classmethod
    def for_engine(cls, root: Path, model_name: str, model_files: list, args, config, num_pages: int, decode_kernel: bool,
                   quantization: dict[str, str], prefix_caching: bool, shard: Shard = WHOLE) -> GraphCache:
        """decode_kernel: whether decode rows go to the CPU kernel (asked for, and it built);
        quantization: what the engine quantized (EngineConfig.quantized_parts); prefix_caching:
        whether the attention mask reads cached pages (the engine's decision); shard: the rank
        of tensor parallelism whose graphs these are (each compiles its own shapes and collectives)."""
        c = config
        fields = {
            "model": model_name,
            "model_files": model_files,
            "model_args": asdict(args),
            "dtype": c.dtype,
            "kv_dtype": str(c.torch_kv_dtype).removeprefix("torch."),
            "device": torch.device(c.device).type,
            "capability": device_capability(torch.device(c.device)),
            "buckets": list(c.buckets),
            "decode_rows": c.decode_rows,
            "page_size": c.page_size,
            "q_block": c.q_block,
            "quantization": quantization,
            "linear_kernel": c.linear_kernel,
            "layers_per_graph": c.layers_per_graph,
            "decode_kernel": decode_kernel,
            "prefix_caching": prefix_caching,
            "kv_pages": num_pages,
            "tensor_parallel": {"rank": shard.rank, "world": shard.world},
            "inductor_options": inductor_options(torch.device(c.device)),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "fastgen_compile": version("fastgen-compile"),
        }
        ranks = f"-tp{shard.rank}of{shard.world}" if shard.world > 1 else ""
        return cls(root, f"{model_name}-{c.dtype}-{fields['device']}{ranks}", fields)

    def warmed_pool_sizes(self) -> list[int]:
        """The pool sizes (kv_pages) of the finished folders beside this one that differ from it in nothing else."""
        want = as_saved({**self.fields, "kv_pages": None})
        return [int(f["kv_pages"]) for f in saved_fields(self.folder.parent, self.name) if {**f, "kv_pages": None} == want]

    def record(self, name: str) -> dict | None:
        """A measurement kept for this key (the linear kernels, the step costs), if the folder is trusted and has it."""
        path = self.folder / name
        return json.loads(path.read_text()) if self.loaded and path.is_file() else None

    def save_record(self, name: str, record: dict, warmups: list[BucketWarmup] | None = None) -> None:
        """Written before the graphs, the manifest written after them covers it; written after them
        (warmups: what the manifest records), the manifest is written again."""
        with self.exclusive():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / name).write_text(json.dumps(record, indent=1) + "\n")
            if warmups is not None:
                self.save(warmups)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        """Inductor (and Triton, on GPU) read and write their caches in this folder while our backend compiles."""
        inductor = self.folder / "inductor"
        paths = {"TORCHINDUCTOR_CACHE_DIR": inductor, "TRITON_CACHE_DIR": inductor / "triton"}
        before = {name: os.environ.get(name) for name in paths}
        self.folder.mkdir(parents=True, exist_ok=True)
        os.environ.update({name: str(path) for name, path in paths.items()})
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def save(self, warmups: list[BucketWarmup]) -> dict:
        with self.exclusive():
            manifest = write_manifest(self.folder, self.fields, compiled=[asdict(w) for w in warmups])
        self.loaded = True
        return manifest
