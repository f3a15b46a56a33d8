"""What a forward pass costs on this machine, measured at warmup, and the token budget it allows.

A step's time is, to a good approximation, a fixed cost of its bucket (every linear multiplies
the bucket's rows, padding included) plus attention, which grows with the keys each row reads:

    seconds = bucket_seconds[bucket] + decode_key_seconds * decode_keys + prompt_key_seconds * prompt_keys

decode_keys: the context lengths of the step's decode rows, summed; prompt_keys: for each prompt
chunk of n tokens ending at position e, n * e. The three terms are timed once per engine key on
the compiled graphs themselves (empty buckets, then a full decode region and a full prompt chunk
at a long context) and kept beside the graphs, so a warm start has them and another CPU or GPU
measures its own.

Where this curve is flat (a GPU, or a CPU in its memory-bound range), a larger prompt chunk is
nearly free and SplitFuse's fixed budget is right; where it climbs with the rows (this 2-core CPU:
a 288-row step is several times a decode step), a prompt chunk stalls every running decode in
proportion to its size. The scheduler uses the curve to keep steps that carry decodes within an
inter-token latency target (engine/scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fastgen_compile.engine.scheduler import Chunk, StepPlan
from fastgen_compile.engine.sequence import Sequence
from fastgen_compile.progress import progress_bar
from fastgen_compile.request import SamplingParams

RECORD = "step_costs.json"
# with no ITL target given, prompt chunks grow until the prompt throughput is this share of the best
KNEE = 0.9
REPEATS = 5  # timed forwards per point; the median counts (the machine is shared)
LONG_CONTEXT = 1024  # keys per row in the attention measurements, where the pool holds that many
STAND_IN_KV_IDS = 1 << 30  # owner tags of the measurement's sequences: no request's (they count from 0)


@dataclass(frozen=True)
class StepCosts:
    bucket_seconds: dict[int, float]  # the forward of an empty bucket: linears, norms, the fixed cost
    decode_key_seconds: float  # per key a decode row reads
    prompt_key_seconds: float  # per (prompt token x key up to its chunk's end)

    def predict(self, bucket: int, decode_keys: int = 0, prompt_keys: int = 0) -> float:
        return self.bucket_seconds[bucket] + self.decode_key_seconds * decode_keys + self.prompt_key_seconds * prompt_keys

    def with_prompt(self, buckets: tuple[int, ...], plan: StepPlan, k: int, end: float) -> float:
        """The plan's step with k more prompt tokens, in a chunk ending at position `end` (buckets sorted)."""
        bucket = next(b for b in buckets if b >= plan.num_tokens + k)
        return self.predict(bucket, plan.decode_keys, plan.prompt_keys + int(k * end))

    def knee(self, buckets: tuple[int, ...], plan: StepPlan, at: int) -> int:
        """The fewest prompt tokens (a chunk from position `at`) whose throughput, tokens per predicted
        step second, is within KNEE of the best any bucket gives the plan."""
        fills = [b - plan.num_tokens for b in buckets if b > plan.num_tokens]
        rates = [k / self.with_prompt(buckets, plan, k, at + k) for k in fills]
        return next(k for k, r in zip(fills, rates) if r >= KNEE * max(rates))

    def to_json(self) -> dict:
        return {"bucket_seconds": {str(b): s for b, s in self.bucket_seconds.items()},
                "decode_key_seconds": self.decode_key_seconds, "prompt_key_seconds": self.prompt_key_seconds}

    @classmethod
    def from_json(cls, data: dict) -> StepCosts:
        return cls({int(b): float(s) for b, s in data["bucket_seconds"].items()}, float(data["decode_key_seconds"]), float(data["prompt_key_seconds"]))

    def table(self) -> list[tuple[int, float]]:
        """(bucket, ms) of every bucket, smallest first."""
        return [(b, 1e3 * s) for b, s in sorted(self.bucket_seconds.items())]


def measure(forward: Callable[[StepPlan, int], object], buckets: tuple[int, ...], decode_rows: int, max_seqs: int,
            page_size: int, num_pages: int, max_model_len: int) -> StepCosts:
    """Time the compiled forward (forward(plan, bucket)) of every bucket empty, then a full decode
    region and a full prompt chunk at a long context. The plans' page tables point at free pool
    pages; what the forwards write there is overwritten before any request reads it."""
    largest = max(buckets)
    decodes = min(decode_rows or largest, max_seqs, largest)
    usable = num_pages - 1  # page 0 is the scratch page
    decode_context = max(1, min(LONG_CONTEXT, usable // decodes * page_size, max_model_len - 1))
    chunk = largest - decode_rows if decode_rows and largest > decode_rows else largest
    chunk_start = max(0, min(LONG_CONTEXT, usable * page_size - chunk, max_model_len - chunk) // page_size * page_size)
    with progress_bar("measuring step costs") as bar:
        task = bar.add_task("", total=len(buckets) + 2)
        seconds = {}
        for b in sorted(buckets):
            bar.update(task, description=f"bucket {b} empty")
            seconds[b] = _median_seconds(forward, StepPlan(), b)
            bar.advance(task)
        bar.update(task, description=f"{decodes} decodes at {decode_context} keys")
        decode_plan = _plan([(decode_context, 1)] * decodes, page_size)
        decode_bucket = min(b for b in buckets if b >= decodes)
        per_decode_key = _per_key(forward, decode_plan, decode_bucket, seconds[decode_bucket])
        bar.advance(task)
        bar.update(task, description=f"a {chunk}-token chunk after {chunk_start} keys")
        prompt_plan = _plan([(chunk_start + chunk, chunk)], page_size)
        per_prompt_key = _per_key(forward, prompt_plan, largest, seconds[largest])
        bar.advance(task)
    return StepCosts(seconds, per_decode_key, per_prompt_key)


def _per_key(forward: Callable[[StepPlan, int], object], plan: StepPlan, bucket: int, empty: float) -> float:
    return max(0.0, (_median_seconds(forward, plan, bucket) - empty) / max(plan.decode_keys + plan.prompt_keys, 1))


def _plan(chunks: list[tuple[int, int]], page_size: int) -> StepPlan:
    """Stand-in sequences, each (length, tokens computed now: 1 is a decode), on disjoint pool pages from page 1."""
    plan, next_page = StepPlan(), 1
    for i, (length, n) in enumerate(chunks):
        seq = Sequence(-1 - i, [0] * length, SamplingParams(max_new_tokens=1), kv_id=STAND_IN_KV_IDS + i)
        pages = -(-length // page_size)
        seq.page_table, next_page = list(range(next_page, next_page + pages)), next_page + pages
        plan.add(Chunk(seq, length - n, n, is_decode=n == 1))
    return plan


def _median_seconds(forward: Callable[[StepPlan, int], object], plan: StepPlan, bucket: int) -> float:
    forward(plan, bucket)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        forward(plan, bucket)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
