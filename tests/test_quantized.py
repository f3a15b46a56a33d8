"""Weight-only quantized linears (models/quantize.py) and the kernel choice (models/linears.py):
the kernels compute the dequantized model, Q4_1's codes survive, the choice is kept with the graphs
under the CPU's key, and an int4 engine is held token for token against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.config import EngineConfig
from fastgen_compile.engine import graph_cache
from fastgen_compile.engine.graph_cache import GraphCache
from fastgen_compile.errors import ConfigError
from fastgen_compile.models import linears
from fastgen_compile.models.loader import embedded_model_path
from fastgen_compile.models.quantize import GROUP, dequantize, int4_groups, int8_rows, quantize_weight
from tiny_llama import one_torch_thread, save_tiny_llama  # noqa: F401 - fixture

BUCKETS = (1, 2, 4, 16, 48)


def weight(out: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(out, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_quantized_kernel_computes_the_dequantized_weight(method, rows):
    w = weight(96, 128, seed=0)
    q = quantize_weight(w, method)  # w now holds the dequantized values
    assert q.dense is w
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    exact, bf16 = linears.KERNELS[method].fn, linears.KERNELS[f"{method}-bf16"].fn
    reference = F.linear(x, w)
    assert relative_error(exact(x, q, None), reference) < 1e-5  # fp32 activations: the dequantized model, to rounding
    assert relative_error(bf16(x, q, None), reference) < 1e-2  # bf16 activations: bf16's own rounding (~0.4%)
    bias = torch.randn(96)
    torch.testing.assert_close(exact(x, q, bias), reference + bias, rtol=1e-4, atol=1e-4)


def test_int4_is_q4_1_in_groups_of_32():
    """Quantized again, weights made from Q4_1 blocks (w = d * q + m) give back their codes, d and m."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 4 * GROUP), generator=g, dtype=torch.int32)
    codes[:, ::GROUP], codes[:, 1::GROUP] = 0, 15  # Q4_1's quantizer puts each group's min and max at 0 and 15
    d, m = torch.rand(8, 4, generator=g) * 0.01 + 1e-3, torch.randn(8, 4, generator=g) * 0.05
    w = (codes.view(8, 4, GROUP).float() * d[..., None] + m[..., None]).view(8, -1)
    got, scale, zero = int4_groups(w)
    assert torch.equal(got, codes)
    torch.testing.assert_close(scale, d)
    torch.testing.assert_close(zero, m + 8 * d)
    torch.testing.assert_close(dequantize(got, scale, zero), w)


def test_the_embedded_q4_1_file_keeps_its_codes():
    """On the shipped file itself: gguf's dequantized blk.0.ffn_gate.weight, quantized again, has the file's 4-bit codes."""
    import gguf

    reader = gguf.GGUFReader(embedded_model_path())
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    assert t.tensor_type.name == "Q4_1"
    blocks = np.asarray(t.data).reshape(-1, 20)  # Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles (low: values 0-15, high: 16-31)
    nibbles = blocks[:, 4:]
    file_codes = torch.from_numpy(np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1).astype(np.int32))
    dense = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    codes, _, _ = int4_groups(dense)
    assert torch.equal(codes.view(-1, GROUP), file_codes)


def test_int8_is_per_channel():
    w = weight(16, 64, seed=3)
    codes, scale = int8_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (16,)
    assert codes.abs().amax(dim=1).eq(127).all()  # each row's largest weight takes the whole range
    assert (dequantize(codes, scale, None) - w).abs().max() <= scale.max() / 2 + 1e-7


def test_the_record_picks_the_smallest_measured_row_count_holding_the_rows():
    record = linears.KernelRecord({"96x128": {1: "int4", 4: "onednn", 16: "aten"}}, {})
    w = weight(96, 128, seed=0)
    assert [record.kernel(w, r) for r in (1, 2, 4, 5, 16, 300)] == ["int4", "onednn", "onednn", "aten", "aten", "aten"]
    assert record.kernel(weight(8, 128, seed=0), 1) == "aten"  # a shape never measured
    assert linears.KernelRecord.from_json(record.to_json()) == record  # through JSON (row counts come back as ints)


def test_measure_keeps_the_fastest_candidate_per_shape_and_rows(tiny_engine):
    record = linears.measure(tiny_engine.engine.model, [1, 16], torch.device("cpu"), torch.float32, bf16_activations=True)
    for shape, by_rows in record.micros.items():
        assert set(by_rows[1]) == {"aten", "int4", "int4-bf16"}  # every candidate at the smallest row count
        for rows, found in by_rows.items():
            assert record.choices[shape][rows] == min(found, key=found.get)
        dropped = set(by_rows[1]) - set(by_rows[16])
        assert all(by_rows[1][k] >= linears.DROP_BEHIND * min(by_rows[1].values()) for k in dropped)  # only the far-behind ones


def test_the_record_is_kept_with_the_graphs_and_not_reused_on_another_cpu(tmp_path, monkeypatch):
    def cache() -> GraphCache:
        return GraphCache(tmp_path, "m", {"capability": graph_cache.device_capability(torch.device("cpu"))}).open()

    first = cache()
    assert first.record(linears.RECORD) is None
    first.save_record(linears.RECORD, {"choices": {"8x32": {"1": "int4"}}})
    first.save([])
    assert cache().record(linears.RECORD) == {"choices": {"8x32": {"1": "int4"}}}  # a warm start reads it
    monkeypatch.setattr(graph_cache, "cpu_flags", lambda: frozenset({"avx2"}))  # another kind of CPU
    other = cache()
    assert other.folder != first.folder and other.record(linears.RECORD) is None


def test_a_forced_kernel_needs_its_weights():
    with pytest.raises(ConfigError, match="needs quantization='int4'"):
        EngineConfig(linear_kernel="int4", quantization="none")
    with pytest.raises(ConfigError, match="onednn runs bf16"):
        EngineConfig(linear_kernel="onednn", dtype="float32")
    with pytest.raises(ConfigError, match="quantization must be"):
        EngineConfig(quantization="int3")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-int4")
    hf = save_tiny_llama(folder, context=256)
    return folder, hf


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    folder, _ = tiny_dir
    # forced int4 with fp32 activations: the exact int4 path, in every bucket, decode buckets of 1, 2 and 4 rows
    with LLM(model=str(folder), dtype="float32", quantization="int4", linear_kernel="int4", buckets=BUCKETS, decode_rows=16, page_size=16,
             q_block=16, kv_pages=64, max_seqs=8, strict_recompiles=True) as llm:
        yield llm


def test_an_int4_engine_equals_transformers_on_the_dequantized_weights(tiny_dir, tiny_engine):
    folder, hf = tiny_dir
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed" not in name:  # every linear and lm_head, not the (untied) embedding
                codes, scale, zero = int4_groups(p)
                p.copy_(dequantize(codes, scale, zero))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 37, 70)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    engine = tiny_engine.engine
    assert engine.quantization == {"layers": "int4", "lm_head": "int4"}
    assert all(k == "int4" for by_rows in engine.runner.kernels.record.choices.values() for k in by_rows.values())
    for batch in ([prompts[0]], prompts[:2], prompts):  # 1, 2 and 3 decodes: the small decode buckets
        outs = tiny_engine.generate(prompt_token_ids=batch, sampling_params=params)
        for prompt, out in zip(batch, outs):
            ids = torch.tensor([prompt])
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
            assert out.token_ids == want
    used = {s.bucket for s in engine.step_stats}
    assert {1, 2, 4} <= used  # the decode steps ran in the small buckets
    assert engine.compiler.recompiles_since_warmup() == 0
