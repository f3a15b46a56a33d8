"""Single-stream decode speed: one greedy stream (eos ignored), tokens per second after the first
token, through `LLM.stream` with the engine's settings (default: the defaults); against
transformers `generate` at batch 1 in fp32 and bf16 (the faster is the baseline) and llama.cpp
(llama-cpp-python, when installed) on the same GGUF file, in one run.

    .venv/bin/python tools/bench_latency.py [--new-tokens 256] [--prompt 64] [--repeat 3] [engine flags, e.g. --quantization int4]

--repeat runs each system that many times and keeps its median run (this shared machine drifts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

from fastgen_compile.bench.systems import FastgenSystem, LlamaCppSystem, in_subprocess, transformers_source
from fastgen_compile.bench.workload import Request, prompts_of_lengths
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.hardware import machine
from fastgen_compile.models.loader import embedded_model_path

TokenTimes = Callable[[Request], list[float]]  # a system run on one request: when each of its tokens arrived


def live(stream: Callable[[Request], Iterator[int]]) -> TokenTimes:
    """A system's stream (counts of new tokens as they arrive) timed as it is consumed."""
    return lambda request: [time.perf_counter() for n in stream(request) for _ in range(n)]


def rates(times: TokenTimes, request: Request, repeat: int) -> list[float]:
    times(Request(request.prompt_token_ids, 4))  # first-call costs out of the figures
    return [decode_rate(times(request)) for _ in range(repeat)]


def transformers_rates(model: str | None, dtype: str, request: Request, repeat: int) -> list[float]:
    """transformers' generate at batch 1, greedy, eos ignored, timed by its streamer."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    folder, kwargs = transformers_source(model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()

    class Times(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:  # first the prompt, then each new token
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def times(request: Request) -> list[float]:
        streamer = Times()
        with torch.inference_mode():
            hf.generate(torch.tensor([request.prompt_token_ids]), max_new_tokens=request.max_new_tokens, min_new_tokens=request.max_new_tokens,
                        do_sample=False, pad_token_id=hf.config.eos_token_id, streamer=streamer)
        return streamer.times

    return rates(times, request, repeat)


def llama_cpp_rates(model: str | None, request: Request, repeat: int) -> list[float]:
    llama = LlamaCppSystem(model, torch.get_num_threads())
    try:
        return rates(live(llama.stream), request, repeat)
    finally:
        llama.close()


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first."""
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default="bench_results/latency.json")
    add_engine_flags(p)
    args = p.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    where = machine(args.device)
    console.print(f"machine: {where}")
    from transformers import AutoTokenizer

    folder, kwargs = transformers_source(args.model)
    (ids,) = prompts_of_lengths(AutoTokenizer.from_pretrained(folder, **kwargs), [args.prompt])
    request = Request(ids, args.new_tokens)
    results: dict[str, dict] = {}

    def record(name: str, found: list[float], **info) -> None:
        results[name] = {"tok_per_s": statistics.median(found), "all": found, **info}
        console.print(f"  {name}: {results[name]['tok_per_s']:.1f} tok/s")

    fastgen = FastgenSystem(**engine_overrides(args))
    engine = fastgen.llm.engine
    record("fastgen-compile", rates(live(fastgen.stream), request, args.repeat), dtype=engine.config.dtype, dtype_reason=engine.config.dtype_reason,
        quantization=engine.quantization, buckets=list(engine.config.buckets))
    fastgen.close()
    if not args.skip_transformers:  # the peers in fresh processes: see bench.systems.in_subprocess
        for dtype in ("float32", "bfloat16"):
            record(f"transformers generate {dtype}", in_subprocess(transformers_rates, args.model, dtype, request, args.repeat), dtype=dtype)
    gguf = args.model or embedded_model_path()
    if importlib.util.find_spec("llama_cpp") is None:
        console.print("llama.cpp: skipped (llama-cpp-python is not installed: pip install llama-cpp-python builds it from source)")
    elif not gguf.endswith(".gguf"):
        console.print(f"llama.cpp: skipped ({gguf} is not a GGUF file)")
    else:
        found = in_subprocess(llama_cpp_rates, args.model, request, args.repeat)
        record("llama.cpp", found, file=os.path.basename(gguf), threads=torch.get_num_threads())

    baselines = {k: v["tok_per_s"] for k, v in results.items() if k.startswith("transformers")}
    base_name = max(baselines, key=baselines.get) if baselines else None
    table = Table(title=f"one greedy stream, {args.new_tokens} tokens after a {args.prompt}-token prompt, decode tok/s after the first token, "
                        f"median of {args.repeat}; {where}")
    for col in ("system", "settings", "tok/s", f"x {base_name or 'transformers'}", "x llama.cpp"):
        table.add_column(col, justify="right")
    llama_rate = results.get("llama.cpp", {}).get("tok_per_s")
    for name, r in results.items():
        quantized = " ".join(f"{part} {method}" for part, method in r.get("quantization", {}).items())
        settings = ", ".join([r["dtype"] if "dtype" in r else f"gguf, {r['threads']} threads", *([quantized] if quantized else [])])
        r["x_transformers"] = r["tok_per_s"] / baselines[base_name] if base_name else None
        r["x_llama_cpp"] = r["tok_per_s"] / llama_rate if llama_rate else None
        table.add_row(name, settings, f"{r['tok_per_s']:.1f}", f"{r['x_transformers']:.2f}" if base_name else "-",
                      f"{r['x_llama_cpp']:.2f}" if llama_rate else "-")
    console.print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args) | {"machine": where, "torch": torch.__version__, "baseline": base_name}, "results": results}, f, indent=2)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
