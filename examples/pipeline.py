"""DeepSpeed-MII's non-persistent pipeline: `pipe = pipeline(); pipe(prompts, **sampling)`,
where the keyword arguments are SamplingParams fields.

    python examples/pipeline.py [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse

from fastgen_compile import Pipeline, pipeline


def main(pipe: Pipeline, max_new_tokens: int) -> None:
    responses = pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=max_new_tokens, temperature=0)
    for response in responses:
        print(f"{response.prompt!r} -> {response.generated_text!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    main(pipeline(), args.max_new_tokens)  # pipeline() takes LLM()'s arguments: model, dtype, engine knobs
