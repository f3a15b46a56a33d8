"""Benchmark workloads: real English text (corpus.py), tokenized by the model's tokenizer and
cut to drawn lengths. Seeded.

As in the DeepSpeed-FastGen paper, prompt and generation lengths are drawn from normal
distributions with std = 0.3 x mean, clipped to sane bounds. The shared-prefix and multi-turn
workloads are what a prefix cache serves: prompts that repeat an earlier prompt's start.
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


def shared_prefix_workload(tokenizer, num_requests: int, prefix_tokens: int, question_mean: int, gen_mean: int, seed: int = 0) -> list[Request]:
    """One long document (a system prompt, a manual, retrieved context) that every request starts
    with, then a short question of its own."""
    rng = random.Random(seed)
    gens = normal_lengths(rng, gen_mean, num_requests, low=max(1, gen_mean // 4), high=2 * gen_mean)
    questions = normal_lengths(rng, question_mean, num_requests, low=max(1, question_mean // 4), high=2 * question_mean)
    document, *asked = prompts_of_lengths(tokenizer, [prefix_tokens, *questions], seed)
    return [Request(document + question, gen) for question, gen in zip(asked, gens)]


def multi_turn_workload(tokenizer, num_requests: int, opening_mean: int, question_mean: int, gen_mean: int, turns: int,
                        seed: int = 0) -> list[Request]:
    """Conversations of `turns` turns: each turn resends the whole history (an opening message of
    its own, then question, answer, question, ...). The answers in the history are stand-ins of the
    turn's generated length, not the model's own tokens, so only the earlier prompts can be cached
    (a lower bound on a real chat's hits). Turn-major order: every conversation's turn t is sent
    before any turn t + 1, so with no more clients than conversations a turn usually follows its
    previous one."""
    rng = random.Random(seed)
    conversations = -(-num_requests // turns)
    openings = normal_lengths(rng, opening_mean, conversations, low=max(1, opening_mean // 4), high=2 * opening_mean)
    gens = normal_lengths(rng, gen_mean, conversations * turns, low=max(1, gen_mean // 4), high=2 * gen_mean)
    questions = normal_lengths(rng, question_mean, conversations * (turns - 1), low=max(1, question_mean // 4), high=2 * question_mean)
    texts = prompts_of_lengths(tokenizer, [*openings, *questions, *gens], seed)
    histories = texts[:conversations]
    asked, answers = iter(texts[conversations : conversations + len(questions)]), iter(texts[conversations + len(questions) :])
    requests = []
    for turn in range(turns):
        for c in range(conversations):
            if turn:
                histories[c] = histories[c] + next(asked)
            answer = next(answers)
            requests.append(Request(histories[c], len(answer)))
            histories[c] = histories[c] + answer
    return requests[:num_requests]
