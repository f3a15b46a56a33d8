"""Multi-turn chat with the API: the conversation is a list of messages that grows by one
question and one answer per turn; LLM.chat applies the tokenizer's chat template.

    python examples/chat.py [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse

from fastgen_compile import LLM, SamplingParams

QUESTIONS = [
    "What is the largest planet in the solar system?",
    "How many moons does it have, roughly?",
    "Which of those moons is the largest?",
]


def main(llm: LLM, max_new_tokens: int) -> None:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    messages = [{"role": "system", "content": "You are a concise astronomy tutor."}]
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = llm.chat(messages, params)
        messages.append({"role": "assistant", "content": reply.text})
        print(f"user: {question}\nassistant: {reply.text}\n")
    print(f"the last turn's prompt held {len(reply.prompt_token_ids)} tokens of conversation")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    with LLM() as llm:
        main(llm, args.max_new_tokens)
