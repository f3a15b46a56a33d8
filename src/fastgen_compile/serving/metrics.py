"""The server's Prometheus metrics (vLLM's names with a fastgen_ prefix), in a registry of its own.

The engine's load (running, waiting, pages, preemptions, prefix cache hits) is read when Prometheus scrapes;
request latencies are observed by Service as outputs pass through it. A Ray Serve ingress holds
no engine: its gauges are the replicas' (serving/replicas.py), its latencies those it relays.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from fastgen_compile.engine.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


Gauges = dict[str, tuple[str, Callable[[], float]]]  # name -> (help, read at scrape time)


def engine_gauges(engine: Engine) -> Gauges:
    return {
        "requests_running": ("requests in the engine's running batch", lambda: len(engine.scheduler.running)),
        "requests_waiting": ("requests queued for admission", lambda: engine.num_waiting),
        "kv_pages_used": ("KV cache pages held by requests", lambda: engine.pages.num_used),
        "kv_pages_total": ("KV cache pages in the pool", lambda: engine.pages.num_pages),
        "kv_pages_cached": ("KV cache pages holding a cached prompt prefix, in use or not", lambda: engine.pages.num_cached),
    }


class Metrics:
    def __init__(self, engine: Engine | None, gauges: Gauges | None = None):
        """gauges: the snapshot gauges (default: the engine's load)."""
        self.engine = engine
        self.registry = r = CollectorRegistry()
        for name, (doc, read) in (engine_gauges(engine) if gauges is None else gauges).items():
            Gauge(f"fastgen_{name}", doc, registry=r).set_function(read)
        if engine is not None:
            r.register(_EngineCounters(engine))
        self.prompt_tokens = Counter("fastgen_prompt_tokens", "prompt tokens of the requests that started generating", registry=r)
        self.generation_tokens = Counter("fastgen_generation_tokens", "tokens generated", registry=r)
        self.requests_finished = Counter("fastgen_requests_finished", "requests ended, by finish reason", ["finish_reason"], registry=r)
        self.step_tokens = Histogram("fastgen_step_tokens", "tokens carried by each forward pass", buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("fastgen_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastgen_inter_token_latency_seconds", "between consecutive tokens of a request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fastgen_e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self._steps_seen = engine.num_steps if engine is not None else 0

    def render(self) -> bytes:
        """The exposition text; steps taken since the last scrape go into fastgen_step_tokens first."""
        if self.engine is None:
            return generate_latest(self.registry)
        now = self.engine.num_steps
        steps = self.engine.steps_since(self._steps_seen)[: now - self._steps_seen]
        self._steps_seen = now
        for s in steps:
            self.step_tokens.observe(s.decode_tokens + s.prompt_tokens)
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("fastgen_preemptions", "sequences preempted for KV pages (recomputed later)", value=self.engine.scheduler.num_preemptions)
        # a graph compiled after warmup: a shape or guard changed in the hot path, a bug to report
        yield CounterMetricFamily("fastgen_recompiles", "graphs compiled after warmup", value=self.engine.compiler.recompiles_since_warmup())
        # tokens, as vLLM counts them: hits / queries is the prefix cache's hit rate over any window
        pages = self.engine.pages
        yield CounterMetricFamily("fastgen_prefix_cache_queries", "prompt tokens looked up in the prefix cache, once per admission",
                                  value=pages.num_queried_tokens)
        yield CounterMetricFamily("fastgen_prefix_cache_hits", "of them, tokens found cached (their KV not computed)", value=pages.num_hit_tokens)
