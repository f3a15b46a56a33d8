"""The benchmark's output: a rich table, the headline ratios, serving.json and PNG plots."""

from __future__ import annotations

import json
import math
import os

from rich.console import Console
from rich.table import Table

PLOTS = ("throughput_latency.png", "p95_latency_vs_throughput.png", "step_composition.png")


def load_of(row: dict) -> str:
    return f"{row['clients']} clients" if "clients" in row else f"{row['rate']:g} req/s"


def table(results: list[dict]) -> Table:
    rates = list(results[0]["effective_throughput"])
    t = Table(title="serving benchmark (latencies in seconds; effective throughput @ SLA prompt/generation tokens/s)")
    for col in ("system", "load", "req/s", *(f"eff. req/s @{r}" for r in rates), "out tok/s", "TTFT p50", "TTFT p95",
                "ITL p50", "ITL p95", "ITL p99", "e2e p95", "prefix hit"):
        t.add_column(col, justify="right")
    for r in results:
        ttft, itl, e2e = r["ttft_s"], r["inter_token_s"], r["end_to_end_s"]
        t.add_row(r["system"], load_of(r), f"{r['requests_per_s']:.3f}", *(f"{r['effective_throughput'][k]:.3f}" for k in rates),
                  f"{r['output_tok_per_s']:.1f}", f"{ttft['p50']:.2f}", f"{ttft['p95']:.2f}", f"{itl['p50']:.3f}", f"{itl['p95']:.3f}",
                  f"{itl['p99']:.3f}", f"{e2e['p95']:.2f}", prefix_hit(r))
    return t


def prefix_hit(row: dict) -> str:
    """The share of the prompt tokens the prefix cache served (engines of ours only)."""
    cache = row.get("prefix_cache")
    return f"{cache['hit_tokens'] / cache['queried_tokens']:.0%}" if cache and cache["queried_tokens"] else "-"


def ratios(results: list[dict], ours: str, theirs: str) -> list[dict]:
    """Per load point: how `ours` compares with `theirs` (latency: theirs / ours, so > 1 means ours is better)."""
    by_load = {load_of(r): r for r in results if r["system"] == theirs}
    out = []
    for a in (r for r in results if r["system"] == ours):
        b = by_load.get(load_of(a))
        if b is None:
            continue
        out.append({
            "load": load_of(a),
            "p50_ttft_lower_by": _div(b["ttft_s"]["p50"], a["ttft_s"]["p50"]),
            "p95_itl_lower_by": _div(b["inter_token_s"]["p95"], a["inter_token_s"]["p95"]),
            "p99_itl_lower_by": _div(b["inter_token_s"]["p99"], a["inter_token_s"]["p99"]),
            "p95_e2e_lower_by": _div(b["end_to_end_s"]["p95"], a["end_to_end_s"]["p95"]),
            "effective_throughput_x": {k: _div(v, b["effective_throughput"][k]) for k, v in a["effective_throughput"].items()},
            "output_tok_per_s_x": _div(a["output_tok_per_s"], b["output_tok_per_s"]),
        })
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else float("nan")


def comparisons(results: list[dict]) -> dict[str, list[dict]]:
    pairs = {"splitfuse vs prefill_first": ("fastgen splitfuse", "fastgen prefill_first"),
             "splitfuse vs fixed budget": ("fastgen splitfuse", "fastgen splitfuse fixed"),
             "splitfuse vs transformers CB": ("fastgen splitfuse", "transformers CB"),
             "prefix cache on vs off": ("fastgen splitfuse", "fastgen splitfuse nocache")}
    return {name: rows for name, (a, b) in pairs.items() if (rows := ratios(results, a, b))}


def ratio_table(name: str, rows: list[dict]) -> Table:
    rates = list(rows[0]["effective_throughput_x"])
    t = Table(title=f"{name} (x: how many times better)")
    for col in ("load", "P50 TTFT", "P95 ITL", "P99 ITL", "P95 e2e", *(f"eff. thr. @{r}" for r in rates), "out tok/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["load"], *(_times(r[k]) for k in ("p50_ttft_lower_by", "p95_itl_lower_by", "p99_itl_lower_by", "p95_e2e_lower_by")),
                  *(_times(v) for v in r["effective_throughput_x"].values()), _times(r["output_tok_per_s_x"]))
    return t


def _times(x: float) -> str:
    return "both 0" if math.isnan(x) else f"{x:.2f}x"


def write(folder: str, settings: dict, results: list[dict], console: Console) -> None:
    console.print(table(results))
    compared = comparisons(results)
    for name, rows in compared.items():
        console.print(ratio_table(name, rows))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "serving.json")
    with open(path, "w") as f:
        json.dump({"settings": settings, "results": results, "comparisons": compared}, f, indent=1)
    console.print(f"wrote {path}")
    try:
        from fastgen_compile.bench import plots
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plots (pip install matplotlib)[/]")
        return
    for name in PLOTS:
        console.print(f"wrote {plots.draw(name, results, settings, os.path.join(folder, name))}")
