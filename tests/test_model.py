"""Our Llama (paged KV pool, FlexAttention, packed SplitFuse batches) against transformers' LlamaForCausalLM.

A tiny random Llama is saved with save_pretrained and loaded through the engine's own HF-folder
loader. The engine's scheduler, batch packing and runner are driven directly, teacher-forced
along a fixed token sequence, so the logits of every computed position can be compared with
HF's full-sequence logits: prefill in one pass, chunked prefill across steps, decode steps,
and steps that mix decodes with prompt chunks of other sequences.

Tolerance: fp32 on both sides, logits of magnitude ~10; we require |ours - hf| <= ATOL + RTOL * |hf|
with ATOL = 1e-4 and RTOL = 1e-5 (observed worst error ~3e-5).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaForCausalLM

from fastgen_compile.batch import pick_bucket
from fastgen_compile.engine import Engine
from fastgen_compile.sampling import SamplingParams, new_generator
from fastgen_compile.sequence import Sequence
from tiny_llama import VOCAB, one_torch_thread, save_tiny_llama  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL, RTOL = 1e-4, 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    "untied-default-rope": {"tie_word_embeddings": False, "rope_scaling": None},
    "tied-llama3-rope": {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE},
    "untied-linear-rope": {"tie_word_embeddings": False, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}
# decode_rows=0: decodes share the prompt rows (conftest's engines cover a separate decode region)
ENGINE_KW = {"dtype": "float32", "compile": False, "buckets": (16, 32), "decode_rows": 0, "page_size": 8, "q_block": 16, "kv_pages": 32, "max_seqs": 4}

_seq_ids = itertools.count(10_000)  # unique per process, so engines shared between tests never see an id twice


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@dataclass
class Request:
    full: list[int]  # prompt + the tokens fed back as "sampled" (teacher forcing)
    prompt_len: int
    add_at_step: int = 0
    seq: Sequence | None = None
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> logits row (latest computation)


@dataclass
class StepLog:
    chunks: list[tuple[Request, int, int, bool]]  # request, start, num_tokens, is_decode
    preempted: int


def drive(engine: Engine, requests: list[Request], max_steps: int = 500) -> list[StepLog]:
    """The engine's loop, with every real row's logits kept and the next token taken from `full`."""
    cfg = engine.config
    by_seq: dict[Sequence, Request] = {}
    log: list[StepLog] = []
    step = 0
    while step < max_steps:
        for r in requests:
            if r.add_at_step == step and r.seq is None:
                params = SamplingParams(max_new_tokens=len(r.full) - r.prompt_len, temperature=0)
                r.seq = Sequence(next(_seq_ids), r.full[: r.prompt_len], params, new_generator(0))
                by_seq[r.seq] = r
                engine.scheduler.add(r.seq)
        if not engine.scheduler.has_work() and all(r.seq is not None for r in requests):
            break
        step += 1
        pending = {s: s.num_pending for s in engine.scheduler.running}
        plan = engine.scheduler.schedule()
        if not plan.chunks:
            log.append(StepLog([], len(plan.preempted)))
            continue
        batch = engine.pack(plan, pick_bucket(cfg.buckets, cfg.decode_rows, plan))
        # the engine samples the last row of each chunk that reaches its sequence's end
        assert batch.sample_rows.tolist() == [row + c.num_tokens - 1 for c, row in zip(plan.chunks, batch.chunk_rows) if c.samples]
        assert batch.bucket >= plan.num_tokens
        real_rows = torch.tensor([row + i for c, row in zip(plan.chunks, batch.chunk_rows) for i in range(c.num_tokens)])
        assert len(set(real_rows.tolist())) == plan.num_tokens and int(real_rows.max()) < batch.bucket
        logits = engine.runner.forward(dataclasses.replace(batch, sample_rows=real_rows))
        assert logits.shape == (plan.num_tokens, VOCAB) and logits.dtype == torch.float32
        engine.scheduler.update(plan)
        samplers = [c.seq for c in plan.chunks if c.samples]
        row = 0
        entry = StepLog([], len(plan.preempted))
        for c in plan.chunks:
            r = by_seq[c.seq]
            for i in range(c.num_tokens):
                r.logits[c.start + i] = logits[row + i].clone()
            row += c.num_tokens
            entry.chunks.append((r, c.start, c.num_tokens, pending.get(c.seq) == 1))
        log.append(entry)
        for seq in samplers:
            r = by_seq[seq]
            seq.output_token_ids.append(r.full[seq.num_tokens])
            if seq.num_tokens == len(r.full):
                engine.scheduler.finish(seq, "length")
    assert not engine.scheduler.has_work(), f"not done after {max_steps} steps"
    assert engine.blocks.num_free == engine.blocks.num_pages - 1
    return log


def assert_matches_hf(hf: LlamaForCausalLM, r: Request) -> None:
    positions = sorted(r.logits)
    assert positions == list(range(len(r.full) - 1)), "some position was never computed"
    ref = hf_logits(hf, r.full)
    got = torch.stack([r.logits[p] for p in positions])
    torch.testing.assert_close(got, ref[positions], atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_llama(folder, **VARIANTS[request.param])
    engine = Engine(model=str(folder), **ENGINE_KW)
    return hf, engine


def test_loaded_config_matches(tiny):
    hf, engine = tiny
    args = engine.model.args
    assert (args.vocab_size, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim) == (VOCAB, 64, 2, 4, 2, 16)
    assert args.tie_word_embeddings == hf.config.tie_word_embeddings
    if args.tie_word_embeddings:
        assert engine.model.lm_head is engine.model.embed
    else:
        torch.testing.assert_close(engine.model.lm_head, hf.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(engine.model.embed, hf.model.embed_tokens.weight, atol=0, rtol=0)


def test_one_shot_prefill(tiny):
    hf, engine = tiny
    r = Request(random_ids(25, seed=1), prompt_len=24)
    log = drive(engine, [r])
    assert [(s, n) for _, s, n, _ in log[0].chunks] == [(0, 24)], "the whole prompt should run in one pass"
    assert_matches_hf(hf, r)


def test_several_prompts_packed_in_one_pass(tiny):
    hf, engine = tiny
    reqs = [Request(random_ids(n + 1, seed=10 + n), prompt_len=n) for n in (8, 10, 13)]  # 31 tokens <= budget 32
    log = drive(engine, reqs)
    assert [(rr.prompt_len, s, n) for rr, s, n, _ in log[0].chunks] == [(8, 0, 8), (10, 0, 10), (13, 0, 13)]
    for r in reqs:
        assert_matches_hf(hf, r)


def test_chunked_prefill(tiny):
    hf, engine = tiny
    r = Request(random_ids(76, seed=2), prompt_len=75)
    log = drive(engine, [r])
    assert [(s, n) for step in log for _, s, n, _ in step.chunks] == [(0, 32), (32, 32), (64, 11)]
    assert_matches_hf(hf, r)


def test_decode_steps_beside_prompt_chunks(tiny):
    """A decodes for 14 steps; B (a 50-token prompt) and C arrive later and are prefilled beside A's decodes."""
    hf, engine = tiny
    a = Request(random_ids(9 + 14, seed=3), prompt_len=9)
    b = Request(random_ids(50 + 6, seed=4), prompt_len=50, add_at_step=3)
    c = Request(random_ids(5 + 10, seed=5), prompt_len=5, add_at_step=4)
    log = drive(engine, [a, b, c])
    a_decodes = sum(1 for step in log for rr, _, n, dec in step.chunks if rr is a and dec)
    assert a_decodes == 13  # 14 tokens: the first comes from the prefill pass
    mixed = [step for step in log if any(dec for *_, dec in step.chunks) and any(not dec and n > 1 for *_, n, dec in step.chunks)]
    assert len(mixed) >= 2, "no step mixed decodes with prompt chunks"
    assert any(rr is b and s > 0 for step in log for rr, s, _, _ in step.chunks), "B's prompt was not chunked"
    for r in (a, b, c):
        assert_matches_hf(hf, r)


def test_greedy_generation_through_engine_step(tiny):
    """The real path: add_request + step + sampler. Every greedy token is HF's argmax (up to near-ties)."""
    hf, engine = tiny
    prompts = [random_ids(n, seed=20 + n) for n in (7, 40, 3)]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    rids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    final = {}
    for _ in range(100):
        for out in engine.step():
            final[out.request_id] = out
        if not engine.has_work():
            break
    assert not engine.has_work()
    for rid, prompt in zip(rids, prompts):
        out = final[rid]
        assert out.finished and out.finish_reason == "length" and len(out.token_ids) == 10
        ref = hf_logits(hf, prompt + out.token_ids)
        for i, tok in enumerate(out.token_ids):
            row = ref[len(prompt) - 1 + i]
            assert row[tok] >= row.max() - 10 * ATOL, f"request {rid} token {i}: {tok} is not HF's argmax {row.argmax().item()}"


def test_sharded_safetensors_folder_loads_and_matches(tmp_path):
    hf = save_tiny_llama(tmp_path, max_shard_size="100KB", seed=7)
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() and not (tmp_path / "model.safetensors").exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) >= 3 and all((tmp_path / s).is_file() for s in shards)
    engine = Engine(model=str(tmp_path), **ENGINE_KW)
    for name, p in hf.named_parameters():  # every HF tensor made it into our fused layout
        if name == "model.layers.1.self_attn.k_proj.weight":
            q, k, v = engine.model.layers[1].wqkv.split([64, 32, 32])
            torch.testing.assert_close(k, p, atol=0, rtol=0)
        if name == "model.layers.0.mlp.up_proj.weight":
            torch.testing.assert_close(engine.model.layers[0].w_up[128:], p, atol=0, rtol=0)
    reqs = [Request(random_ids(30 + 5, seed=8), prompt_len=30), Request(random_ids(40 + 3, seed=9), prompt_len=40)]
    drive(engine, reqs)
    for r in reqs:
        assert_matches_hf(hf, r)


def test_compiled_flex_attention_matches(tmp_path):
    """compile=True (per-bucket torch.compile of the layer with FlexAttention): one bucket, prefill + chunk + decodes."""
    hf = save_tiny_llama(tmp_path, **VARIANTS["tied-llama3-rope"])
    engine = Engine(model=str(tmp_path), **(ENGINE_KW | {"compile": True, "buckets": (16,)}))
    assert engine.warm
    a = Request(random_ids(12 + 8, seed=11), prompt_len=12)
    b = Request(random_ids(9 + 5, seed=12), prompt_len=9, add_at_step=1)  # 12 + 9 > 16: chunked beside a decode
    log = drive(engine, [a, b])
    assert any(rr is b and s > 0 for step in log for rr, s, _, _ in step.chunks)
    for r in (a, b):
        assert_matches_hf(hf, r)


def test_logits_match_after_preemption_and_page_reuse(tmp_path):
    hf = save_tiny_llama(tmp_path, seed=3)
    engine = Engine(model=str(tmp_path), **(ENGINE_KW | {"kv_pages": 11}))  # 80 slots: three sequences cannot all fit
    reqs = [
        Request(random_ids(40, seed=21), prompt_len=10),
        Request(random_ids(75, seed=22), prompt_len=70),
        Request(random_ids(30, seed=23), prompt_len=29),
    ]
    drive(engine, reqs)
    assert sum(r.seq.num_preemptions for r in reqs) > 0, "the small pool should force preemption"
    for r in reqs:
        assert_matches_hf(hf, r)


def test_engine_model_has_no_stray_weights(tmp_path):
    """Every parameter came from the checkpoint (nothing left on the meta device or uninitialised)."""
    save_tiny_llama(tmp_path, seed=5)
    engine = Engine(model=str(tmp_path), **ENGINE_KW)
    for name, p in engine.model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    assert os.path.basename(str(tmp_path)) == engine.model_name


def test_step_stats_split_prompt_and_decode_tokens(tmp_path):
    save_tiny_llama(tmp_path, seed=4)
    engine = Engine(model=str(tmp_path), **ENGINE_KW)
    engine.add_request(prompt_token_ids=random_ids(33, seed=30), params=SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    # 33 prompt tokens over a budget of 32, then two decodes
    assert [(s.prompt_tokens, s.decode_tokens) for s in engine.step_stats] == [(32, 0), (1, 0), (0, 1), (0, 1)]
