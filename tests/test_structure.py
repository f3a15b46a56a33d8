"""The package's structure, kept honest: the request side needs no torch, and the product does
not depend on its benchmark."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastgen_compile

PACKAGE = Path(fastgen_compile.__file__).parent
# the bookkeeping side: plain Python, importable (and unit-testable) without torch
TORCH_FREE = ["request", "errors", "artifacts", "corpus", "engine.scheduler", "engine.pages", "engine.sequence", "engine.detokenizer",
              "grpc_client"]  # the gRPC client, for processes that only call a server

NO_TORCH = """
import importlib, pickle, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")

sys.meta_path.insert(0, NoTorch())
from fastgen_compile import RequestError, RequestOutput, SamplingParams

params = SamplingParams(max_new_tokens=8, temperature=0.5, stop=["\\n"], seed=3)
assert pickle.loads(pickle.dumps(params)) == params and params.stop == ("\\n",)
out = RequestOutput(7, "hi", [1, 2], "text", [3], "text", [3], True, "stop")
assert pickle.loads(pickle.dumps(out)) == out
try:
    SamplingParams(top_p=0)
except RequestError as e:
    print("rejected:", e)
for module in sys.argv[1:]:
    importlib.import_module("fastgen_compile." + module)
try:
    from fastgen_compile import LLM  # noqa: F401
except ImportError:
    print("LLM needs torch")
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""


def test_request_types_work_without_torch():
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *TORCH_FREE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["rejected: top_p must be in (0, 1], got 0", "LLM needs torch", "ok"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_cli_reaches_into_bench():
    reaching = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "bench"
        and any(name == "fastgen_compile.bench" or name.startswith("fastgen_compile.bench.") for name in imported_modules(path))
    }
    assert reaching == {"cli.py"}, f"modules outside bench/ that import it: {sorted(reaching - {'cli.py'})}"
