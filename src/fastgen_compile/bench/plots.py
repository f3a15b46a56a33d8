"""PNG plots of a serving benchmark: throughput-latency curves and SplitFuse's step composition."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fastgen_compile.bench.report import load_of  # noqa: E402


def _load_axis(results: list[dict]) -> tuple[str, str]:
    return ("clients", "concurrent clients") if "clients" in results[0] else ("rate", "arrival rate (requests/s)")


def _by_system(results: list[dict]) -> dict[str, list[dict]]:
    systems: dict[str, list[dict]] = {}
    for r in results:
        systems.setdefault(r["system"], []).append(r)
    return systems


def throughput_latency(axes, results: list[dict]) -> None:
    key, label = _load_axis(results)
    for ax, sla in zip(axes, results[0]["effective_throughput"]):
        for name, rows in _by_system(results).items():
            ax.plot([r[key] for r in rows], [r["effective_throughput"][sla] for r in rows], marker="o", label=name)
        prompt, generation = sla.split("/")
        ax.set(title=f"SLA: prompt {prompt} tok/s, generation {generation} tok/s", xlabel=label, ylabel="effective throughput (requests/s)")
        ax.legend(fontsize="small")


def draw(name: str, results: list[dict], settings: dict, path: str) -> str:
    if name == "throughput_latency.png":
        n = len(results[0]["effective_throughput"])
        cols, rows = min(n, 3), -(-n // 3)
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
        throughput_latency(axes.flat, results)
    elif name == "p95_latency_vs_throughput.png":
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for system, rows in _by_system(results).items():
            ax.plot([r["requests_per_s"] for r in rows], [r["inter_token_s"]["p95"] for r in rows], marker="o", label=system)
        ax.set(xlabel="throughput (requests/s)", ylabel="P95 inter-token latency (s)", title="P95 token latency vs throughput")
        ax.legend()
    else:
        fig = step_composition(results)
    fig.suptitle(f"{settings['model']}, {settings['dtype']}, prompts ~{settings['prompt_mean']} tokens, generations ~{settings['gen_mean']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_composition(results: list[dict]):
    """Tokens per forward pass at the heaviest load point of each engine policy: decode vs prompt chunk, and the bucket."""
    key, _ = _load_axis(results)
    engines = {name: max(rows, key=lambda r: r[key]) for name, rows in _by_system(results).items() if rows[0].get("steps")}
    fig, axes = plt.subplots(len(engines) or 1, 1, figsize=(11, 3.2 * max(1, len(engines))), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], engines.items()):
        steps = row["steps"]
        x = range(len(steps))
        decode = [s["decode_tokens"] for s in steps]
        ax.bar(x, decode, width=1.0, label="decode tokens", color="tab:blue")
        ax.bar(x, [s["prompt_tokens"] for s in steps], width=1.0, bottom=decode, label="prompt-chunk tokens", color="tab:orange")
        ax.stairs([s["bucket"] for s in steps], [i - 0.5 for i in range(len(steps) + 1)], color="black", linewidth=0.8, label="bucket (padded rows)")
        ax.set(title=f"{name}, {load_of(row)}: {len(steps)} forward passes", xlabel="engine step", ylabel="tokens")
        ax.legend(loc="upper right", fontsize="small")
    return fig

