"""What weight quantization costs in quality: perplexity of held-out text (the standard library's
docstrings, `corpus.py`) under each quantization, with every other setting as given, in one run.

    .venv/bin/python tools/quality.py [--quantizations none auto int4 int8] [--windows 16] [--window 512] [engine flags]

Perplexity comes from the engine's own prompt logprobs (greedy, one new token per window), so it
measures the model the engine serves, kernels and activations dtype included. The figure to read
is each row's change against `none` (the checkpoint's weights, dense).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random

from rich.console import Console
from rich.table import Table

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.corpus import corpus, random_slices
from fastgen_compile.hardware import machine


def perplexity(quantization: str, windows: list[list[int]], args) -> tuple[float, dict]:
    with LLM(**{**engine_overrides(args), "quantization": quantization}) as llm:
        outs = llm.generate(prompt_token_ids=windows, sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0))
        scored = [lp.logprob for out in outs for lp in out.prompt_logprobs[1:]]
        return math.exp(-sum(scored) / len(scored)), llm.engine.quantization


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantizations", nargs="+", default=["none", "auto", "int4", "int8"])
    p.add_argument("--windows", type=int, default=16, help="held-out windows scored")
    p.add_argument("--window", type=int, default=512, help="tokens a window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/quality.json")
    add_engine_flags(p)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from fastgen_compile.bench.systems import transformers_source

    folder, kwargs = transformers_source(args.model)
    ids = AutoTokenizer.from_pretrained(folder, **kwargs)(corpus()).input_ids
    windows = random_slices(ids, [args.window] * args.windows, random.Random(args.seed))
    rows = {q: perplexity(q, windows, args) for q in args.quantizations}
    base = rows.get("none", next(iter(rows.values())))[0]
    where = machine(args.device)
    table = Table(title=f"perplexity of {args.windows} x {args.window} held-out tokens (stdlib docstrings); {where}")
    for col in ("quantization", "quantized", "perplexity", "change"):
        table.add_column(col, justify="right")
    for q, (ppl, parts) in rows.items():
        table.add_row(q, ", ".join(f"{k} {v}" for k, v in parts.items()) or "none", f"{ppl:.4f}", f"{ppl / base - 1:+.2%}")
    Console(width=160).print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args) | {"machine": where}, "perplexity": {q: {"ppl": r[0], "quantized": r[1]} for q, r in rows.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
