"""Benchmark workloads: real English text (docstrings of the Python standard library, always
installed), tokenized by the model's tokenizer and cut to drawn lengths. Seeded.

As in the DeepSpeed-FastGen paper, prompt and generation lengths are drawn from normal
distributions with std = 0.3 x mean, clipped to sane bounds.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import logging
import random
import subprocess
import threading
import unittest
from dataclasses import dataclass


def corpus() -> str:
    docs = []
    for module in (argparse, collections, json, logging, subprocess, threading, unittest, inspect, random):
        docs.append(inspect.getdoc(module) or "")
        for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(docs)


def prompts_of_lengths(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of exactly the given lengths, each from a random place in the corpus."""
    return random_slices(tokenizer.encode(corpus()), lengths, random.Random(seed))


def random_slices(ids: list[int], lengths: list[int], rng: random.Random) -> list[list[int]]:
    out = []
    for n in lengths:
        if n > len(ids):
            raise ValueError(f"corpus has {len(ids)} tokens, a prompt of {n} was asked for")
        start = rng.randrange(0, len(ids) - n + 1)
        out.append(ids[start : start + n])
    return out


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


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Engine knobs a benchmark (or a CLI command) may override; unset ones keep EngineConfig's defaults."""
    parser.add_argument("--buckets", type=int, nargs="+", help="default: EngineConfig's")
    parser.add_argument("--decode-rows", type=int)
    parser.add_argument("--page-size", type=int)
    parser.add_argument("--q-block", type=int)
    parser.add_argument("--kv-dtype")
    parser.add_argument("--kv-pages", type=int, help="KV pool size in pages (default: a share of free memory)")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="run the model eagerly")


def engine_overrides(args: argparse.Namespace) -> dict:
    knobs = {"buckets": args.buckets and tuple(args.buckets), "decode_rows": args.decode_rows, "page_size": args.page_size,
             "q_block": args.q_block, "kv_dtype": args.kv_dtype, "kv_pages": args.kv_pages, "compile": args.compile}
    return {k: v for k, v in knobs.items() if v is not None}
