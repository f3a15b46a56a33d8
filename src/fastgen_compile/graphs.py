"""Compiled graphs persisted under graphs/<key>/, so a warm start compiles nothing.

A key folder holds inductor's own caches (FX graph, AOT autograd, the built C++/Triton
kernels): while our backend compiles, TORCHINDUCTOR_CACHE_DIR points into the folder.
That beat torch.compiler.save/load_cache_artifacts on this CPU: the mega-cache restores
graph entries but not the built kernels, so a warm start rebuilt every C++ kernel (60 s
against 13 s for three buckets). The key hashes everything that makes an artifact
invalid; `manifest.json` lists those fields, what was compiled, and a sha256 of every
file, so a stale, partial or corrupt folder is found before torch reads it, reported in
one line and rebuilt.

GGUF checkpoints also get a prepared copy (config, tokenizer and weights in the target
dtype, as a Hugging Face folder) under graphs/models/: re-parsing the GGUF file's
metadata and dequantizing it took ~20 s of a cold start; the folder loads in ~1 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GRAPHS_ENV = "FASTGEN_GRAPHS_DIR"
FORMAT = 1  # bump when the folder layout or manifest changes: older folders become stale
MANIFEST = "manifest.json"


def default_root() -> Path:
    """$FASTGEN_GRAPHS_DIR; else graphs/ of the source checkout this runs from; else a user cache dir."""
    if env := os.environ.get(GRAPHS_ENV):
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "graphs").is_dir() and os.access(checkout / "graphs", os.W_OK):
        return checkout / "graphs"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastgen-compile" / "graphs"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def device_capability(device: torch.device) -> str:
    """What compiled kernels are specific to: the GPU arch, or the CPU's vector ISA."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    flags = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags")), "")
    isa = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} flags:{isa}"


def file_identity(path: str) -> list:
    """A model file or folder as (name, bytes, mtime) of each file: changes when it does, cheap to read."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in files]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def digests(folder: Path) -> dict[str, list]:
    """Every file under folder (but the manifest): [bytes, sha256]."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(".lock"):
            out[str(f.relative_to(folder))] = [f.stat().st_size, sha256(f)]
    return out


def problem(folder: Path, fields: dict) -> str | None:
    """Why folder cannot be trusted (None: it can): missing, partial, stale or corrupt."""
    path = folder / MANIFEST
    if not path.is_file():
        return "partial: no manifest (an interrupted compile?)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"corrupt manifest ({e})"
    as_saved = json.loads(json.dumps(fields, default=str))  # tuples read back as lists
    if not isinstance(manifest, dict) or manifest.get("fields") != as_saved:
        return "stale: its key fields differ from this engine's"
    for name, (size, sha) in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"partial: {name} is missing or has the wrong size"
        if sha256(f) != sha:
            return f"corrupt: {name} does not match its checksum"
    return None


def write_manifest(folder: Path, fields: dict, **extra) -> dict:
    """Written last, atomically: a folder without one is a partial folder."""
    manifest = {"format": FORMAT, "fields": fields, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), **extra}
    manifest["files"] = digests(folder)
    manifest["bytes"] = sum(size for size, _ in manifest["files"].values())
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(folder / MANIFEST)
    return manifest


def _key(name: str, fields: dict) -> str:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{name}-{digest}"


def _open(folder: Path, fields: dict, what: str) -> bool:
    """True when folder holds trusted artifacts; an untrusted one is reported and wiped."""
    if not folder.exists():
        return False
    if (why := problem(folder, fields)) is None:
        return True
    log.warning("%s in %s is unusable (%s); rebuilding it", what, folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    return False


@dataclass(frozen=True)
class BucketWarmup:
    bucket: int
    seconds: float
    cache: str  # "hit": loaded from graphs/, "miss": compiled


class GraphCache:
    """The compile artifacts of one engine shape: graphs/<key>/ (inductor's caches) + manifest.json."""

    def __init__(self, root: Path, name: str, fields: dict):
        self.fields = {"format": FORMAT, **fields}
        self.folder = Path(root) / _key(name, self.fields)
        self.loaded = _open(self.folder, self.fields, "the compiled-graph cache")

    @classmethod
    def for_engine(cls, root: Path, model_name: str, model_files: list, args, config, num_pages: int) -> GraphCache:
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
            "pack_weights": c.pack_weights,
            "decode_kernel": c.decode_kernel,
            "kv_pages": num_pages,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "fastgen_compile": version("fastgen-compile"),
        }
        return cls(root, f"{model_name}-{c.dtype}-{fields['device']}", fields)

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
        manifest = write_manifest(self.folder, self.fields, compiled=[asdict(w) for w in warmups])
        self.loaded = True
        return manifest


def prepared_gguf(root: Path, path: str, dtype: torch.dtype) -> Path:
    """A trusted HF-folder copy of a GGUF checkpoint in `dtype` (built now if missing or bad)."""
    from fastgen_compile.models.loader import prepare_gguf

    fields = {"format": FORMAT, "gguf": os.path.realpath(path), "file": file_identity(path), "dtype": str(dtype), "transformers": version("transformers")}
    folder = Path(root) / "models" / _key(Path(path).stem, fields)
    if not _open(folder, fields, "the prepared model"):
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prepare_gguf(path, dtype, tmp)
            write_manifest(tmp, fields, source=os.path.realpath(path))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
