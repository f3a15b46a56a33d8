"""The serving benchmark: SLA arithmetic on hand-made traces, and a tiny end-to-end run of
`fastgen-compile bench` whose JSON must account for every prompt and generated token."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from fastgen_compile.bench.clients import closed_loop, poisson
from fastgen_compile.bench.metrics import SLA, Trace, distribution, summarize
from fastgen_compile.bench.report import PLOTS
from fastgen_compile.bench.systems import missing_engines
from fastgen_compile.bench.workload import Request, multi_turn_workload, normal_lengths
from fastgen_compile.cli import main


def trace(prompt: int, ttft: float, gaps: list[float]) -> Trace:
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return Trace(prompt, 0.0, times)


def test_sla_prompt_rate_bounds_time_to_first_token():
    assert SLA.met(trace(1024, 2.0, [0.1] * 5), 512, 4)
    assert not SLA.met(trace(1024, 2.01, [0.1] * 5), 512, 4)
    assert SLA.met(trace(1024, 2.01, [0.1] * 5), 256, 4)


def test_sla_generation_ema_must_hold_at_every_token():
    steady = trace(512, 0.5, [0.2] * 20)  # 5 tok/s throughout
    assert SLA.met(steady, 512, 4) and not SLA.met(steady, 512, 6)
    # one 2 s stall: the EMA falls to 2/17*0.5 + 15/17*5 = 4.47 tok/s, still >= 4 but < 4.5
    stalled = trace(512, 0.5, [0.2] * 10 + [2.0] + [0.2] * 10)
    assert SLA.met(stalled, 512, 4, ema_span=16) and not SLA.met(stalled, 512, 4.5, ema_span=16)
    assert not SLA.met(stalled, 512, 4, ema_span=4)  # a shorter span forgets less: 2/5*0.5 + 3/5*5 = 3.2


def test_summarize_counts_failed_requests_apart():
    ok = trace(100, 0.1, [0.1, 0.1])
    failed = Trace(100, 0.0, error="RequestError: too long")
    s = summarize([ok, failed], seconds=2.0, sla=SLA(prompt_rates=(512, 2000), generation_rates=(2,)))
    assert (s["requests"], s["completed"], s["errors"]) == (2, 1, ["RequestError: too long"])
    assert s["output_tok_per_s"] == 1.5 and s["total_tok_per_s"] == 51.5
    assert s["effective_throughput"] == {"512/2": 0.5, "2000/2": 0.0}  # at 2000 tok/s, 100 prompt tokens allow 0.05 s
    assert s["inter_token_s"]["p50"] == pytest.approx(0.1)


def test_distribution_percentiles():
    d = distribution([float(i) for i in range(1, 101)])
    assert d["mean"] == 50.5 and d["p50"] == 50.5 and d["p99"] == pytest.approx(99.01)


def test_normal_lengths_follow_the_paper():
    rng = random.Random(0)
    lengths = normal_lengths(rng, 1000, 4000, low=250, high=2000)
    mean = sum(lengths) / len(lengths)
    std = (sum((x - mean) ** 2 for x in lengths) / len(lengths)) ** 0.5
    assert 980 < mean < 1020 and 285 < std < 315 and min(lengths) >= 250 and max(lengths) <= 2000


class FakeSystem:
    """Streams max_new_tokens tokens, 1 ms apart; records how many requests overlap."""

    name = "fake"

    def __init__(self):
        self.lock, self.active, self.most_active, self.sent = threading.Lock(), 0, 0, []

    def stream(self, request: Request):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.sent.append(time.perf_counter())
        for _ in range(request.max_new_tokens):
            time.sleep(0.001)
            yield 1
        with self.lock:
            self.active -= 1


def test_closed_loop_keeps_exactly_n_clients_busy():
    system, done = FakeSystem(), []
    requests = [Request([1] * (i + 1), 5 + i) for i in range(9)]
    traces = closed_loop(system, requests, clients=3, done=lambda: done.append(1))
    assert system.most_active == 3 and len(done) == 9
    assert [(t.prompt_tokens, len(t.token_times)) for t in traces] == [(i + 1, 5 + i) for i in range(9)]


def test_poisson_arrivals_do_not_wait_for_answers():
    system = FakeSystem()
    requests = [Request([1], 50) for _ in range(6)]  # each takes >= 50 ms; arrivals every ~5 ms
    traces = poisson(system, requests, rate=200.0, seed=0, done=lambda: None)
    assert system.most_active > 1 and all(len(t.token_times) == 50 for t in traces)
    assert max(system.sent) - min(system.sent) < 0.25  # all sent long before 6 x 50 ms of answers


def engine_flags(config: dict) -> list[str]:
    """The conftest engines' configuration as bench flags (their compiled graphs are reused)."""
    return ["--dtype", "float32", "--buckets", *map(str, config["buckets"]), "--decode-rows", str(config["decode_rows"]),
            "--page-size", str(config["page_size"]), "--q-block", str(config["q_block"]), "--kv-pages", str(config["kv_pages"])]


def test_multi_turn_requests_resend_their_history(hf_tokenizer):
    requests = multi_turn_workload(hf_tokenizer, 6, opening_mean=40, question_mean=8, gen_mean=5, turns=3)
    first, second = requests[0::2], requests[1::2]  # two conversations, turn-major
    for conversation in (first, second):
        for earlier, later in zip(conversation, conversation[1:]):
            grown = len(later.prompt_token_ids) - len(earlier.prompt_token_ids)
            assert later.prompt_token_ids[: len(earlier.prompt_token_ids)] == earlier.prompt_token_ids
            assert grown > earlier.max_new_tokens  # the answer's stand-in, then the next question


def test_bench_quick_run_accounts_for_every_token(tmp_path, engine_config):
    out = tmp_path / "bench"
    argv = ["bench", "--requests", "3", "--prompt-mean", "40", "--gen-mean", "5", "--clients", "1", "2", "--out", str(out), *engine_flags(engine_config)]
    assert main(argv) == 0
    report = json.loads((out / "serving.json").read_text())
    settings, results = report["settings"], report["results"]
    assert settings["engine_config"]["buckets"] == list(engine_config["buckets"]) and settings["torch"]
    systems = [(r["system"], r["clients"]) for r in results]
    peers = () if "llama_cpp" in missing_engines() else ("llama.cpp",)  # an optional extra: in the default set where installed
    assert systems == [(s, c) for s in ("fastgen splitfuse", "fastgen splitfuse fixed", "fastgen prefill_first", "transformers CB", *peers) for c in (1, 2)]
    first_system = {r["clients"]: r for r in results[:2]}
    for r in results:
        prompts, gens = r["prompt_lengths"], r["gen_lengths"]
        assert (prompts, gens) == (first_system[r["clients"]]["prompt_lengths"], first_system[r["clients"]]["gen_lengths"])
        assert (r["requests"], r["completed"], r["errors"]) == (3, 3, [])
        assert round(r["output_tok_per_s"] * r["seconds"]) == sum(gens)
        assert set(r["effective_throughput"]) == {f"{p}/{g}" for p in (512, 128) for g in (2, 4, 6)}
        for metric in ("ttft_s", "inter_token_s", "end_to_end_s"):
            assert set(r[metric]) == {"mean", "p50", "p90", "p95", "p99"}
        if r["system"].startswith("fastgen"):
            # every prompt token computed exactly once; every token after the first comes from a decode
            assert sum(s["prompt_tokens"] for s in r["steps"]) == sum(prompts)
            assert sum(s["decode_tokens"] for s in r["steps"]) == sum(gens) - len(gens)
    assert set(report["comparisons"]) == {"splitfuse vs prefill_first", "splitfuse vs fixed budget", "splitfuse vs transformers CB"}
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_shared_prefix_compares_the_prefix_cache_on_and_off(tmp_path, engine_config):
    out = tmp_path / "bench"
    argv = ["bench", "--workload", "shared_prefix", "--requests", "3", "--prefix-tokens", "64", "--question-mean", "8", "--gen-mean", "3",
            "--clients", "1", "--out", str(out), *engine_flags(engine_config),
            "--no-compile", "--linear-kernel", "aten"]  # eager, kernels not timed: what is counted is the same
    assert main(argv) == 0
    report = json.loads((out / "serving.json").read_text())
    on, off = report["results"]
    assert (on["system"], off["system"]) == ("fastgen splitfuse", "fastgen splitfuse nocache")
    prompts = on["prompt_lengths"]
    assert all(65 <= n <= 80 for n in prompts)  # the document's 4 pages, then a question within the 5th page
    # one client: the first request computes the document, the next two take its 4 pages
    assert on["prefix_cache"] == {"queried_tokens": sum(prompts), "hit_tokens": 2 * 64}
    assert off["prefix_cache"] == {"queried_tokens": 0, "hit_tokens": 0}
    assert sum(s["prompt_tokens"] for s in on["steps"]) == sum(prompts) - 2 * 64
    assert sum(s["prompt_tokens"] for s in off["steps"]) == sum(prompts)
    assert list(report["comparisons"]) == ["prefix cache on vs off"]
