"""Engine: add_request / step / abort. Wires loader, scheduler, block manager, batch, runner, sampler.

Thread-safe by construction: callers only touch the inbox (new requests, aborts); the
thread that calls `step` owns all other state.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch._dynamo.utils import counters

from fastgen_compile.batch import Batch, pack, pick_bucket
from fastgen_compile.block_manager import BlockManager
from fastgen_compile.config import EngineConfig
from fastgen_compile.errors import RequestError
from fastgen_compile.graphs import BucketWarmup, GraphCache, default_root, file_identity, prepared_gguf
from fastgen_compile.models.loader import LoadedModel, check_path, embedded_model_path, is_gguf, load
from fastgen_compile.progress import progress_bar
from fastgen_compile.runner import Runner
from fastgen_compile.sampling import SamplingParams, new_generator, sample
from fastgen_compile.scheduler import Scheduler, StepPlan
from fastgen_compile.sequence import RequestOutput, Sequence, Status

log = logging.getLogger(__name__)
T = TypeVar("T")

STEP_HISTORY = 100_000  # StepStats kept: a long-running engine must not grow without bound


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one forward pass carried: SplitFuse at work."""

    bucket: int
    decode_tokens: int
    prompt_tokens: int
    num_seqs: int
    seconds: float


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load, read from any thread (for a live display); counts may be a step apart."""

    running: int
    waiting: int
    pages_used: int
    pages_free: int
    num_steps: int
    recent_steps: list[StepStats]  # oldest first


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        self.config = config = config or EngineConfig(**overrides)
        path = check_path(config.model or embedded_model_path())
        graphs_root = Path(config.graphs_dir) if config.graphs_dir else default_root()
        loaded = self._load(path, graphs_root)
        self.model, self.tokenizer, self.hf_config, self.model_name = loaded.model, loaded.tokenizer, loaded.hf_config, loaded.name
        args = self.model.args
        self.max_model_len = config.max_model_len or args.max_position_embeddings
        if args.context_length is not None:
            self.max_model_len = min(self.max_model_len, args.context_length)
        num_pages = config.num_pages(Runner.kv_bytes_per_token(args, config), self.max_model_len)
        self.blocks = BlockManager(num_pages, config.page_size)
        self.scheduler = Scheduler(self.blocks, config.token_budget, config.max_seqs, config.policy, config.decode_rows)
        self.graph_cache = None
        if config.compile and config.graph_cache:
            self.graph_cache = GraphCache.for_engine(graphs_root, self.model_name, file_identity(path), self.model.args, config, num_pages)
        self.runner = Runner(self.model, config, num_pages, self.max_model_len, graphs_root, self.graph_cache)
        self.eos_token_ids = self._eos_token_ids()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self.step_stats: deque[StepStats] = deque(maxlen=STEP_HISTORY)
        self.num_steps = 0  # every step ever taken; step_stats keeps the newest
        self._stats_lock = threading.Lock()  # steps_since and snapshot copy step_stats on other threads
        self.warm = False
        self.warmups: list[BucketWarmup] = []  # what the last warmup did per bucket
        if config.compile and config.warmup:
            self.warmup()

    def _load(self, path: str, graphs_root: Path) -> LoadedModel:
        """A GGUF checkpoint loads from its prepared HF-folder copy when the graph cache is on."""
        c = self.config
        if not (c.graph_cache and is_gguf(path)):
            return load(path, c.torch_dtype, torch.device(c.device))
        folder = prepared_gguf(graphs_root, path, c.torch_dtype)
        return load(str(folder), c.torch_dtype, torch.device(c.device), name=Path(path).stem)

    def _eos_token_ids(self) -> frozenset[int]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---- set-up ----------------------------------------------------------------------

    def warmup(self) -> list[BucketWarmup]:
        """Compile (or load from graphs/) every bucket's forward now, progress shown; on CUDA
        capture each as a CUDA graph. Saves what it compiled; then a recompile is a bug."""
        # largest first: on CUDA the smaller buckets' graphs reuse its memory pool
        buckets = sorted(self.config.buckets, reverse=True)
        with progress_bar(f"compiling {len(buckets)} buckets") as bar:
            task = bar.add_task("warmup", total=len(buckets))
            for bucket in buckets:
                bar.update(task, description=f"bucket {bucket} tokens")
                self._compiling(bucket, functools.partial(self.runner.warm, self.pack(StepPlan(), bucket)))
                bar.advance(task)
        self.runner.mark_warm()
        self.warm = True
        self._save_graphs()
        return self.warmups

    def _compiling(self, bucket: int, forward: Callable[[], T], save: bool = False) -> T:
        """Run a forward that may compile bucket's graph; if it did, note the time and whether
        inductor loaded it from graphs/ (hit) or built it (miss), and save a miss if asked."""
        inductor = counters["inductor"]
        t0, hits, compiled = time.perf_counter(), inductor["fxgraph_cache_hit"], self.runner.graphs_compiled
        result = forward()
        if self.runner.graphs_compiled > compiled:
            done = BucketWarmup(bucket, time.perf_counter() - t0, "hit" if inductor["fxgraph_cache_hit"] > hits else "miss")
            self.warmups = sorted([w for w in self.warmups if w.bucket != bucket] + [done], key=lambda w: w.bucket)
            if save and done.cache == "miss":
                self._save_graphs()
        return result

    def _save_graphs(self) -> None:
        if self.graph_cache is not None and (not self.graph_cache.loaded or any(w.cache == "miss" for w in self.warmups)):
            self.graph_cache.save(self.warmups)

    # ---- requests --------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise RequestError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | None = None, params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None) -> int:
        """Validate and queue a request; returns its id. Raises RequestError on bad input."""
        return self.submit(self.new_sequence(prompt, params, prompt_token_ids))

    def new_sequence(self, prompt: str | None = None, params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None) -> Sequence:
        """A validated request, not yet queued (so a batch can be checked whole first)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        total = len(ids) + params.max_new_tokens
        need = f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total}"
        if total > self.max_model_len:
            raise RequestError(f"{need} exceeds the model's context of {self.max_model_len} tokens")
        if total > self.blocks.capacity_tokens:
            raise RequestError(f"{need} exceeds the whole KV pool of {self.blocks.capacity_tokens} tokens")
        return Sequence(next(self._ids), ids, params, new_generator(params.seed), prompt=prompt)

    def submit(self, seq: Sequence) -> int:
        self._inbox.put(("add", seq))
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    # ---- the step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over what the scheduler chose; returns every request's news."""
        outputs = self._drain_inbox()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return outputs
        t0 = time.perf_counter()
        decode_tokens = plan.num_decode_tokens
        bucket = pick_bucket(self.config.buckets, plan)
        batch = self.pack(plan, bucket)
        # without warmup, a bucket's first use compiles (or loads) its graph
        logits = self.runner.forward(batch) if self.warm else self._compiling(bucket, lambda: self.runner.forward(batch), save=True)
        self.scheduler.update(plan)
        sampling = [c.seq for c in plan.chunks if c.samples]
        tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling]) if sampling else []
        for seq, token in zip(sampling, tokens):
            outputs.append(self._append_token(seq, token))
        stats = StepStats(bucket, decode_tokens, plan.num_tokens - decode_tokens, len(plan.chunks), time.perf_counter() - t0)
        with self._stats_lock:
            self.step_stats.append(stats)
            self.num_steps += 1
        return outputs

    def steps_since(self, num_steps: int) -> list[StepStats]:
        """Stats of every step after the first `num_steps` (as far as step_stats still holds them)."""
        with self._stats_lock:
            count = min(len(self.step_stats), self.num_steps - num_steps)
            return list(itertools.islice(reversed(self.step_stats), max(0, count)))[::-1]  # from the newest end: O(count)

    def snapshot(self, recent_steps: int = 32) -> EngineSnapshot:
        return EngineSnapshot(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            pages_used=self.blocks.num_used,
            pages_free=self.blocks.num_free,
            num_steps=self.num_steps,
            recent_steps=self.steps_since(self.num_steps - recent_steps),
        )

    def pack(self, plan: StepPlan, bucket: int) -> Batch:
        c = self.config
        decode_rows = min(bucket, c.decode_rows)  # a bucket below decode_rows is all decode rows
        return pack(plan, bucket, decode_rows, c.page_size, c.q_block, self.blocks.num_pages, self.model.args.sliding_window, self.runner.decode_table)

    def _drain_inbox(self) -> list[RequestOutput]:
        aborted = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add":
                self._seqs[item.seq_id] = item
                self.scheduler.add(item)
            elif (seq := self._seqs.pop(item, None)) is not None:
                self.scheduler.finish(seq, "abort")
                aborted.append(self._output(seq, "", []))
        return aborted

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.output_token_ids.append(token)
        p = seq.params
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        self._detokenize(seq, final=reason is not None)
        if p.stop and (cut := self._stop_string_start(seq)) is not None:
            seq.text, reason = seq.text[:cut], "stop"
        # until the end, hold back what could still become the start of a stop string
        hold = 0 if reason or not p.stop else max(map(len, p.stop)) - 1
        emit_to = max(seq.num_emitted, len(seq.text) - hold)
        delta, seq.num_emitted = seq.text[seq.num_emitted : emit_to], emit_to
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.seq_id, None)
        return self._output(seq, delta, [token])

    def _detokenize(self, seq: Sequence, final: bool) -> None:
        """Refresh seq.text, except while it ends in a partial UTF-8 character."""
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if final or not text.endswith("\ufffd"):
            seq.text = text

    @staticmethod
    def _stop_string_start(seq: Sequence) -> int | None:
        """Where the earliest stop string starts; the emitted text holds none (see hold)."""
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, seq.num_emitted)) >= 0]
        return min(hits) if hits else None

    def _output(self, seq: Sequence, delta_text: str, delta_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text[: seq.num_emitted],
            token_ids=list(seq.output_token_ids),
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            finished=seq.status is Status.FINISHED,
            finish_reason=seq.finish_reason,
        )

    def recompiles_since_warmup(self) -> int:
        return self.runner.recompiles_since_warmup()
