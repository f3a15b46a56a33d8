"""Batch generation: every prompt goes to the engine at once (continuous batching), and the
outputs come back in prompt order.

    python examples/generate.py [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from fastgen_compile import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "The three primary colours are",
    "A haiku about the sea:\n",
]


def main(llm: LLM, max_new_tokens: int) -> None:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)  # greedy
    t0 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    seconds = time.perf_counter() - t0
    for out in outputs:
        print(f"{out.prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} prompts, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    with LLM() as llm:  # the embedded SmolLM2-135M-Instruct; compiles its buckets first
        main(llm, args.max_new_tokens)
