"""Time to first token of a request whose long prefix is cached, against the same request uncached,
in one run on one engine (default settings unless flags say otherwise).

Each repeat: the prefix cache is reset, a --prefix-tokens document + question A goes in (cold:
every token computed), then the same document + question B (warm: the document's full pages come
from the cache). One token generated each, so TTFT is the whole request. Medians over --repeat
(issue 19's goal: >= 5x lower). A first pair runs untimed: first-call costs out of the figures.

    .venv/bin/python tools/bench_prefix_cache.py [--prefix-tokens 1500] [--question-tokens 24] [--repeat 5] [engine flags]

The throughput side (a shared-prefix workload, cache on vs off) is `fastgen-compile bench --workload shared_prefix`.
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

from fastgen_compile.bench.workload import prompts_of_lengths
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.entrypoints.llm import LLM
from fastgen_compile.hardware import machine
from fastgen_compile.request import RequestOutput, SamplingParams

ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)


def first_token(llm: LLM, prompt: list[int]) -> tuple[float, RequestOutput]:
    """Seconds from submitting the prompt to its first token, and that output."""
    t0 = time.perf_counter()
    out = next(llm.stream(prompt_token_ids=prompt, sampling_params=ONE_TOKEN))
    return time.perf_counter() - t0, out


def cold_and_warm(llm: LLM, document: list[int], cold_question: list[int], warm_question: list[int]) -> tuple[float, float, int]:
    """TTFT of document + cold_question with nothing cached, then of document + warm_question; the warm one's cached tokens."""
    llm.reset_prefix_cache()  # requests submitted after it find nothing cached
    cold, _ = first_token(llm, document + cold_question)
    warm, out = first_token(llm, document + warm_question)
    return cold, warm, out.num_cached_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-tokens", type=int, default=1500)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--repeat", type=int, default=5)
    add_engine_flags(p)
    args = p.parse_args()
    console = Console(highlight=False)
    t0 = time.perf_counter()
    llm = LLM(**engine_overrides(args))
    console.print(f"engine ready in {time.perf_counter() - t0:.0f} s; {machine(llm.engine.config.device)}")
    document, *questions = prompts_of_lengths(llm.tokenizer, [args.prefix_tokens] + [args.question_tokens] * (2 * args.repeat + 2))
    pairs = list(zip(questions[0::2], questions[1::2]))
    cold_and_warm(llm, document, *pairs[0])  # untimed
    runs = [cold_and_warm(llm, document, a, b) for a, b in pairs[1:]]
    llm.close()

    cold, warm = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    cached = {r[2] for r in runs}
    table = Table(title=f"TTFT, a {args.prefix_tokens}-token document + a {args.question_tokens}-token question "
                        f"(page size {llm.engine.config.page_size}, median of {args.repeat})")
    for col in ("request", "TTFT median", "each run (s)", "prompt tokens cached"):
        table.add_column(col, justify="right")
    table.add_row("uncached", f"{cold * 1000:.0f} ms", " ".join(f"{r[0]:.3f}" for r in runs), "0")
    table.add_row("prefix cached", f"{warm * 1000:.0f} ms", " ".join(f"{r[1]:.3f}" for r in runs), " ".join(map(str, sorted(cached))))
    console.print(table)
    console.print(f"the cached prefix cuts TTFT by {cold / warm:.1f}x (goal: >= 5x)")


if __name__ == "__main__":
    main()
