"""Offline throughput: transformers' continuous batching vs fastgen-compile, same model,
dtype and workload, in one run. Prints a table and writes JSON.

    .venv/bin/python tools/bench_throughput.py [--requests 32] [--min-prompt 64] [--max-prompt 512] [--new-tokens 64] [--repeat 3]

This shared 2-core machine drifts by 10-15% between minutes: --repeat alternates the systems
and takes each one's median run, so a drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch
from rich.console import Console
from rich.table import Table

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.bench.systems import transformers_source
from fastgen_compile.bench.workload import prompts_of_lengths
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.hardware import resolve_dtype


def run_fastgen(prompts: list[list[int]], new_tokens: int, args) -> dict:
    t0 = time.perf_counter()
    llm = LLM(**engine_overrides(args))
    ready = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_new_tokens=2, temperature=0.0))  # warm caches
    first_step = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t0
    stats = llm.engine.steps_since(first_step)
    llm.close()
    return {
        "seconds": seconds,
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "ready_seconds": ready,
        "steps": len(stats),
        "mean_tokens_per_step": sum(s.decode_tokens + s.prompt_tokens for s in stats) / max(1, len(stats)),
        "mixed_steps": sum(1 for s in stats if s.decode_tokens and s.prompt_tokens),
        "bucket_use": {b: sum(1 for s in stats if s.bucket == b) for b in sorted({s.bucket for s in stats})},
    }


def run_transformers(prompts: list[list[int]], new_tokens: int, args) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder, kwargs = transformers_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, resolve_dtype(args.dtype, args.device)), **kwargs).eval()
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                              pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))  # warm
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=config)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output_tokens": sum(len(o.generated_tokens) for o in outs.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    add_engine_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="run both systems this many times, alternating, and report each one's median run")
    p.add_argument("--out", default="bench_results/throughput.json")
    args = p.parse_args()

    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.requests)]
    from transformers import AutoTokenizer

    folder, kwargs = transformers_source(args.model)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    prompts = prompts_of_lengths(tok, lengths, args.seed)

    runs: dict[str, list[dict]] = {"fastgen": [], "transformers CB": []}
    for _ in range(args.repeat):  # alternating, so a drift of the machine's speed hits both systems
        runs["fastgen"].append(run_fastgen(prompts, args.new_tokens, args))
        if not args.skip_transformers:
            runs["transformers CB"].append(run_transformers(prompts, args.new_tokens, args))
    median = {name: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for name, rs in runs.items() if rs}
    results = {name: r | {"all_seconds": [run["seconds"] for run in runs[name]]} for name, r in median.items()}
    prompt_tokens = sum(lengths)
    base = results.get("transformers CB")
    dtype = resolve_dtype(args.dtype, args.device)
    workload = f"{args.requests} requests, prompts {args.min_prompt}..{args.max_prompt} tokens, {args.new_tokens} new, {dtype}, greedy"
    table = Table(title=workload + (f", median of {args.repeat} alternating runs" if args.repeat > 1 else ""))
    for col in ("system", "seconds", "requests/s", "output tok/s", "total tok/s", "x transformers"):
        table.add_column(col, justify="right")
    for r in results.values():
        r["requests_per_s"] = args.requests / r["seconds"]
        r["output_tok_per_s"] = r["output_tokens"] / r["seconds"]
        r["total_tok_per_s"] = (r["output_tokens"] + prompt_tokens) / r["seconds"]
    for name, r in results.items():
        ratio = r["output_tok_per_s"] / base["output_tok_per_s"] if base else float("nan")
        r["ratio_vs_transformers"] = ratio
        table.add_row(name, f"{r['seconds']:.1f}", f"{r['requests_per_s']:.2f}", f"{r['output_tok_per_s']:.1f}", f"{r['total_tok_per_s']:.1f}", f"{ratio:.2f}")
    Console().print(table)
    settings = vars(args) | {"prompt_tokens": prompt_tokens, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                             "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
