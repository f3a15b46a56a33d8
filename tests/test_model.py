"""Our decoder (paged KV pool, FlexAttention, packed SplitFuse batches) against transformers, for every family.

A tiny random model of each family is saved with save_pretrained and loaded through the engine's
own HF-folder loader. The engine's scheduler, batch packing and runner are driven directly,
teacher-forced along a fixed token sequence, so the logits of every computed position can be
compared with transformers': prefill in one pass, chunked prefill across steps, decode steps,
and steps that mix decodes with prompt chunks of other sequences; then greedy generation
through the real engine step, eager and compiled.

The reference is HF's full-sequence forward, except for rope scalings whose frequencies depend
on the forward call (dynamic NTK, longrope): there it is HF fed the same chunks with a KV cache
(see docs/architecture.md, "Rope scaling that depends on the length").

Tolerance: fp32 on both sides, logits of magnitude ~10; we require |ours - hf| <= ATOL + RTOL * |hf|
with ATOL = 1e-4 and RTOL = 1e-5 (observed worst error ~3e-5).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from fastgen_compile.engine import engine as engine_module
from fastgen_compile.engine.batch import pick_bucket
from fastgen_compile.engine.engine import Engine
from fastgen_compile.engine.sequence import Sequence
from fastgen_compile.models import packed
from fastgen_compile.request import SamplingParams
from tiny_llama import VOCAB, one_torch_thread, save_tiny, save_tiny_gguf, tiny_config  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL, RTOL = 1e-4, 1e-5
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# Phi-3's longrope on a rotary half of each head (partial_rotary_factor 0.5: 8 dims, 4 frequencies); the
# long factors take over once a sequence passes 32 tokens
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": 32}


@dataclass(frozen=True)
class Variant:
    model_type: str
    config: dict = field(default_factory=dict)
    context: int = 256
    engine: dict = field(default_factory=dict)  # EngineConfig overrides
    rope_per_call: bool = False  # the rope scaling depends on the forward call: replay HF chunk by chunk


VARIANTS = {
    "llama-default-rope": Variant("llama"),
    "llama-tied-llama3-rope": Variant("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": Variant("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-yarn-rope": Variant("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    # trained context 32, served to 128: the NTK base grows once a sequence passes 32 tokens
    "llama-dynamic-rope": Variant("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 32, {"max_model_len": 128}, True),
    "mistral-window-12": Variant("mistral", {"sliding_window": 12}),  # prompts here run to 75 tokens, pages hold 8
    "qwen2": Variant("qwen2"),
    "phi3-longrope": Variant("phi3", {"partial_rotary_factor": 0.5, "rope_scaling": LONGROPE, "original_max_position_embeddings": 32}, rope_per_call=True),
    "mixtral": Variant("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "opt-pre-norm": Variant("opt", {"do_layer_norm_before": True}),  # OPT-125m's shape
    "opt-post-norm-projected": Variant("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),  # OPT-350m's
}
# decode_rows=0: decodes share the prompt rows (conftest's engines cover a separate decode region)
ENGINE_KW = {"dtype": "float32", "compile": False, "buckets": (16, 32), "decode_rows": 0, "page_size": 8, "q_block": 16, "kv_pages": 32, "max_seqs": 4}

_seq_ids = itertools.count(10_000)  # unique per process, so engines shared between tests never see an id twice


@dataclass
class Tiny:
    hf: PreTrainedModel
    engine: Engine
    variant: Variant


def make_tiny(folder, name: str, seed: int = 0, max_shard_size=None, **engine_kw) -> Tiny:
    v = VARIANTS[name]
    hf = save_tiny(folder, tiny_config(v.model_type, context=v.context, **v.config), seed=seed, max_shard_size=max_shard_size)
    return Tiny(hf, Engine(model=str(folder), **(ENGINE_KW | v.engine | engine_kw)), v)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf: PreTrainedModel, ids: list[int], chunks: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """transformers' logits at every position of `ids`: one forward, or `chunks` (start, tokens)
    replayed in order with a KV cache (a chunk at 0 starts over, as after a preemption)."""
    if chunks is None:
        return hf(torch.tensor([ids])).logits[0].float()
    hf(torch.tensor([ids[:1]]))  # a call within the trained context resets dynamic rope's grown frequencies
    rows: dict[int, torch.Tensor] = {}
    cache = None
    for start, n in chunks:
        cache = DynamicCache(config=hf.config) if start == 0 else cache
        logits = hf(torch.tensor([ids[start : start + n]]), cache=cache, use_cache=True).logits[0].float()
        rows.update((start + i, logits[i]) for i in range(n))
    return torch.stack([rows[p] for p in range(len(rows))])


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
    spilled: int = 0  # prompt tokens in the decode region's free rows
    bucket: int = 0


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
                r.seq = Sequence(next(_seq_ids), r.full[: r.prompt_len], params)
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
        batch = engine.pack(plan, pick_bucket(cfg.buckets, plan))
        # the engine samples the last row of each chunk that reaches its sequence's end
        assert batch.sample_rows.tolist() == [rows[-1] for c, rows in zip(plan.chunks, batch.chunk_rows) if c.samples]
        assert batch.bucket >= plan.num_tokens
        real_rows = torch.from_numpy(np.concatenate(batch.chunk_rows))
        assert len(set(real_rows.tolist())) == plan.num_tokens and int(real_rows.max()) < batch.bucket
        logits = engine.runner.forward(dataclasses.replace(batch, sample_rows=real_rows))
        assert logits.shape == (plan.num_tokens, engine.model.args.vocab_size) and logits.dtype == torch.float32
        engine.scheduler.update(plan)
        samplers = [c.seq for c in plan.chunks if c.samples]
        row = 0
        entry = StepLog([], len(plan.preempted), int((real_rows < cfg.decode_rows).sum()) - plan.num_decode_tokens, batch.bucket)
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
    assert engine.pages.num_free == engine.pages.num_pages - 1
    return log


def chunks_of(r: Request, log: list[StepLog]) -> list[tuple[int, int]]:
    return [(start, n) for step in log for rr, start, n, _ in step.chunks if rr is r]


def assert_matches_hf(tiny: Tiny, r: Request, log: list[StepLog]) -> None:
    positions = sorted(r.logits)
    assert positions == list(range(len(r.full) - 1)), "some position was never computed"
    ref = hf_logits(tiny.hf, r.full, chunks_of(r, log) if tiny.variant.rope_per_call else None)
    got = torch.stack([r.logits[p] for p in positions])
    torch.testing.assert_close(got, ref[positions], atol=ATOL, rtol=RTOL)


def greedy_through_engine_step(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The real path (add_request + step + sampler): each prompt's tokens, and the chunks it was computed in."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    rids = engine.add_requests(prompts, params)
    final, chunks = {}, {rid: [] for rid in rids}
    schedule = engine.scheduler.schedule

    def recording_schedule(now: float = 0.0):
        plan = schedule(now)
        for c in plan.chunks:
            chunks[c.seq.seq_id].append((c.start, c.num_tokens))
        return plan

    engine.scheduler.schedule = recording_schedule
    try:
        for _ in range(200):
            final.update((out.request_id, out) for out in engine.step())
            if not engine.has_work():
                break
    finally:
        del engine.scheduler.schedule
    assert not engine.has_work()
    for rid in rids:
        assert final[rid].finished and final[rid].finish_reason == "length" and len(final[rid].token_ids) == max_new_tokens
    return [(final[rid].token_ids, chunks[rid]) for rid in rids]


def assert_greedy_matches_hf(tiny: Tiny) -> None:
    """Several prompts split and fused in one engine: every greedy token is HF's argmax (up to near-ties)."""
    prompts = [random_ids(n, seed=20 + n) for n in (7, 40, 3)]
    results = greedy_through_engine_step(tiny.engine, prompts, 10)
    assert any(start > 0 and n > 1 for start, n in results[1][1]), "the 40-token prompt was not split"
    for prompt, (tokens, chunks) in zip(prompts, results):
        ref = hf_logits(tiny.hf, prompt + tokens, chunks if tiny.variant.rope_per_call else None)
        for i, tok in enumerate(tokens):
            row = ref[len(prompt) - 1 + i]
            assert row[tok] >= row.max() - 10 * ATOL, f"token {i}: {tok} is not HF's argmax {row.argmax().item()}"


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp(request.param), request.param)


def test_loaded_config_matches(tiny):
    hf, model = tiny.hf, tiny.engine.model
    args = model.args
    kv_heads = getattr(hf.config, "num_key_value_heads", hf.config.num_attention_heads)
    assert (args.vocab_size, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim) == (VOCAB, 64, 2, 4, kv_heads, 16)
    assert args.tie_word_embeddings == hf.config.tie_word_embeddings
    if args.tie_word_embeddings:
        assert model.lm_head is model.embed
    else:
        torch.testing.assert_close(model.lm_head, hf.get_output_embeddings().weight, atol=0, rtol=0)
    torch.testing.assert_close(model.embed, hf.get_input_embeddings().weight, atol=0, rtol=0)


def test_one_shot_prefill(tiny):
    r = Request(random_ids(25, seed=1), prompt_len=24)
    log = drive(tiny.engine, [r])
    assert [(s, n) for _, s, n, _ in log[0].chunks] == [(0, 24)], "the whole prompt should run in one pass"
    assert_matches_hf(tiny, r, log)


def test_several_prompts_packed_in_one_pass(tiny):
    reqs = [Request(random_ids(n + 1, seed=10 + n), prompt_len=n) for n in (8, 10, 13)]  # 31 tokens <= budget 32
    log = drive(tiny.engine, reqs)
    assert [(rr.prompt_len, s, n) for rr, s, n, _ in log[0].chunks] == [(8, 0, 8), (10, 0, 10), (13, 0, 13)]
    for r in reqs:
        assert_matches_hf(tiny, r, log)


def test_chunked_prefill(tiny):
    r = Request(random_ids(76, seed=2), prompt_len=75)
    log = drive(tiny.engine, [r])
    assert [(s, n) for step in log for _, s, n, _ in step.chunks] == [(0, 32), (32, 32), (64, 11)]
    assert_matches_hf(tiny, r, log)


def test_decode_steps_beside_prompt_chunks(tiny):
    """A decodes for 14 steps; B (a 50-token prompt) and C arrive later and are prefilled beside A's decodes."""
    a = Request(random_ids(9 + 14, seed=3), prompt_len=9)
    b = Request(random_ids(50 + 6, seed=4), prompt_len=50, add_at_step=3)
    c = Request(random_ids(5 + 10, seed=5), prompt_len=5, add_at_step=4)
    log = drive(tiny.engine, [a, b, c])
    a_decodes = sum(1 for step in log for rr, _, n, dec in step.chunks if rr is a and dec)
    assert a_decodes == 13  # 14 tokens: the first comes from the prefill pass
    mixed = [step for step in log if any(dec for *_, dec in step.chunks) and any(not dec and n > 1 for *_, n, dec in step.chunks)]
    assert len(mixed) >= 2, "no step mixed decodes with prompt chunks"
    assert any(rr is b and s > 0 for step in log for rr, s, _, _ in step.chunks), "B's prompt was not chunked"
    for r in (a, b, c):
        assert_matches_hf(tiny, r, log)


def test_greedy_generation_through_engine_step(tiny):
    assert_greedy_matches_hf(tiny)


# one compiled engine per family (each compile costs 3-20 s on this CPU): the llama rope variants
# share Llama's graph (cos/sin are inputs); OPT's post-norm variant runs eager only
COMPILED = ["llama-tied-llama3-rope", "mistral-window-12", "qwen2", "phi3-longrope", "mixtral", "opt-pre-norm"]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_matches(name, tmp_path):
    """compile=True (per-bucket torch.compile of the layer with FlexAttention), one bucket:
    prefill + chunk + decodes teacher-forced, then greedy generation of split and fused prompts."""
    tiny = make_tiny(tmp_path, name, compile=True, buckets=(16,), page_size=16)  # (pages of 8: EngineConfig refuses, MIN_CPU_COMPILED_PAGE)
    assert tiny.engine.compiler.warm and tiny.engine.compiler.graphs_compiled == 1
    a = Request(random_ids(12 + 8, seed=11), prompt_len=12)
    b = Request(random_ids(9 + 5, seed=12), prompt_len=9, add_at_step=1)  # 12 + 9 > 16: chunked beside a decode
    log = drive(tiny.engine, [a, b])
    assert any(rr is b and s > 0 for step in log for rr, s, _, _ in step.chunks)
    for r in (a, b):
        assert_matches_hf(tiny, r, log)
    assert_greedy_matches_hf(tiny)
    assert tiny.engine.compiler.recompiles_since_warmup() == 0


def test_sliding_window_lists_only_the_pages_in_reach(tmp_path):
    """Window 12, pages of 8: a decode at position 75 sees 64..75, so its query block lists the page
    of 64..71 whole (no mask_mod), the page of 72..79 partially, and none of the eight before."""
    engine = make_tiny(tmp_path, "mistral-window-12").engine
    engine.add_requests([random_ids(75, seed=40)], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    for _ in range(3):  # the prompt in chunks of 32, 32 and 11; the last samples the first token
        engine.step()
    (seq,) = engine.scheduler.running
    plan = engine.scheduler.schedule()
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(75, 1)]
    lists = engine.pack(plan, pick_bucket(engine.config.buckets, plan)).prompt_blocks
    assert lists.full_num_blocks[0, 0, 0] == 1 and lists.full_indices[0, 0, 0, 0] == seq.page_table[8]
    assert lists.kv_num_blocks[0, 0, 0] == 1 and lists.kv_indices[0, 0, 0, 0] == seq.page_table[9]


@pytest.mark.parametrize("name", ["llama-default-rope", "mixtral", "opt-post-norm-projected"])
def test_sharded_safetensors_folder_loads_and_matches(name, tmp_path):
    tiny = make_tiny(tmp_path, name, seed=7, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() and not (tmp_path / "model.safetensors").exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) >= 3 and all((tmp_path / s).is_file() for s in shards)
    reqs = [Request(random_ids(30 + 5, seed=8), prompt_len=30), Request(random_ids(40 + 3, seed=9), prompt_len=40)]
    log = drive(tiny.engine, reqs)
    for r in reqs:
        assert_matches_hf(tiny, r, log)


@pytest.mark.parametrize("model_type", ["qwen2", "phi3"])  # Llama's GGUF path: the embedded model (test_equality.py)
def test_gguf_loads_like_transformers(model_type, tmp_path):
    """A GGUF file as llama.cpp lays it out (Phi-3's fused tensors, Qwen2's biases and plain q/k
    rows): our logits match transformers' reading of the same file."""
    hf = save_tiny(tmp_path, tiny_config(model_type))
    save_tiny_gguf(tmp_path / "tiny.gguf", hf)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert type(ref) is type(hf)
    tiny = Tiny(ref, Engine(model=str(tmp_path / "tiny.gguf"), **ENGINE_KW), Variant(model_type))
    reqs = [Request(random_ids(40 + 4, seed=13), prompt_len=40), Request(random_ids(9 + 6, seed=14), prompt_len=9, add_at_step=1)]
    log = drive(tiny.engine, reqs)
    for r in reqs:
        assert_matches_hf(tiny, r, log)


def test_checkpoint_tensors_land_in_the_fused_layout(tmp_path):
    """Every HF tensor made it into our fused layout: q/k/v rows, gate/up rows, experts stacked."""
    tiny = make_tiny(tmp_path, "mixtral")
    hf, model = tiny.hf.state_dict(), tiny.engine.model
    q, k, v = model.layers[1].wqkv.split([64, 32, 32])
    torch.testing.assert_close(k, hf["model.layers.1.self_attn.k_proj.weight"], atol=0, rtol=0)
    gate, up = model.layers[0].w_up[2].split(128)  # expert 2
    torch.testing.assert_close(up, hf["model.layers.0.mlp.experts.gate_up_proj"][2, 128:], atol=0, rtol=0)
    torch.testing.assert_close(gate, hf["model.layers.0.mlp.experts.gate_up_proj"][2, :128], atol=0, rtol=0)
    torch.testing.assert_close(model.layers[0].router, hf["model.layers.0.mlp.gate.weight"], atol=0, rtol=0)


def test_logits_match_after_preemption_and_page_reuse(tmp_path):
    tiny = make_tiny(tmp_path, "llama-default-rope", seed=3, kv_pages=11)  # 80 slots: three sequences cannot all fit
    reqs = [
        Request(random_ids(40, seed=21), prompt_len=10),
        Request(random_ids(75, seed=22), prompt_len=70),
        Request(random_ids(30, seed=23), prompt_len=29),
    ]
    log = drive(tiny.engine, reqs)
    assert sum(r.seq.num_preemptions for r in reqs) > 0, "the small pool should force preemption"
    for r in reqs:
        assert_matches_hf(tiny, r, log)


def test_engine_model_has_no_stray_weights(tiny):
    """Every parameter came from the checkpoint (nothing left on the meta device or uninitialised)."""
    for name, p in tiny.engine.model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    assert tiny.engine.model_name == os.path.basename(tiny.engine.config.model)


def test_step_stats_split_prompt_and_decode_tokens(tmp_path):
    engine = make_tiny(tmp_path, "llama-default-rope", seed=4).engine
    engine.add_requests([random_ids(33, seed=30)], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    # 33 prompt tokens over a budget of 32, then two decodes
    assert [(s.prompt_tokens, s.decode_tokens) for s in engine.step_stats] == [(32, 0), (1, 0), (0, 1), (0, 1)]


def test_step_stats_keep_the_newest_steps_and_count_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "STEP_HISTORY", 3)
    engine = make_tiny(tmp_path, "llama-default-rope", seed=4).engine
    engine.add_requests([random_ids(33, seed=30)], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    engine.add_requests([random_ids(5, seed=31)], SamplingParams(max_new_tokens=1, temperature=0))
    engine.step()
    # the budget of 32 held only the first prompt's first 32 tokens (4 pages of 8); the second prompt waits
    snap = engine.snapshot()
    assert (snap.running, snap.waiting, snap.pages_used, snap.pages_free) == (1, 1, 4, engine.pages.num_pages - 1 - 4)
    while engine.has_work():
        engine.step()
    # steps: 32 prompt tokens; the last one fused with the 5-token prompt (which ends with its one token); two decodes.
    # The oldest is no longer kept
    assert engine.num_steps == 4
    assert [(s.prompt_tokens, s.decode_tokens) for s in engine.step_stats] == [(6, 0), (0, 1), (0, 1)]
    assert engine.steps_since(0) == list(engine.step_stats)
    assert engine.steps_since(2) == list(engine.step_stats)[1:]
    assert engine.steps_since(4) == []
    snap = engine.snapshot(recent_steps=2)
    assert snap.recent_steps == list(engine.step_stats)[1:] and snap.num_steps == 4
    assert (snap.running, snap.waiting, snap.pages_used, snap.pages_free) == (0, 0, 0, engine.pages.num_pages - 1)


@pytest.mark.skipif(not packed.available(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN with bf16 support on this CPU")
def test_packed_linears_give_the_plain_linears_logits(tmp_path):
    """bf16 on CPU runs the linears on weights packed once for oneDNN (models/packed.py): the
    same logits as F.linear's engine up to bf16 rounding, on a prefill, a chunk and decodes."""
    ids = random_ids(40, seed=21)
    logits = {}
    for kernel in ("aten", "onednn"):
        tiny = make_tiny(tmp_path / kernel, "llama-default-rope", dtype="bfloat16", linear_kernel=kernel)
        assert {k for by_rows in tiny.engine.runner.kernels.record.choices.values() for k in by_rows.values()} == {kernel}
        r = Request(ids, prompt_len=20)
        drive(tiny.engine, [r])
        logits[kernel] = torch.stack([r.logits[p] for p in sorted(r.logits)])
    # observed: identical (oneDNN computes both); a wrong or stale packed weight is off by ~10
    torch.testing.assert_close(logits["onednn"], logits["aten"], atol=0.25, rtol=0.02)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "flex"])
@pytest.mark.parametrize("name", ["llama-default-rope", "mistral-window-12"])
def test_decode_region_matches(name, kernel, tmp_path):
    """A decode region: decode rows, and the prompt tokens that spill into the rows decodes leave
    free, attend through kernels/paged_decode.cpp (page tables; CPU) or FlexAttention's 1-row
    blocks (CUDA, or where the kernel cannot be built), beside prompt chunks on FlexAttention;
    bucket 4 is decode rows only (a step of a few decodes)."""
    tiny = make_tiny(tmp_path, name, buckets=(4, 8, 24), decode_rows=8, decode_kernel=kernel)
    if kernel and not tiny.engine.runner.decode_table:
        pytest.skip("no C++ compiler for the CPU kernel")
    assert bool(tiny.engine.runner.decode_table) is kernel
    a = Request(random_ids(30 + 40, seed=31), prompt_len=30)  # decodes past the window of 12, over pages of 8
    b = Request(random_ids(20 + 6, seed=32), prompt_len=20, add_at_step=3)  # its chunks run beside a's decodes
    log = drive(tiny.engine, [a, b])
    assert any(decode for step in log for _, _, _, decode in step.chunks) and any(len(step.chunks) > 1 for step in log)
    assert any(step.spilled for step in log)  # a's first 24 tokens: 16 prompt rows + 8 decode rows
    assert {step.bucket for step in log} == {4, 8, 24}
    for r in (a, b):
        assert_matches_hf(tiny, r, log)
