"""Persisted graphs: a fresh process with a warm cache compiles nothing, and a stale, partial
or corrupt cache is reported in one line and rebuilt without changing any output."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgen_compile.artifacts import problem, write_manifest
from fastgen_compile.config import EngineConfig, coarse
from fastgen_compile.engine.graph_cache import GraphCache
from tiny_llama import one_torch_thread, save_tiny_llama  # noqa: F401 (autouse fixture)

# one bucket of a 2-layer model keeps each cold compile short; decode_rows=0: decodes share its rows
KNOBS = dict(dtype="float32", buckets=[16], decode_rows=0, page_size=16, q_block=16, kv_pages=32, max_seqs=4)
CLI_KNOBS = ["--dtype", "float32", "--buckets", "16", "--decode-rows", "0", "--page-size", "16", "--q-block", "16", "--kv-pages", "32"]
PROMPTS = [[5, 17, 99, 300, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]
NEW_TOKENS = 6

SERVE = """
import json, sys
from torch._dynamo.utils import counters
from fastgen_compile import LLM, SamplingParams
knobs, prompts, new_tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
with LLM(**knobs) as llm:
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    print(json.dumps({"tokens": [o.token_ids for o in outs], "inductor": counters["inductor"], "aot_autograd": counters["aot_autograd"],
                      "dynamo": counters["stats"], "compiled": llm.engine.compiler.graphs_compiled,
                      "warmups": [[w.bucket, w.cache] for w in llm.engine.compiler.warmups],
                      "folder": str(llm.engine.compiler.graph_cache.folder), "fields": llm.engine.compiler.graph_cache.fields}))
"""


def run(args: list[str], graphs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTGEN_GRAPHS_DIR": graphs}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def serve(model: str, graphs: str, **knobs) -> tuple[dict, str]:
    proc = run(["-c", SERVE, json.dumps(KNOBS | {"model": model} | knobs), json.dumps(PROMPTS), str(NEW_TOKENS)], graphs)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """`fastgen-compile warmup` of a tiny Llama in a fresh process, and HF's greedy tokens for PROMPTS."""
    folder = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_llama(folder, seed=4)
    graphs = str(tmp_path_factory.mktemp("graphs"))
    proc = run(["-m", "fastgen_compile.cli", "warmup", "--model", str(folder), *CLI_KNOBS], graphs)
    with torch.no_grad():
        reference = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS]
    return str(folder), graphs, proc.stdout, reference


def test_warmup_command_compiles_and_saves_with_a_manifest(warmed):
    model, graphs, stdout, _ = warmed
    assert "miss" in stdout and "hit" not in stdout  # the summary table: bucket 16 was compiled
    (key,) = [d for d in os.listdir(graphs) if d != "models" and not d.endswith(".lock")]  # a key folder's lock lies beside it
    manifest = json.loads(open(os.path.join(graphs, key, "manifest.json")).read())
    assert key in stdout.replace("\n", "") and "KV pool: 32 pages of 16 tokens\n" in stdout
    assert [(c["bucket"], c["cache"]) for c in manifest["compiled"]] == [(16, "miss")]
    fields = manifest["fields"]
    assert (fields["buckets"], fields["page_size"], fields["decode_rows"], fields["q_block"], fields["kv_pages"]) == ([16], 16, 0, 16, 32)
    assert fields["torch"] == torch.__version__ and fields["dtype"] == "float32" and fields["device"] == "cpu"
    assert any(name.startswith("inductor/") for name in manifest["files"]) and "precompiled/16.bin" in manifest["files"]
    # a CPU graph's wrapper is C++ (inductor's cpp_wrapper), without per-call size checks
    assert fields["inductor_options"] == {"size_asserts": False, "cpp_wrapper": True}
    sources = {name: (Path(graphs) / key / name).read_text() for name in manifest["files"] if name.endswith((".py", ".cpp"))}
    assert any("inductor_entry_impl" in text for name, text in sources.items() if name.endswith(".cpp"))
    assert not any("assert_size_stride" in text for text in sources.values())


def test_fresh_process_with_a_warm_cache_compiles_nothing(warmed):
    model, graphs, _, reference = warmed
    result, stderr = serve(model, graphs)
    # the precompiled graph loaded: dynamo traced nothing, inductor compiled nothing
    assert result["warmups"] == [[16, "hit"]] and result["compiled"] == 0
    assert result["dynamo"].get("unique_graphs", 0) == 0 and result["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert result["tokens"] == reference
    assert "unusable" not in stderr


def test_a_pool_sized_from_memory_takes_the_warmed_size_near_it(warmed):
    """A budget of 40 pages: the folder `warmup` left at 32 (within half and 1.5x of it) serves, compiling nothing."""
    model, graphs, _, reference = warmed
    cfg = json.loads(Path(model, "config.json").read_text())  # fp32 K and V of every layer's KV heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
    result, _ = serve(model, graphs, kv_pages=None, kv_bytes=40 * 16 * per_token)
    assert result["fields"]["kv_pages"] == 32 and result["warmups"] == [[16, "hit"]] and result["compiled"] == 0
    assert result["tokens"] == reference


def test_a_corrupt_artifact_is_reported_in_one_line_and_rebuilt_with_identical_outputs(warmed):
    model, graphs, _, reference = warmed
    (key,) = [d for d in os.listdir(graphs) if d != "models" and not d.endswith(".lock")]  # a key folder's lock lies beside it
    manifest = json.loads(open(os.path.join(graphs, key, "manifest.json")).read())
    # the biggest artifact (a built kernel library): same size, other bytes, so only its checksum can tell
    name = max((n for n in manifest["files"] if n.startswith("inductor/")), key=lambda n: manifest["files"][n][0])
    path = os.path.join(graphs, key, name)
    with open(path, "r+b") as f:
        f.seek(manifest["files"][name][0] // 2)
        f.write(b"\xde\xad\xbe\xef" * 16)
    result, stderr = serve(model, graphs, warmup=False)  # compiled again on first use, and saved then
    reports = [line for line in stderr.splitlines() if "unusable" in line]
    assert len(reports) == 1 and f"corrupt: {name} does not match its checksum" in reports[0] and "rebuilding" in reports[0]
    assert result["compiled"] == 1 and result["warmups"] == [[16, "miss"]]  # compiled again
    assert result["tokens"] == reference
    assert problem(Path(graphs, key), result["fields"]) is None  # saved afresh


def test_partial_stale_and_corrupt_folders_are_told_apart(tmp_path, caplog):
    fields = {"format": 1, "model": "m", "buckets": [16], "rope_scaling": (("factor", 8.0),)}
    folder = tmp_path / "key"
    (folder / "inductor").mkdir(parents=True)
    (folder / "inductor" / "graph.py").write_text("print('compiled')\n")
    assert problem(folder, fields) == "partial: no manifest (an interrupted compile?)"
    write_manifest(folder, fields)
    assert problem(folder, fields) is None
    assert problem(folder, fields | {"buckets": [16, 32]}) == "stale: its key fields differ from this engine's"
    (folder / "inductor" / "graph.py").write_text("print('compiled')\n\n")
    assert problem(folder, fields) == "partial: inductor/graph.py is missing or has the wrong size"
    (folder / "inductor" / "graph.py").write_text("print('COMPILED')\n")
    assert problem(folder, fields) == "corrupt: inductor/graph.py does not match its checksum"
    (folder / "manifest.json").write_text('{"format": 1, "fie')
    assert problem(folder, fields).startswith("corrupt manifest")


def test_an_unusable_folder_is_logged_once_and_wiped(tmp_path, caplog):
    cache = GraphCache(tmp_path, "m", {"x": 1}).open()
    cache.folder.mkdir(parents=True)
    (cache.folder / "leftover.py").write_text("half a graph")
    with caplog.at_level(logging.WARNING, logger="fastgen_compile.graphs"):
        again = GraphCache(tmp_path, "m", {"x": 1}).open()
    assert not again.loaded and not again.folder.exists()
    (record,) = caplog.records
    assert record.getMessage() == f"the compiled-graph cache in {again.folder} is unusable (partial: no manifest (an interrupted compile?)); rebuilding it"


@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 9, 15, 16, 690, 1000, 4097])
def test_pool_pages_from_free_memory_are_rounded_to_a_coarse_step(n):
    c = coarse(n)
    assert c <= n and c > 0.75 * n - 1
    mantissa = c >> max(c.bit_length() - 3, 0)
    assert c < 8 or (4 <= mantissa <= 7 and c == mantissa << (c.bit_length() - 3))
    assert coarse(c) == c and all(coarse(m) == c for m in range(c, n + 1))


def test_a_pool_sized_from_memory_prefers_a_warmed_size_near_its_share():
    c = EngineConfig(kv_bytes=1000 * 64 * 10, page_size=64, max_seqs=64)  # 1000 pages of 10-byte tokens
    assert c.num_pages(10, 8192) == coarse(1000) == 896
    assert c.num_pages(10, 8192, warmed=[512, 1024, 3000]) == 1024  # the nearest within half and 1.5x
    assert c.num_pages(10, 8192, warmed=[499, 1501]) == 896  # none near: sized afresh
    assert c.num_pages(10, 8192, warmed=[600]) == 600
    assert c.num_pages(10, 640, warmed=[700]) == 10 * 64 + 1  # never past max_seqs full sequences
    assert EngineConfig(kv_pages=77).num_pages(10, 8192, warmed=[1000]) == 77  # a size given is kept


def test_a_warmed_pool_size_is_found_only_where_nothing_else_differs(tmp_path):
    fields = {"model": "m", "buckets": [16], "kv_pages": 448}
    for changed in ({}, {"kv_pages": 512, "buckets": [32]}, {"kv_pages": 640}):
        cache = GraphCache(tmp_path, "m-float32-cpu", fields | changed)
        cache.folder.mkdir()
        if changed.get("kv_pages") != 640:  # that one unfinished: no manifest
            cache.save([])
    assert GraphCache(tmp_path, "m-float32-cpu", fields | {"kv_pages": 0}).warmed_pool_sizes() == [448]


def test_the_key_covers_every_knob_that_changes_the_graphs(tmp_path):
    from fastgen_compile.models.decoder import ModelArgs
    from fastgen_compile.models.rope import RopeArgs

    rope = RopeArgs(theta=10000.0, dim=16, kind="default", params=(), max_position_embeddings=256)
    args = ModelArgs(512, 64, 128, 2, 4, 2, 16, 1e-5, 256, False, rope)
    base = dict(dtype="float32", buckets=(16, 48), decode_rows=16, page_size=16, q_block=16)

    def folder(pages: int = 32, model_files=(("model.safetensors", 10, 1),), model_args=args, decode_kernel=True, quantized=None, prefix_caching=True,
               **knobs):
        config = EngineConfig(**(base | knobs))
        return GraphCache.for_engine(tmp_path, "tiny", list(model_files), model_args, config, pages, decode_kernel, quantized or {},
                                     prefix_caching).folder

    same = folder()
    assert folder(max_seqs=3) == same and folder(policy="prefill_first") == same and folder(max_model_len=100) == same
    changed = [
        folder(pages=64),
        folder(model_files=(("model.safetensors", 10, 2),)),
        folder(model_args=dataclasses.replace(args, rope=dataclasses.replace(rope, theta=5e5))),
        folder(dtype="bfloat16"),
        folder(kv_dtype="bfloat16"),
        folder(buckets=(16, 32)),
        folder(decode_rows=0),
        folder(page_size=32),
        folder(q_block=32, buckets=(16, 48)),
        folder(decode_kernel=False),  # asked for but not built: decode rows run FlexAttention
        folder(quantized={"layers": "int4"}),  # what was quantized, not the knob: auto follows the checkpoint
        folder(linear_kernel="aten"),
        folder(prefix_caching=False),  # the engine's decision (off for sliding windows): the mask reads cached pages or not
    ]
    assert len({same, *changed}) == len(changed) + 1


HOLDER = """
import sys, time
from fastgen_compile.engine.graph_cache import GraphCache
cache = GraphCache(sys.argv[1], "m", {"x": 1})
with cache.exclusive():
    cache.open()
    cache.folder.mkdir(parents=True)
    (cache.folder / "graph.py").write_text("compiled")  # mid-compile: no manifest yet
    print("holding", flush=True)
    time.sleep(1.5)
    cache.save([])
"""


def test_a_second_process_waits_for_the_first_to_build_the_folder_then_loads_it(tmp_path):
    """Replicas on one machine warming one key: without the lock the second would wipe the first's partial folder."""
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "holding\n"
        second = GraphCache(tmp_path, "m", {"x": 1})
        with second.exclusive():
            second.open()
        assert second.loaded and (second.folder / "graph.py").read_text() == "compiled"
    finally:
        first.kill()
        first.wait()
