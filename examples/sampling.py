"""Sampling: temperature and top-p, and seeds. A seeded request draws from its own random
stream, so it gives the same text again, alone or batched beside other requests.

    python examples/sampling.py [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse

from fastgen_compile import LLM, SamplingParams


def main(llm: LLM, max_new_tokens: int) -> None:
    prompt = llm.apply_chat_template([{"role": "user", "content": "Invent a name for a friendly robot and describe it."}])
    seeded = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.9, seed=7)

    (alone,) = llm.generate([prompt], seeded)
    (again,) = llm.generate([prompt], seeded)
    # again while unseeded requests share its forward passes: the batch does not change its draws
    others = [llm.stream(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)) for p in ("Once upon a time", "The weather today")]
    (batched,) = llm.generate([prompt], seeded)
    for other in others:
        list(other)  # read them to the end
    print(f"seed 7:              {alone.text!r}")
    print(f"seed 7 again:        identical: {again.token_ids == alone.token_ids}")
    print(f"seed 7 in a batch:   identical: {batched.token_ids == alone.token_ids}")

    other = llm.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.9, seed=8))[0]
    greedy = llm.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0))[0]
    hot = llm.generate([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=1.5, top_p=1.0, seed=7))[0]
    print(f"seed 8:              {other.text!r}")
    print(f"greedy (temp 0):     {greedy.text!r}")
    print(f"temp 1.5, no top-p:  {hot.text!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    with LLM() as llm:
        main(llm, args.max_new_tokens)
