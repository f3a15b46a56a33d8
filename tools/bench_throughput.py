"""Offline throughput: fastgen-compile with the given settings (default: the defaults) and in the
other dtypes, transformers' continuous batching in each dtype (the faster is the baseline; a dtype
whose measured matmul roof is under half the best's is skipped), and
llama.cpp (llama-cpp-python, when installed; one sequence at a time) on the same workload, in one
run. Prints a table with each row's share of the machine's compute roof and writes JSON.

    .venv/bin/python tools/bench_throughput.py [--requests 32] [--min-prompt 64] [--max-prompt 512] [--new-tokens 64] [--repeat 3]

This shared 2-core machine drifts by 10-15% between minutes: --repeat alternates the systems
and takes each one's median run, so a drift hits all of them. The roof is the faster dtype's
measured large-matmul rate; a row's share counts its linears' FLOPs (2 x weights per token, the
lm_head on sampled tokens only) against it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.bench.systems import LlamaCppSystem, in_subprocess, transformers_source
from fastgen_compile.bench.workload import Request, prompts_of_lengths
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.hardware import machine, resolve_dtype
from fastgen_compile.models.loader import embedded_model_path

DTYPES = ("float32", "bfloat16")


def peak_flops(dtype: str, seconds: float = 1.0) -> float:
    """This machine's large-matmul rate in dtype (FLOP/s), the best of repeated 2048^3 products."""
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def run_fastgen(prompts: list[list[int]], new_tokens: int, args, **settings) -> dict:
    t0 = time.perf_counter()
    llm = LLM(**{**engine_overrides(args), **settings})
    ready = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_new_tokens=2, temperature=0.0))  # warm caches
    first_step = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    seconds = time.perf_counter() - t0
    stats = llm.engine.steps_since(first_step)
    engine = llm.engine
    llm.close()
    return {
        "dtype": engine.config.dtype,
        "quantization": engine.quantization,
        "seconds": seconds,
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "ready_seconds": ready,
        "steps": len(stats),
        "mean_tokens_per_step": sum(s.decode_tokens + s.prompt_tokens for s in stats) / max(1, len(stats)),
        "mixed_steps": sum(1 for s in stats if s.decode_tokens and s.prompt_tokens),
        "bucket_use": {b: sum(1 for s in stats if s.bucket == b) for b in sorted({s.bucket for s in stats})},
    }


def run_transformers(prompts: list[list[int]], new_tokens: int, args, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder, kwargs = transformers_source(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                              pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))  # warm
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=config)
        seconds = time.perf_counter() - t0
    return {"dtype": dtype, "seconds": seconds, "output_tokens": sum(len(o.generated_tokens) for o in outs.values())}


def run_llama_cpp(prompts: list[list[int]], new_tokens: int, args) -> dict:
    """One request after another: llama-cpp-python decodes one sequence at a time."""
    llama = LlamaCppSystem(args.model, torch.get_num_threads())
    list(llama.stream(Request(prompts[0][:16], 2)))  # warm
    t0 = time.perf_counter()
    tokens = sum(sum(llama.stream(Request(p, new_tokens))) for p in prompts)
    seconds = time.perf_counter() - t0
    llama.close()
    return {"dtype": "gguf", "seconds": seconds, "output_tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    add_engine_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--other-dtypes", nargs="*", choices=DTYPES, help="fastgen-compile also in these dtypes (default: the dtypes the settings do not use)")
    p.add_argument("--repeat", type=int, default=1, help="run both systems this many times, alternating, and report each one's median run")
    p.add_argument("--out", default="bench_results/throughput.json")
    args = p.parse_args()

    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.requests)]
    from transformers import AutoTokenizer

    folder, kwargs = transformers_source(args.model)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    prompts = prompts_of_lengths(tok, lengths, args.seed)

    default_dtype = resolve_dtype(args.dtype, args.device)
    roofs = {d: in_subprocess(peak_flops, d) for d in DTYPES}
    roof_dtype = max(roofs, key=roofs.get)
    # a dtype whose matmuls run at a fraction of the best (bf16 emulated on a CPU without bf16
    # instructions: 1 GFLOP/s against 144 in fp32) would take an hour and win nothing
    usable = [d for d in DTYPES if roofs[d] >= 0.5 * roofs[roof_dtype]]
    for d in sorted(set(DTYPES) - set(usable)):
        print(f"{d}: skipped by default (its matmul roof here is {roofs[d] / 1e9:.2g} GFLOP/s against {roof_dtype}'s {roofs[roof_dtype] / 1e9:.0f})")
    other = args.other_dtypes if args.other_dtypes is not None else [d for d in usable if d != default_dtype]
    systems = {"fastgen": lambda: run_fastgen(prompts, args.new_tokens, args)}
    systems |= {f"fastgen {d}": (lambda d=d: run_fastgen(prompts, args.new_tokens, args, dtype=d)) for d in other}
    if not args.skip_transformers:
        systems |= {f"transformers CB {d}": (lambda d=d: in_subprocess(run_transformers, prompts, args.new_tokens, args, d)) for d in usable}
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (llama-cpp-python is not installed: pip install llama-cpp-python builds it from source)")
    elif not (args.model or embedded_model_path()).endswith(".gguf"):
        print("llama.cpp: skipped (the model is not a GGUF file)")
    else:
        systems["llama.cpp"] = lambda: in_subprocess(run_llama_cpp, prompts, args.new_tokens, args)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(args.repeat):  # alternating, so a drift of the machine's speed hits every system
        for name, run in systems.items():
            runs[name].append(run())
    median = {name: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for name, rs in runs.items() if rs}
    results = {name: r | {"all_seconds": [run["seconds"] for run in runs[name]]} for name, r in median.items()}
    prompt_tokens = sum(lengths)
    linear_weights, head_weights = in_subprocess(linear_sizes, args)
    for r in results.values():
        r["requests_per_s"] = args.requests / r["seconds"]
        r["output_tok_per_s"] = r["output_tokens"] / r["seconds"]
        r["total_tok_per_s"] = (r["output_tokens"] + prompt_tokens) / r["seconds"]
        flops = 2 * linear_weights * (r["output_tokens"] + prompt_tokens) + 2 * head_weights * r["output_tokens"]
        r["share_of_roof"] = flops / r["seconds"] / roofs[roof_dtype]
    base_name = max((n for n in results if n.startswith("transformers")), key=lambda n: results[n]["output_tok_per_s"], default=None)
    base = results.get(base_name)
    where = machine(args.device)
    workload = f"{args.requests} requests, prompts {args.min_prompt}..{args.max_prompt} tokens, {args.new_tokens} new, greedy"
    title = workload + (f", median of {args.repeat} alternating runs" if args.repeat > 1 else "")
    roof_line = ", ".join(f"{d} {v / 1e9:.0f}" for d, v in roofs.items())
    table = Table(title=f"{title}\n{where}; roof: {roof_dtype} {roofs[roof_dtype] / 1e9:.0f} GFLOP/s (large matmuls: {roof_line})")
    for col in ("system", "dtype", "seconds", "requests/s", "output tok/s", "total tok/s", f"x {base_name or 'transformers'}", "share of roof"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        ratio = r["output_tok_per_s"] / base["output_tok_per_s"] if base else float("nan")
        r["ratio_vs_transformers"] = ratio
        dtype = r["dtype"] + (f" {'/'.join(f'{k} {v}' for k, v in r['quantization'].items())}" if r.get("quantization") else "")
        table.add_row(name, dtype, f"{r['seconds']:.1f}", f"{r['requests_per_s']:.2f}", f"{r['output_tok_per_s']:.1f}", f"{r['total_tok_per_s']:.1f}",
                      f"{ratio:.2f}", f"{r['share_of_roof']:.0%}")
    Console(width=None if sys.stdout.isatty() else 180).print(table)
    settings = vars(args) | {"prompt_tokens": prompt_tokens, "torch": torch.__version__, "machine": where, "cpus": os.cpu_count(),
                             "roof_flops": roofs, "baseline": base_name}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


def linear_sizes(args) -> tuple[int, int]:
    """(weights in the layers' linears, weights in the lm_head) of the model: the FLOPs that count."""
    from fastgen_compile.engine.engine import Engine

    engine = Engine(**{**engine_overrides(args), "compile": False, "kv_pages": 8})
    layers = sum(p.numel() for layer in engine.model.layers for name, p in layer.named_parameters() if p.dim() >= 2)
    return layers, engine.model.lm_head.numel()


if __name__ == "__main__":
    main()
