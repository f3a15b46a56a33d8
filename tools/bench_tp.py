"""Tensor parallelism on this machine: TP=1 against TP=N on the embedded model, each in a fresh process.

For each: the step time of every bucket (empty, as warmup measures it for the step costs), one
greedy stream's decode rate, a batch of requests' throughput and its median step time per bucket,
and the bytes rank 0 moves per step through the collectives: the step's broadcast (header and the
bucket's packed inputs), the layers' all-reduces (two per layer: attention output, MLP output, each
bucket x hidden in the compute dtype), the embedding's all-reduce and the lm_head's all-gather of
the sampled rows' logits. These are payloads per rank; gloo's ring all-reduce sends about 2(N-1)/N
of a payload per rank.

    PYTHONPATH=src .venv/bin/python tools/bench_tp.py [--tp 2] [--requests 16] [--graphs-dir DIR] [--dtype float32]

Writes bench_results/tp/tp.json. On 2 cores TP=2 gives each rank one core: it shows the cost of
the communication more than any gain.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

from fastgen_compile.bench.systems import in_subprocess
from fastgen_compile.corpus import corpus, random_slices

STREAM_TOKENS = 64


def collective_bytes(engine, bucket: int, sampled: int) -> dict[str, int]:
    """Payload bytes of one step's collectives on rank 0 (see the module's docstring)."""
    tp, args, c = engine.tp, engine.model.args, engine.config
    if tp is None:
        return {}
    hidden = c.torch_dtype.itemsize * bucket * args.hidden_size
    rows = args.vocab_shard[1]  # each rank's vocabulary rows
    return {
        "broadcast": tp.header.numel() * tp.header.element_size() + tp.wires[bucket].buffer.numel(),
        "layer_all_reduces": 2 * args.num_layers * hidden,
        "embed_all_reduce": hidden,
        "logits_all_gather": sampled * rows * tp.world * c.torch_dtype.itemsize,
    }


def measure(tp: int, requests: int, engine_kw: dict) -> dict:
    from fastgen_compile import LLM, SamplingParams
    from fastgen_compile.hardware import machine

    t0 = time.perf_counter()
    with LLM(tensor_parallel_size=tp, **engine_kw) as llm:
        ready = time.perf_counter() - t0
        engine, tokenizer = llm.engine, llm.tokenizer
        greedy = SamplingParams(max_new_tokens=STREAM_TOKENS, temperature=0, ignore_eos=True)
        stamps = [time.perf_counter() for _ in llm.stream("Tell me about the sea.", greedy)]
        stream_rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])

        rng = random.Random(0)
        prompts = random_slices(tokenizer.encode(corpus()), [rng.randint(64, 512) for _ in range(requests)], rng)
        params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
        first = engine.num_steps
        t1 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - t1
        steps = engine.steps_since(first)
        by_bucket: dict[int, list[float]] = defaultdict(list)
        for s in steps:
            by_bucket[s.bucket].append(s.seconds)
        generated = sum(len(o.token_ids) for o in outs)
        decode_bucket = min(b for b in engine.config.buckets if b >= min(requests, engine.config.decode_rows))
        return {
            "tensor_parallel_size": tp,
            "machine": machine(),
            "dtype": engine.config.dtype,
            "ready_seconds": round(ready, 1),
            "empty_step_ms": {b: round(1e3 * s, 2) for b, s in engine.step_costs.bucket_seconds.items()},
            "stream_tok_s": round(stream_rate, 1),
            "batch": {"requests": requests, "seconds": round(seconds, 2), "output_tok_s": round(generated / seconds, 1),
                      "tok_s_with_prompts": round((generated + sum(map(len, prompts))) / seconds, 1), "steps": len(steps),
                      "median_step_ms": {b: round(1e3 * statistics.median(v), 1) for b, v in sorted(by_bucket.items())}},
            # per step: a decode step of the batch (one sampled row per sequence), and the largest bucket full of prompt
            "collective_bytes": {f"bucket {b}": collective_bytes(engine, b, sampled) for b, sampled in
                                 ((1, 1), (decode_bucket, min(requests, decode_bucket)), (max(engine.config.buckets), 1))},
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="the tensor-parallel size compared with 1")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--graphs-dir", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="bench_results/tp/tp.json")
    args = p.parse_args()
    engine_kw = {"dtype": args.dtype, "graphs_dir": args.graphs_dir}
    results = [in_subprocess(measure, tp, args.requests, engine_kw) for tp in (1, args.tp)]
    for r in results:
        print(json.dumps(r, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    one, many = results
    print(f"\nTP={args.tp} against TP=1 on {one['machine']} ({one['dtype']}): stream {many['stream_tok_s']} vs {one['stream_tok_s']} tok/s, "
          f"batch {many['batch']['output_tok_s']} vs {one['batch']['output_tok_s']} output tok/s")


if __name__ == "__main__":
    main()
