"""Smoke test of examples/: each script runs as __main__ with --max-new-tokens 4, on the session's
compiled engine (LLM() and pipeline() hand it out) so no script loads or compiles its own."""

from __future__ import annotations

import re
import runpy
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

import fastgen_compile
from fastgen_compile import Pipeline, SamplingParams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_NEW_TOKENS = 4


@pytest.fixture
def run_example(llm_compiled, wait_idle, monkeypatch, capsys):
    def run(name: str) -> str:
        monkeypatch.setattr(fastgen_compile, "LLM", lambda: nullcontext(llm_compiled))
        monkeypatch.setattr(fastgen_compile, "pipeline", lambda: Pipeline(llm_compiled))
        monkeypatch.setattr(sys, "argv", [name, "--max-new-tokens", str(MAX_NEW_TOKENS)])
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        assert wait_idle(llm_compiled)
        return capsys.readouterr().out

    assert wait_idle(llm_compiled)
    return run


def test_every_example_is_smoke_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["chat.py", "generate.py", "pipeline.py", "sampling.py", "stream.py"]


def test_generate(run_example, llm_compiled):
    out = run_example("generate.py")
    prompts = runpy.run_path(str(EXAMPLES / "generate.py"))["PROMPTS"]
    refs = llm_compiled.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0))
    lines = out.splitlines()
    for line, ref in zip(lines, refs):
        assert line == f"{ref.prompt!r} -> {ref.text!r} ({len(ref.token_ids)} tokens, {ref.finish_reason})"
    assert re.fullmatch(rf"{len(prompts)} prompts, {sum(len(r.token_ids) for r in refs)} tokens in [\d.]+ s: [\d.]+ tok/s", lines[len(prompts)])


def test_stream(run_example):
    out = run_example("stream.py")
    assert re.search(rf"\n\[{MAX_NEW_TOKENS} tokens in [\d.]+ s: [\d.]+ tok/s\]\n", out)
    assert "first sentence only: '" in out


def test_chat(run_example):
    out = run_example("chat.py")
    assert out.count("user: ") == 3 and out.count("\nassistant: ") == 3
    held = int(re.search(r"the last turn's prompt held (\d+) tokens", out).group(1))
    assert held > 60  # the system prompt and two earlier turns came along


def test_pipeline(run_example, llm_compiled):
    out = run_example("pipeline.py")
    refs = llm_compiled.generate(["DeepSpeed is", "Seattle is"], SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0))
    assert out.splitlines() == [f"{r.prompt!r} -> {r.text!r}" for r in refs]


def test_sampling(run_example):
    out = run_example("sampling.py")
    assert "seed 7 again:        identical: True" in out
    assert "seed 7 in a batch:   identical: True" in out
