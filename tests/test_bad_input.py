"""Bad input gets a clear error that names the problem, and a valid request served beside it is unharmed.

One LLM (tiny random Llama, eager, KV pool of 88 tokens, context 128) serves the whole module.
For each bad request a valid one is streamed from a background thread; the bad one is
submitted while it runs, must raise RequestError / ModelLoadError (both ValueError) with a
message naming the problem, and the valid one must still finish with all its tokens, the same
tokens as when it ran alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fastgen_compile import LLM, EngineDied, ModelLoadError, RequestError, SamplingParams
from fastgen_compile.config import EngineConfig
from fastgen_compile.errors import ConfigError
from fastgen_compile.models.loader import embedded_model_path, load
from tiny_llama import VOCAB, one_torch_thread, save_tiny, save_tiny_llama, tiny_config  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CONTEXT = 128
PAGE_SIZE, KV_PAGES = 8, 12  # one scratch page: the pool holds (12 - 1) * 8 = 88 tokens, below the context
POOL_TOKENS = (KV_PAGES - 1) * PAGE_SIZE
LLM_KW = {
    "dtype": "float32", "compile": False, "buckets": (16, 32), "decode_rows": 0, "page_size": PAGE_SIZE, "q_block": 16, "kv_pages": KV_PAGES, "max_seqs": 4,
}
VALID_PROMPT = "w5 w6 w7 w8"
VALID_NEW_TOKENS = 24
VALID_PARAMS = SamplingParams(max_new_tokens=VALID_NEW_TOKENS, temperature=0, ignore_eos=True)
HANG_GUARD_S = 300  # only a guard against a hang, never a timing assertion


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder, context=CONTEXT)
    return folder


@pytest.fixture(scope="module")
def llm(tiny_folder):
    with LLM(model=str(tiny_folder), **LLM_KW) as llm:
        assert llm.engine.max_model_len == CONTEXT and llm.engine.pages.capacity_tokens == POOL_TOKENS
        yield llm


@pytest.fixture(scope="module")
def reference_tokens(llm):
    """The valid request's greedy tokens when it runs alone."""
    out = llm.generate(VALID_PROMPT, VALID_PARAMS)[0]
    assert out.finished and len(out.token_ids) == VALID_NEW_TOKENS
    return out.token_ids


@contextlib.contextmanager
def valid_request_beside(llm: LLM, reference: list[int]):
    """Streams the valid request in a background thread; the body runs once its first token is out."""
    outputs, errors = [], []
    first = threading.Event()

    def consume() -> None:
        try:
            for out in llm.stream(VALID_PROMPT, VALID_PARAMS):
                outputs.append(out)
                first.set()
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)
        finally:
            first.set()

    thread = threading.Thread(target=consume, name="valid-request", daemon=True)
    thread.start()
    assert first.wait(HANG_GUARD_S), "the valid request produced nothing"
    yield
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the valid request never finished"
    assert not errors, f"the valid request failed: {errors!r}"
    final = outputs[-1]
    assert final.finished and final.finish_reason == "length"
    assert len(outputs) == VALID_NEW_TOKENS and all(len(o.delta_token_ids) == 1 for o in outputs)
    assert [o.delta_token_ids[0] for o in outputs] == final.token_ids == reference
    assert final.prompt_token_ids == [5, 6, 7, 8]


def assert_clear_error(excinfo, cls) -> None:
    assert isinstance(excinfo.value, cls) and isinstance(excinfo.value, ValueError)
    assert str(excinfo.value).strip(), "the error has no message"


# ---- requests --------------------------------------------------------------------------------

REQUEST_CASES = {
    "empty text prompt": (lambda llm: llm.generate("", VALID_PARAMS), "the prompt is empty"),
    "empty text prompt, streamed": (lambda llm: llm.stream("", VALID_PARAMS), "the prompt is empty"),
    "empty prompt_token_ids": (lambda llm: llm.generate(prompt_token_ids=[[]]), "the prompt is empty"),
    "beyond the model context": (
        lambda llm: llm.generate(" ".join(["w9"] * 10), SamplingParams(max_new_tokens=CONTEXT - 9)),
        rf"prompt \(10 tokens\) \+ max_new_tokens \({CONTEXT - 9}\) = {CONTEXT + 1} exceeds the model's context of {CONTEXT} tokens",
    ),
    "beyond the whole KV pool": (
        lambda llm: llm.generate(prompt_token_ids=[[9] * 10], sampling_params=SamplingParams(max_new_tokens=POOL_TOKENS - 9)),
        rf"= {POOL_TOKENS + 1} exceeds the whole KV pool of {POOL_TOKENS} tokens",
    ),
    "max_new_tokens 0": (lambda llm: llm.generate("w5", SamplingParams(max_new_tokens=0)), r"max_new_tokens must be an integer >= 1, got 0"),
    "max_new_tokens -3": (lambda llm: llm.generate("w5", SamplingParams(max_new_tokens=-3)), r"max_new_tokens must be an integer >= 1, got -3"),
    "max_new_tokens 2.5": (lambda llm: llm.generate("w5", SamplingParams(max_new_tokens=2.5)), r"max_new_tokens must be an integer"),
    "temperature < 0": (lambda llm: llm.generate("w5", SamplingParams(temperature=-0.5)), r"temperature must be >= 0, got -0.5"),
    "temperature nan": (lambda llm: llm.generate("w5", SamplingParams(temperature=float("nan"))), r"temperature must be >= 0, got nan"),
    "top_p 0": (lambda llm: llm.generate("w5", SamplingParams(top_p=0)), r"top_p must be in \(0, 1\], got 0"),
    "top_p 1.5": (lambda llm: llm.generate("w5", SamplingParams(top_p=1.5)), r"top_p must be in \(0, 1\], got 1.5"),
    "top_k < 0": (lambda llm: llm.generate("w5", SamplingParams(top_k=-1)), r"top_k must be an integer >= 0, got -1"),
    "token id beyond vocab": (lambda llm: llm.generate(prompt_token_ids=[[5, VOCAB]]), rf"prompt token ids must be integers in \[0, {VOCAB}\)"),
    "negative token id": (lambda llm: llm.generate(prompt_token_ids=[[-1, 5]]), rf"prompt token ids must be integers in \[0, {VOCAB}\)"),
    "prompt not a string": (lambda llm: llm.generate([123]), r"a prompt must be a string or a list of token ids, got int"),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_bad_request_is_rejected_while_a_valid_one_completes(llm, reference_tokens, case):
    submit, message = REQUEST_CASES[case]
    with valid_request_beside(llm, reference_tokens):
        with pytest.raises(RequestError, match=message) as excinfo:
            submit(llm)
        assert_clear_error(excinfo, RequestError)


def test_limits_are_inclusive(llm):
    """Exactly the whole KV pool (which is below the context) is accepted and completes."""
    n_prompt = 10
    params = SamplingParams(max_new_tokens=POOL_TOKENS - n_prompt, temperature=0, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[9] * n_prompt], sampling_params=params)[0]
    assert out.finished and out.finish_reason == "length" and len(out.token_ids) == POOL_TOKENS - n_prompt


def test_engine_keeps_serving_after_bad_requests(llm, reference_tokens):
    for bad in ("", " ".join(["w9"] * (CONTEXT + 1))):
        with pytest.raises(RequestError):
            llm.generate(bad, VALID_PARAMS)
    outs = llm.generate([VALID_PROMPT, "w40 w41"], VALID_PARAMS)
    assert outs[0].token_ids == reference_tokens
    assert all(o.finished and len(o.token_ids) == VALID_NEW_TOKENS for o in outs)


def test_rejected_batch_leaves_no_request_running(llm):
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    try:
        with pytest.raises(RequestError, match="the prompt is empty"):
            llm.generate(["w5 w6", ""], params)
        assert not llm.engine.has_work(), "the valid first prompt of a rejected batch is still being generated"
    finally:  # let an orphan finish so that it shares no batch with later tests
        for _ in range(HANG_GUARD_S * 100):
            if not llm.engine.has_work():
                break
            time.sleep(0.01)


# ---- model loading ---------------------------------------------------------------------------


def corrupt_copy(tiny_folder, tmp_path, edit) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    edit(folder)
    return str(folder)


def truncate(path, keep_fraction: float) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def save_gpt2(folder) -> None:
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder, safe_serialization=True)


def truncated_gguf(tmp_path, nbytes: int = 1 << 20) -> str:
    path = tmp_path / "truncated.gguf"
    with open(embedded_model_path(), "rb") as src:
        path.write_bytes(src.read(nbytes))
    return str(path)


LOAD_CASES = {
    "path does not exist": (lambda tf, tmp: str(tmp / "no" / "such" / "model"), r"model path does not exist: .*no/such/model"),
    "text file": (
        lambda tf, tmp: (tmp / "notes.txt").write_text("not a model\n") and str(tmp / "notes.txt"),
        r"notes\.txt is neither a model folder \(config\.json \+ \*\.safetensors\) nor a GGUF file",
    ),
    "empty folder": (lambda tf, tmp: str(tmp), r"is neither a model folder"),
    "truncated safetensors": (
        lambda tf, tmp: corrupt_copy(tf, tmp, lambda f: truncate(f / "model.safetensors", 0.5)),
        r"corrupt or truncated safetensors file in .*model",
    ),
    "safetensors cut inside the header": (
        lambda tf, tmp: corrupt_copy(tf, tmp, lambda f: truncate(f / "model.safetensors", 0.0005)),
        r"corrupt or truncated safetensors file",
    ),
    "no weights": (lambda tf, tmp: corrupt_copy(tf, tmp, lambda f: os.remove(f / "model.safetensors")), r"no \*\.safetensors weights in"),
    "broken config.json": (
        lambda tf, tmp: corrupt_copy(tf, tmp, lambda f: (f / "config.json").write_text("{not json")),
        r"cannot read .*config\.json",
    ),
    "truncated gguf (first 1 MB)": (lambda tf, tmp: truncated_gguf(tmp), r"corrupt or truncated GGUF file .*truncated\.gguf"),
    "truncated gguf (first 100 bytes)": (lambda tf, tmp: truncated_gguf(tmp, 100), r"corrupt or truncated GGUF file"),
    "unsupported architecture (GPT-2)": (
        lambda tf, tmp: save_gpt2(tmp / "gpt2") or str(tmp / "gpt2"),
        r"unsupported architecture GPT2LMHeadModel; supported architectures: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
        r"OPTForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM$",
    ),
    "Gemma's proportional rope scaling": (
        lambda tf, tmp: save_tiny(tmp, tiny_config("llama", rope_scaling={"rope_type": "proportional"})) and str(tmp),
        r"unsupported rope scaling 'proportional'; supported: default, linear, dynamic, llama3, yarn, longrope$",
    ),
    "Qwen2 window on some layers": (
        lambda tf, tmp: save_tiny(tmp, tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)) and str(tmp),
        r"Qwen2 with a sliding window on some layers only \(max_window_layers=1\) is not supported$",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_bad_model_path_gets_a_clear_error(tiny_folder, tmp_path, case):
    make, message = LOAD_CASES[case]
    path = make(tiny_folder, tmp_path)
    with pytest.raises(ModelLoadError, match=message) as excinfo:
        load(path, torch.float32, torch.device("cpu"))
    assert_clear_error(excinfo, ModelLoadError)


@pytest.mark.parametrize("case", ["path does not exist", "truncated safetensors", "unsupported architecture (GPT-2)"])
def test_bad_model_through_the_public_api_while_serving(llm, reference_tokens, tiny_folder, tmp_path, case):
    """The same errors surface from LLM(...), and a model that fails to load does not disturb one that is serving."""
    make, message = LOAD_CASES[case]
    path = make(tiny_folder, tmp_path)
    with valid_request_beside(llm, reference_tokens):
        with pytest.raises(ModelLoadError, match=message):
            LLM(model=path, **LLM_KW)


def test_missing_weight_is_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    def drop_lm_head(folder):
        tensors = load_file(folder / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ModelLoadError, match="checkpoint lacks the weights for lm_head"):
        load(corrupt_copy(tiny_folder, tmp_path, drop_lm_head), torch.float32, torch.device("cpu"))


def test_weight_of_the_wrong_shape_is_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    def shrink(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :100].contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ModelLoadError, match=r"weight w_down \(layer 1\) has shape \(64, 100\), the config implies \(64, 128\)"):
        load(corrupt_copy(tiny_folder, tmp_path, shrink), torch.float32, torch.device("cpu"))


def test_a_failing_engine_loop_fails_every_caller_instead_of_hanging(tiny_folder, monkeypatch):
    """An error inside a step reaches the waiting caller, and later submissions fail at once."""
    llm = LLM(model=str(tiny_folder), **LLM_KW)

    def broken_forward(batch, rows=None):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(llm.engine.runner, "forward", broken_forward)
    with pytest.raises(EngineDied) as died:
        llm.generate(VALID_PROMPT, VALID_PARAMS)
    assert "simulated kernel failure" in str(died.value.__cause__)
    with pytest.raises(EngineDied, match="failed earlier"):
        llm.generate(VALID_PROMPT, VALID_PARAMS)


@pytest.mark.parametrize(
    ("knobs", "error"),
    [
        (dict(buckets=(32, 100), decode_rows=32, q_block=32), "decode_rows plus a multiple of q_block=32: \\[100\\]"),
        (dict(buckets=(8, 16), decode_rows=16, q_block=16), "must leave rows for prompts"),
        (dict(buckets=(0, 64), decode_rows=16, q_block=16), "positive token counts"),
        (dict(page_size=8), "page_size must be >= 16 for the compiled CPU engine, got 8"),
    ],
)
def test_bad_bucket_configs_get_clear_errors(knobs, error):
    with pytest.raises(ConfigError, match=error):
        EngineConfig(**knobs)
    if "page_size" in knobs:
        EngineConfig(**knobs, compile=False)  # eager attention reads pages of 8 correctly (tests/test_model.py)
