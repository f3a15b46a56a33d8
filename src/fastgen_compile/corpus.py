"""Real English text for long prompts (benchmarks, the chat's /load): the docstrings of the
Python standard library, always installed, so nothing is downloaded."""

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
    return random_slices(tokenizer.encode(corpus()), lengths, random.Random(seed))


def random_slices(ids: list[int], lengths: list[int], rng: random.Random) -> list[list[int]]:
    out = []
    for n in lengths:
        if n > len(ids):
            raise ValueError(f"corpus has {len(ids)} tokens, a prompt of {n} was asked for")
        start = rng.randrange(0, len(ids) - n + 1)
        out.append(ids[start : start + n])
    return out
