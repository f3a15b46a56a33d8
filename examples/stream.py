"""Streaming: one output per new token, printed as it arrives. Leaving the loop early (or
closing the stream) aborts the request and frees its KV pages at once.

    python examples/stream.py [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import time

from fastgen_compile import LLM, SamplingParams


def main(llm: LLM, max_new_tokens: int) -> None:
    prompt = llm.apply_chat_template([{"role": "user", "content": "Explain what a KV cache is, in a short paragraph."}])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    t0, tokens = time.perf_counter(), 0
    for out in llm.stream(prompt, params):
        print(out.delta_text, end="", flush=True)
        tokens = len(out.token_ids)
    seconds = time.perf_counter() - t0
    print(f"\n[{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s]")

    # stop at the end of the first sentence: breaking out aborts the rest of the request
    story = llm.apply_chat_template([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}])
    text = ""
    for out in llm.stream(story, params):
        text = out.text
        if "." in out.delta_text:
            break
    print(f"first sentence only: {text!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    with LLM() as llm:
        main(llm, args.max_new_tokens)
