"""Benchmark workloads: real English text (corpus.py), tokenized by the model's tokenizer and
cut to drawn lengths. Seeded.

As in the DeepSpeed-FastGen paper, prompt and generation lengths are drawn from normal
distributions with std = 0.3 x mean, clipped to sane bounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastgen_compile.corpus import corpus, random_slices


def prompts_of_lengths(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, each from a random place in the corpus."""
    return random_slices(tokenizer.encode(corpus()), lengths, random.Random(seed))


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_new_tokens: int


def normal_lengths(rng: random.Random, mean: int, count: int, low: int, high: int) -> list[int]:
    """The paper's length distribution: normal, std = 0.3 x mean, clipped to [low, high]."""
    return [min(high, max(low, round(rng.gauss(mean, 0.3 * mean)))) for _ in range(count)]


def chat_workload(tokenizer, num_requests: int, prompt_mean: int, gen_mean: int, max_model_len: int, seed: int = 0) -> list[Request]:
    """Requests with normally distributed prompt and generation lengths, within the model's context."""
    rng = random.Random(seed)
    gens = normal_lengths(rng, gen_mean, num_requests, low=max(1, gen_mean // 4), high=2 * gen_mean)
    prompts = normal_lengths(rng, prompt_mean, num_requests, low=max(1, prompt_mean // 4), high=min(2 * prompt_mean, max_model_len - 2 * gen_mean))
    return [Request(ids, gen) for ids, gen in zip(prompts_of_lengths(tokenizer, prompts, seed), gens)]
