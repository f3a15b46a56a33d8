"""Does detokenization slow a long output down? One greedy stream of --tokens tokens (ignore_eos):
time per token over the first and the last --window tokens, as the caller sees it and as the
engine's steps took, and the detokenizer alone on the same tokens: incremental (ours) against
decoding the whole output at every token (what the engine did before).

    .venv/bin/python tools/bench_detokenize.py [--tokens 2000] [--window 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from rich.console import Console
from rich.table import Table

from fastgen_compile import LLM, SamplingParams
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.engine.detokenizer import Detokenizer, TextState

PROMPT = "Write a long story about a lighthouse keeper and the ships she guided home."


def per_token_ms(stamps: list[float], first: int, last: int) -> float:
    return (stamps[last] - stamps[first]) / (last - first) * 1000


def detokenizer_costs(tokenizer, ids: list[int]) -> tuple[list[float], list[float]]:
    """Seconds after each token: the incremental detokenizer, and a full decode of the output."""
    detok, state, incremental = Detokenizer(tokenizer), TextState(), []
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        detok.update(state, ids[:n], (), final=n == len(ids))
        incremental.append(time.perf_counter() - t0)
    full = []
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        tokenizer.decode(ids[:n], skip_special_tokens=True)
        full.append(time.perf_counter() - t0)
    assert state.text == tokenizer.decode(ids, skip_special_tokens=True), "incremental text differs from a whole decode"
    return incremental, full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--out", default="bench_results/detokenize.json")
    add_engine_flags(p)
    args = p.parse_args()

    llm = LLM(**engine_overrides(args))
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    llm.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0))  # warm
    first_step, stamps, ids = llm.engine.num_steps, [], []
    for out in llm.stream(prompt, params):
        stamps.append(time.perf_counter())
        ids = out.token_ids
    steps = llm.engine.steps_since(first_step)
    llm.close()
    n, w = len(stamps), args.window
    decode_steps = [s.seconds for s in steps if s.prompt_tokens == 0]  # one token each
    incremental, full = detokenizer_costs(llm.tokenizer, ids)

    rows = {
        "caller, wall time per token": (per_token_ms(stamps, 1, w), per_token_ms(stamps, n - w - 1, n - 1)),
        "engine step per token": (sum(decode_steps[:w]) / w * 1000, sum(decode_steps[-w:]) / w * 1000),
        "detokenizer alone (incremental)": (per_token_ms(incremental, 0, w), per_token_ms(incremental, n - w - 1, n - 1)),
        "whole-output decode per token (before)": (per_token_ms(full, 0, w), per_token_ms(full, n - w - 1, n - 1)),
    }
    table = Table(title=f"{n} greedy tokens, {llm.engine.config.dtype}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    for col in ("ms per token", f"first {w}", f"last {w}", "last / first"):
        table.add_column(col, justify="right")
    for name, (a, b) in rows.items():
        table.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}")
    Console().print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "tokens": n, "ms_per_token": {k: list(v) for k, v in rows.items()}}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
