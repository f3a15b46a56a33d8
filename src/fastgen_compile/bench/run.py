"""`fastgen-compile bench`: the paper's serving benchmark, every system in one run.

For each system (built one at a time, so they never share the CPU) and each load point
(closed-loop client counts, or Poisson arrival rates), the same seeded workload goes
through the system's streaming API; every token's arrival time is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastgen_compile import __version__
from fastgen_compile.bench import report
from fastgen_compile.bench.clients import closed_loop, poisson
from fastgen_compile.bench.metrics import SLA, summarize
from fastgen_compile.bench.systems import FastgenSystem, LlamaCppSystem, ServerSystem, TransformersSystem, missing_engines, transformers_source
from fastgen_compile.bench.workload import Request, chat_workload, multi_turn_workload, shared_prefix_workload
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.hardware import machine, resolve_dtype

# splitfuse: the SLA-aware budget (engine/step_costs.py); splitfuse_fixed: every step may fill the
# largest bucket (itl_target_ms 0), as before it and as in the paper; splitfuse_nocache: splitfuse
# without the prefix cache (every engine here has it on unless --no-prefix-caching)
SYSTEMS = ("splitfuse", "splitfuse_fixed", "splitfuse_nocache", "prefill_first", "transformers", "llama.cpp", "server")
WORKLOADS = ("chat", "shared_prefix", "multi_turn")
PREFIX_SYSTEMS = ["splitfuse", "splitfuse_nocache"]  # the default systems of the workloads a prefix cache serves
# (prompt mean, generation mean) of the paper's workloads; the defaults fit this 2-core CPU
PAPER_WORKLOADS = "1200/60, 1200/128, 2600/60, 2600/128"
QUICK = {"requests": 6, "prompt_mean": 256, "gen_mean": 24, "clients": [1, 3]}

# wide tables stay readable when the output goes to a file or CI log
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 180)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, help="default: all but server (llama.cpp if installed); with --server: server and splitfuse")
    p.add_argument("--server", metavar="URL", help="also measure a running `fastgen-compile serve` at URL through its OpenAI streaming API")
    p.add_argument("--api-key", default=os.environ.get("FASTGEN_API_KEY"), help="the server's key, if it has one")
    p.add_argument("--requests", type=int, default=12, help="requests per load point")
    p.add_argument("--prompt-mean", type=int, default=1200, help=f"prompt tokens, normal with std 0.3 x mean (paper: {PAPER_WORKLOADS})")
    p.add_argument("--gen-mean", type=int, default=60, help="generated tokens, normal with std 0.3 x mean")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="closed-loop concurrent clients, one load point each")
    p.add_argument("--rates", type=float, nargs="+", help="open-loop Poisson arrival rates (requests/s) instead of clients")
    p.add_argument("--prompt-rates", type=float, nargs="+", default=[512.0, 128.0],
                   help="SLA: prompt tokens/s, time to first token <= prompt / rate (paper: 512; 128 suits a 2-core CPU)")
    p.add_argument("--gen-rates", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="SLA: generation EMA tokens/s")
    p.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("workloads")
    w.add_argument("--workload", choices=WORKLOADS, default="chat",
                   help="chat: the paper's independent prompts; shared_prefix: a --prefix-tokens document, then a question each; multi_turn: "
                        "conversations of --turns turns resending their history (opening ~--prompt-mean tokens); the last two default to "
                        f"--systems {' '.join(PREFIX_SYSTEMS)} (default: chat)")
    w.add_argument("--prefix-tokens", type=int, default=1500, help="shared_prefix: the document's tokens (default: 1500)")
    w.add_argument("--question-mean", type=int, default=32, help="shared_prefix and multi_turn: tokens of each question (default: 32)")
    w.add_argument("--turns", type=int, default=4, help="multi_turn: turns per conversation (default: 4)")
    p.add_argument("--quick", action="store_true", help=f"a small run (under 3 minutes here): {QUICK}")
    p.add_argument("--out", default="bench_results/serving", help="folder for serving.json and the plots")
    add_engine_flags(p)


def build(name: str, args: argparse.Namespace):
    if name == "transformers":
        return TransformersSystem(args.model, resolve_dtype(args.dtype, args.device))
    if name == "server":
        return ServerSystem(args.server, args.api_key)
    if name == "llama.cpp":
        return LlamaCppSystem(args.model, torch.get_num_threads())
    if name == "splitfuse_fixed":
        return FastgenSystem(name="fastgen splitfuse fixed", **{**engine_overrides(args), "policy": "splitfuse", "itl_target_ms": 0})
    if name == "splitfuse_nocache":
        return FastgenSystem(name="fastgen splitfuse nocache", **{**engine_overrides(args), "policy": "splitfuse", "prefix_caching": False})
    return FastgenSystem(**{**engine_overrides(args), "policy": name})


def load_points(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [("rate", r) for r in args.rates] if args.rates else [("clients", c) for c in args.clients]


def workload(args: argparse.Namespace, tokenizer, max_len: int, seed: int) -> list[Request]:
    if args.workload == "shared_prefix":
        return shared_prefix_workload(tokenizer, args.requests, args.prefix_tokens, args.question_mean, args.gen_mean, seed)
    if args.workload == "multi_turn":
        return multi_turn_workload(tokenizer, args.requests, args.prompt_mean, args.question_mean, args.gen_mean, args.turns, seed)
    return chat_workload(tokenizer, args.requests, args.prompt_mean, args.gen_mean, min(max_len, 8192), seed)


def prefix_cache_counts(system) -> tuple[int, int]:
    """The engine's prompt tokens looked up in its prefix cache, and found, so far."""
    pages = system.llm.engine.pages
    return pages.num_queried_tokens, pages.num_hit_tokens


def run_point(system, requests: list[Request], kind: str, value: float, seed: int, done) -> tuple[list, float]:
    t0 = time.perf_counter()
    if kind == "clients":
        traces = closed_loop(system, requests, int(value), done)
    else:
        traces = poisson(system, requests, value, seed, done)
    return traces, time.perf_counter() - t0


def main(args: argparse.Namespace) -> int:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.systems is None:
        # splitfuse_nocache: the same as splitfuse where no prompt repeats another's start
        skip = {"server", "splitfuse_nocache"} | ({"llama.cpp"} if "llama_cpp" in missing_engines() else set())
        args.systems = (["server", "splitfuse"] if args.server else PREFIX_SYSTEMS if args.workload != "chat"
                        else [s for s in SYSTEMS if s not in skip])
    if "server" in args.systems and not args.server:
        console.print("error: the server system needs --server URL")
        return 2
    sla = SLA(tuple(args.prompt_rates), tuple(args.gen_rates))
    from transformers import AutoTokenizer

    folder, kwargs = transformers_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    max_len = getattr(tokenizer, "model_max_length", 8192)
    points = load_points(args)
    # each load point its own requests (the same for every system): a prompt sent at an earlier
    # point would let a system with a prefix cache (ours, transformers CB) skip its prefill
    workloads = {p: workload(args, tokenizer, max_len, args.seed + i) for i, p in enumerate(points)}
    for name in missing_engines():
        console.print(f"[dim]{name} is not installed: skipped[/]")

    results, engine_config = [], None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        tasks = {(s, p): bar.add_task(f"{s} {p[0]}={p[1]:g}", total=args.requests, start=False) for s in args.systems for p in points}
        for name in args.systems:
            t0 = time.perf_counter()
            system = build(name, args)
            ready = time.perf_counter() - t0
            if isinstance(system, FastgenSystem) and engine_config is None:  # the first engine's (the rest vary a knob of it)
                engine_config = asdict(system.config)
            list(system.stream(Request(list(range(100, 116)), 2)))  # first-call costs out of the figures
            for point in points:
                task = tasks[(name, point)]
                bar.start_task(task)
                first_step = system.llm.engine.num_steps if isinstance(system, FastgenSystem) else 0
                counts = prefix_cache_counts(system) if isinstance(system, FastgenSystem) else None
                requests = workloads[point]
                traces, seconds = run_point(system, requests, *point, args.seed, lambda t=task: bar.advance(t))
                row = {"system": system.name, point[0]: point[1], "ready_s": ready, **summarize(traces, seconds, sla),
                       "prompt_lengths": [len(r.prompt_token_ids) for r in requests], "gen_lengths": [r.max_new_tokens for r in requests]}
                if isinstance(system, FastgenSystem):
                    row["steps"] = [asdict(s) for s in system.llm.engine.steps_since(first_step)]
                    queried, hit = (now - before for now, before in zip(prefix_cache_counts(system), counts))
                    row["prefix_cache"] = {"queried_tokens": queried, "hit_tokens": hit}
                results.append(row)
            system.close()

    settings = {k: v for k, v in vars(args).items() if k != "run"} | {
        "model": args.model or "embedded SmolLM2-135M-Instruct", "device": (engine_config or {}).get("device", "cpu"),
        "dtype": resolve_dtype(args.dtype, args.device),  # "auto" resolved: the plots' titles name what ran
        "torch": torch.__version__, "fastgen_compile": __version__, "machine": machine(engine_config["device"] if engine_config else "cpu"),
        "cpus": os.cpu_count(), "engine_config": engine_config, "sla": asdict(sla),
    }
    report.write(args.out, settings, results, console)
    return 0
