"""Session-wide fixtures: the embedded model, its transformers twin, and two engines.

Everything heavy is built once per test session: the compiled engine compiles each
bucket's graph at start (~30 s), and every engine-level test shares it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

# The engines' shape. Small buckets make the SplitFuse token budget (the largest
# bucket, 64) split long prompts over many steps and fuse them with decodes.
# KV_PAGES holds every prompt of tests/test_equality.py at once (+24 new tokens each,
# + the scratch page); test_equality asserts that, so a longer prompt set fails loudly.
KV_PAGES = 128
ENGINE_CONFIG = dict(dtype="float32", buckets=(16, 64), decode_rows=16, page_size=16, q_block=16, kv_pages=KV_PAGES, max_seqs=16, strict_recompiles=True)


@pytest.fixture(scope="session", autouse=True)
def graphs_dir(tmp_path_factory):
    """Persisted graphs go to a folder of this session, never the checkout's graphs/."""
    from fastgen_compile.artifacts import ROOT_ENV

    folder = tmp_path_factory.mktemp("graphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ROOT_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def engine_config() -> dict:
    return dict(ENGINE_CONFIG)


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from fastgen_compile.models.loader import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_tokenizer(embedded_path):
    from transformers import AutoTokenizer

    folder, name = os.path.split(embedded_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def hf_model(embedded_path):
    """transformers' own reading of the same GGUF file, dequantized to fp32: the reference."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(embedded_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


def _make_llm(**overrides):
    from fastgen_compile import LLM

    return LLM(**{**ENGINE_CONFIG, **overrides})


@pytest.fixture(scope="session")
def llm_compiled():
    llm = _make_llm(compile=True, warmup=True)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def llm_eager():
    llm = _make_llm(compile=False)
    yield llm
    llm.close()


def _idle_free_pages(llm) -> int:
    """Free pages of an engine that holds no sequence: all but the scratch page."""
    from fastgen_compile.engine.pages import SCRATCH_PAGES

    return llm.engine.pages.num_pages - SCRATCH_PAGES


def _wait_idle(llm, timeout: float = 120.0) -> bool:
    """Poll until the engine has no work, every KV page is back on the free list and the
    loop thread has handed out every request's last output (no listener left)."""
    deadline = time.monotonic() + timeout
    idle = _idle_free_pages(llm)
    while time.monotonic() < deadline:
        if not llm.engine.has_work() and llm.engine.pages.num_free == idle and not llm.loop.num_pending:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def idle_free_pages():
    return _idle_free_pages


@pytest.fixture(scope="session")
def wait_idle():
    return _wait_idle
