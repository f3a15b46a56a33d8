"""Benchmark prompts: real English text (docstrings of the Python standard library, always
installed), tokenized by the model's tokenizer and cut to the drawn lengths. Seeded."""

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
    ids = tokenizer.encode(corpus())
    rng = random.Random(seed)
    out = []
    for n in lengths:
        if n > len(ids):
            raise ValueError(f"corpus has {len(ids)} tokens, a prompt of {n} was asked for")
        start = rng.randrange(0, len(ids) - n + 1)
        out.append(ids[start : start + n])
    return out


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Engine knobs a benchmark may override; unset ones keep EngineConfig's defaults."""
    parser.add_argument("--buckets", type=int, nargs="+", help="default: EngineConfig's")
    parser.add_argument("--decode-rows", type=int)
    parser.add_argument("--page-size", type=int)
    parser.add_argument("--q-block", type=int)
    parser.add_argument("--kv-dtype")


def engine_overrides(args: argparse.Namespace) -> dict:
    knobs = {"buckets": args.buckets and tuple(args.buckets), "decode_rows": args.decode_rows, "page_size": args.page_size,
             "q_block": args.q_block, "kv_dtype": args.kv_dtype}
    return {k: v for k, v in knobs.items() if v is not None}
