"""Real English text for demos and benchmarks, with no download: docstrings of the Python
standard library, which is always installed."""

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



def random_slices(ids: list[int], lengths: list[int], rng: random.Random) -> list[list[int]]:
    out = []
    for n in lengths:
        if n > len(ids):
            raise ValueError(f"corpus has {len(ids)} tokens, a prompt of {n} was asked for")
        start = rng.randrange(0, len(ids) - n + 1)
        out.append(ids[start : start + n])
    return out
