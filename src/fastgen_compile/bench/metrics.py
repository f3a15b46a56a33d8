"""Serving metrics: latency percentiles and the paper's effective throughput under a chat SLA.

A request meets an SLA when its prompt is processed at >= a prompt rate in tokens/s (time
to first token <= prompt_tokens / prompt_rate) and the exponential moving average (span
`ema_span`) of its generation rate never drops below a generation rate. Effective
throughput = requests per second that meet it, for every (prompt rate, generation rate) pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    """One request as its client saw it: perf_counter times of sending and of every token."""

    prompt_tokens: int
    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def inter_token(self) -> list[float]:
        return list(np.diff(self.token_times))

    @property
    def end_to_end(self) -> float:
        return self.token_times[-1] - self.sent


@dataclass(frozen=True)
class SLA:
    prompt_rates: tuple[float, ...] = (512.0,)  # prompt tokens/s: time to first token <= prompt_tokens / rate
    generation_rates: tuple[float, ...] = (2.0, 4.0, 6.0)  # tokens/s the generation EMA must hold
    ema_span: int = 16

    def targets(self) -> dict[str, tuple[float, float]]:
        """Every (prompt rate, generation rate) pair, keyed "prompt/generation" in tokens/s."""
        return {f"{p:g}/{g:g}": (p, g) for p in self.prompt_rates for g in self.generation_rates}

    @staticmethod
    def met(trace: Trace, prompt_rate: float, generation_rate: float, ema_span: int = 16) -> bool:
        if trace.ttft > trace.prompt_tokens / prompt_rate:
            return False
        alpha, ema = 2 / (ema_span + 1), None
        for gap in trace.inter_token:
            rate = 1 / max(gap, 1e-9)
            ema = rate if ema is None else alpha * rate + (1 - alpha) * ema
            if ema < generation_rate:
                return False
        return True


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p95", "p99")}
    a = np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}}


def summarize(traces: list[Trace], seconds: float, sla: SLA) -> dict:
    """Every figure of one load point; failed requests count in `requests` only (and in `errors`)."""
    done = [t for t in traces if t.token_times and t.error is None]
    output = sum(len(t.token_times) for t in done)
    return {
        "requests": len(traces),
        "completed": len(done),
        "errors": sorted({t.error for t in traces if t.error}),
        "seconds": seconds,
        "requests_per_s": len(done) / seconds,
        "output_tok_per_s": output / seconds,
        "total_tok_per_s": (output + sum(t.prompt_tokens for t in done)) / seconds,
        "ttft_s": distribution([t.ttft for t in done]),
        "inter_token_s": distribution([g for t in done for g in t.inter_token]),
        "end_to_end_s": distribution([t.end_to_end for t in done]),
        "effective_throughput": {key: sum(sla.met(t, p, g, sla.ema_span) for t in done) / seconds for key, (p, g) in sla.targets().items()},
    }
