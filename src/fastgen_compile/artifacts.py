"""Folders of build artifacts checked by content: compiled graphs, built kernels, prepared models.

Each folder's name hashes everything that makes its artifacts invalid (`key`); `manifest.json`,
written last, lists those fields and a sha256 of every file, so a stale, partial or corrupt
folder is found before anything reads it, reported in one line and rebuilt (`open_trusted`).
All of them live under one root (`default_root`). No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ROOT_ENV = "FASTGEN_GRAPHS_DIR"
FORMAT = 2  # bump when a folder layout or manifest changes: older folders become stale
MANIFEST = "manifest.json"
DIGEST = 16  # hex digits of a key's hash of its fields


def default_root() -> Path:
    """$FASTGEN_GRAPHS_DIR; else graphs/ of the source checkout this runs from; else a user cache dir."""
    if env := os.environ.get(ROOT_ENV):
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
    if not isinstance(manifest, dict) or manifest.get("fields") != as_saved(fields):
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


def as_saved(fields: dict) -> dict:
    """fields as a manifest reads them back (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(fields, default=str))


def key(name: str, fields: dict) -> str:
    """A folder name: name and a hash of the fields."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST]
    return f"{name}-{digest}"


def saved_fields(root: Path, name: str) -> Iterator[dict]:
    """The fields of every finished folder under root that `key` named for name, whatever its fields."""
    for manifest in root.glob(f"{glob.escape(name)}-{'[0-9a-f]' * DIGEST}/{MANIFEST}"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            yield dict(json.loads(manifest.read_text())["fields"])


def open_trusted(folder: Path, fields: dict, what: str) -> bool:
    """True when folder holds trusted artifacts; an untrusted one is reported and wiped."""
    if not folder.exists():
        return False
    if (why := problem(folder, fields)) is None:
        return True
    log.warning("%s in %s is unusable (%s); rebuilding it", what, folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    return False


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """One process at a time checks and builds folder (replicas sharing graphs/): the others wait
    here, then find it built. The lock is folder's name + .lock, beside it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process building %s in %s", what, folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
