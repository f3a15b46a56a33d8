"""Engine: add_requests / step / abort. Wires loader, scheduler, pages, batch, runner, sampler, detokenizer.

Thread-safe by construction: callers only touch the inbox (new requests, aborts); the
thread that calls `step` owns all other state.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastgen_compile import kernels
from fastgen_compile.artifacts import default_root, file_identity
from fastgen_compile.config import EngineConfig
from fastgen_compile.engine import step_costs
from fastgen_compile.engine.batch import Batch, pack, pick_bucket
from fastgen_compile.engine.compiler import Compiler, start_isa_probe
from fastgen_compile.engine.detokenizer import Detokenizer
from fastgen_compile.engine.graph_cache import BucketWarmup, GraphCache
from fastgen_compile.engine.pages import PageManager
from fastgen_compile.engine.parallel import Leader, TensorParallel
from fastgen_compile.engine.runner import Runner
from fastgen_compile.engine.sampler import Sampler, token_logprobs
from fastgen_compile.engine.scheduler import Scheduler, StepPlan
from fastgen_compile.engine.sequence import Sequence, Status
from fastgen_compile.engine.step_costs import StepCosts
from fastgen_compile.errors import RequestError
from fastgen_compile.models.loader import check_path, embedded_model_path, load
from fastgen_compile.models.quantize import quantize_model
from fastgen_compile.models.shard import WHOLE
from fastgen_compile.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

STEP_HISTORY = 100_000  # StepStats kept: a long-running engine must not grow without bound

Prompt = str | list[int]  # text, or token ids


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one forward pass carried: SplitFuse at work."""

    bucket: int
    decode_tokens: int
    prompt_tokens: int
    num_seqs: int
    seconds: float
    predicted: float | None = None  # by the step costs, where the engine has them


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load, read from any thread (for a live display); counts may be a step apart."""

    running: int
    waiting: int
    pages_used: int
    pages_free: int
    pages_cached: int  # holding a cached prefix, referenced or not
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache, ever
    prefix_hit_tokens: int  # of them, found
    num_steps: int
    recent_steps: list[StepStats]  # oldest first


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, tp: TensorParallel | None = None, **overrides):
        """tp: this engine is a worker rank of tensor parallelism (engine/parallel.py); rank 0, the
        engine a caller builds, makes its own side from config.tensor_parallel_size."""
        self.config = c = config or EngineConfig(**overrides)
        device = torch.device(c.device)
        path = check_path(c.model or embedded_model_path())
        root = Path(c.graphs_dir) if c.graphs_dir else default_root()
        self.tp = tp or (Leader(c) if c.tensor_parallel_size > 1 else None)
        shard = self.tp.shard if self.tp else WHOLE
        isa_probe = start_isa_probe(device) if c.compile else None
        loaded = load(path, c.torch_dtype, device, prepared_root=root if c.graph_cache else None, shard=shard)
        self.quantization = c.quantized_parts(loaded.stored_as, device)
        quantize_model(loaded.model, self.quantization.get("layers"), self.quantization.get("lm_head"))
        self.model, self.tokenizer, self.model_name = loaded.model, loaded.tokenizer, loaded.name
        args = self.model.args
        self.max_model_len = c.max_model_len or args.max_position_embeddings
        if args.context_length is not None:
            self.max_model_len = min(self.max_model_len, args.context_length)
        # decided once, before the pool is sized: the kernel's copy of the pool is only made where it runs
        decode_kernel = (c.decode_kernel and c.decode_rows > 0 and kernels.paged_decode_fits(device, c.torch_dtype, args.head_dim)
                         and kernels.paged_decode_available(root))
        prefix_caching = c.prefix_caching and args.sliding_window is None
        if c.prefix_caching and not prefix_caching:
            # a window evicts a cached page's keys from some queries only: not built, so not cached
            log.info("prefix caching is off: %s attends through a sliding window of %d tokens", self.model_name, args.sliding_window)

        def graphs_for(pages: int) -> GraphCache | None:
            if not (c.compile and c.graph_cache):
                return None
            return GraphCache.for_engine(root, self.model_name, file_identity(path), args, c, pages, decode_kernel, self.quantization,
                                         prefix_caching, shard)

        # each rank's pool holds its KV heads; on CPU the ranks share one memory, so they share its budget
        ranks_in_memory = shard.world if device.type == "cpu" else 1
        warmed = shape.warmed_pool_sizes() if (shape := graphs_for(0)) else []
        num_pages = c.num_pages(Runner.kv_bytes_per_token(args, c, decode_kernel) * ranks_in_memory, self.max_model_len, warmed)
        self.pages = PageManager(num_pages, c.page_size, prefix_caching, identity=f"{self.model_name} {file_identity(path)} {self.quantization}")
        self.scheduler = Scheduler(self.pages, c.buckets, c.max_seqs, c.policy, c.decode_rows)
        self.sampler = Sampler()
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = self._eos_token_ids(loaded.eos_token_id)
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self.step_stats: deque[StepStats] = deque(maxlen=STEP_HISTORY)
        self.num_steps = 0  # every step ever taken; step_stats keeps the newest
        self._stats_lock = threading.Lock()  # steps_since and snapshot copy step_stats on other threads
        self.step_costs: StepCosts | None = None  # measured at warmup (or kept with the graphs)
        graph_cache = graphs_for(num_pages)
        # from reading the graphs to saving them; the workers are ended if anything here fails
        with graph_cache.exclusive() if graph_cache else contextlib.nullcontext(), self._closed_on_error():
            if graph_cache is not None:
                graph_cache.open()
            if self.tp is not None:  # rank 0 starts the other ranks, which build their shards meanwhile
                self.tp.start(replace(c, kv_pages=num_pages))
            if isa_probe is not None:
                isa_probe.join()
            # tensor parallelism's graphs hold its process group, which torch cannot pickle: traced at each start
            self.compiler = Compiler(c.compile, device, graph_cache, c.strict_recompiles, precompile=self.tp is None)
            self.runner = Runner(self.model, c, num_pages, self.max_model_len, self.compiler, decode_kernel, prefix_caching, tp=self.tp)
            if self.tp is not None:
                self.tp.connect()
            if c.compile and c.warmup:
                self.warmup()
            elif graph_cache is not None and (saved := graph_cache.record(step_costs.RECORD)) is not None:
                self._use_step_costs(StepCosts.from_json(saved))

    def close(self) -> None:
        """End tensor parallelism's workers (idempotent; called on the thread that steps the engine).
        A one-process engine holds nothing to end."""
        if self.tp is not None:
            self.tp.close()

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

    def _eos_token_ids(self, eos: int | list[int] | None) -> frozenset[int]:
        """The config's eos ids and the tokenizer's."""
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def warmup(self) -> list[BucketWarmup]:
        """Compile (or load from the graph cache) every bucket's forward now (see Compiler.warmup),
        then read or measure the step costs that size SplitFuse's steps."""
        warmups = self.compiler.warmup(self.config.buckets, lambda bucket: self.runner.forward(self.pack(StepPlan(), bucket)))
        cache = self.compiler.graph_cache
        if cache is not None and (saved := cache.record(step_costs.RECORD)) is not None:
            costs = StepCosts.from_json(saved)
        else:
            c = self.config
            costs = step_costs.measure(lambda plan, bucket: self.runner.forward(self.pack(plan, bucket)), c.buckets, c.decode_rows,
                                       c.max_seqs, c.page_size, self.pages.num_pages, self.max_model_len)
            if cache is not None:
                cache.save_record(step_costs.RECORD, costs.to_json(), warmups)
        self._use_step_costs(costs)
        return warmups

    def _use_step_costs(self, costs: StepCosts) -> None:
        """Predictions in the step stats; SplitFuse's SLA-aware budget unless itl_target_ms is 0."""
        c = self.config
        self.step_costs = costs
        if c.itl_target_ms != 0 and c.policy == "splitfuse":
            self.scheduler.use_costs(costs, None if c.itl_target_ms is None else c.itl_target_ms / 1e3, c.prompt_rate)

    # ---- requests --------------------------------------------------------------------

    def add_requests(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None) -> list[int]:
        """Validate every request, then queue them all (all or nothing): a RequestError naming the
        first bad one queues none. params: one for all, or one per prompt. Returns the request ids."""
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [self._new_sequence(prompt, p) for prompt, p in zip(prompts, params)]
        for seq in seqs:
            self._inbox.put(("add", seq))
        return [seq.seq_id for seq in seqs]

    def _new_sequence(self, prompt: Prompt, params: SamplingParams | None) -> Sequence:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (list, tuple)):
            ids, text = list(prompt), None
        else:
            raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        total = len(ids) + params.max_new_tokens
        need = f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total}"
        if total > self.max_model_len:
            raise RequestError(f"{need} exceeds the model's context of {self.max_model_len} tokens")
        if total > self.pages.capacity_tokens:
            raise RequestError(f"{need} exceeds the whole KV pool of {self.pages.capacity_tokens} tokens")
        return Sequence(next(self._ids), ids, params, prompt=text, arrival=time.perf_counter())

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix before the next step (requests running keep their pages)."""
        self._inbox.put(("reset_prefix_cache", None))

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted (queued, or still in the inbox); read from any thread."""
        with self._inbox.mutex:
            in_inbox = sum(1 for kind, _ in self._inbox.queue if kind == "add")
        return len(self.scheduler.waiting) + in_inbox

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    # ---- the step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over what the scheduler chose; returns every request's news."""
        outputs = self._drain_inbox()
        plan = self.scheduler.schedule(time.perf_counter())
        if not plan.chunks:
            return outputs
        t0 = time.perf_counter()
        bucket = pick_bucket(self.config.buckets, plan)
        batch = self.pack(plan, bucket)
        scored = self._prompt_logprob_rows(plan, batch)
        rows = torch.cat([batch.sample_rows, *(torch.from_numpy(r) for _, _, r in scored)]) if scored else None
        logits = self.runner.forward(batch, rows)
        self.scheduler.update(plan)
        sampling = [c.seq for c in plan.chunks if c.samples]
        sampled, logits = logits[: len(sampling)], logits[len(sampling) :]
        if scored:
            self._record_prompt_logprobs(scored, logits)
        if sampling:
            tokens = self.sampler(self._ban_early_stops(sampled, sampling), [(s.seq_id, s.params) for s in sampling])
            self._record_logprobs(sampled, sampling, tokens)
            for seq, token in zip(sampling, tokens):
                outputs.append(self._append_token(seq, token))
        predicted = self.step_costs.predict(bucket, plan.decode_keys, plan.prompt_keys) if self.step_costs else None
        stats = StepStats(bucket, plan.num_decode_tokens, plan.num_tokens - plan.num_decode_tokens, len(plan.chunks), time.perf_counter() - t0, predicted)
        with self._stats_lock:
            self.step_stats.append(stats)
            self.num_steps += 1
        return outputs

    def _prompt_logprob_rows(self, plan: StepPlan, batch: Batch) -> list[tuple[Sequence, int, np.ndarray]]:
        """(sequence, first position, rows) of the prompt positions whose logits score the next
        prompt token, for sequences asking prompt_logprobs; positions already scored before a
        preemption are not scored again."""
        scored = []
        for chunk, rows in zip(plan.chunks, batch.chunk_rows):
            seq = chunk.seq
            if seq.params.prompt_logprobs is None:
                continue
            first = max(chunk.start, len(seq.prompt_logprobs) - 1)
            end = min(chunk.start + chunk.num_tokens, len(seq.prompt_token_ids) - 1)
            if end > first:
                scored.append((seq, first, rows[first - chunk.start : end - chunk.start]))
        return scored

    def _record_prompt_logprobs(self, scored: list[tuple[Sequence, int, np.ndarray]], logits: torch.Tensor) -> None:
        targets = [t for seq, first, rows in scored for t in seq.prompt_token_ids[first + 1 : first + 1 + len(rows)]]
        tops = [seq.params.prompt_logprobs for seq, _, rows in scored for _ in rows]
        found = iter(token_logprobs(logits, targets, tops))
        for seq, _, rows in scored:
            seq.prompt_logprobs.extend(next(found) for _ in rows)

    def _record_logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
        asking = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if asking:
            found = token_logprobs(logits[asking], [tokens[i] for i in asking], [seqs[i].params.logprobs for i in asking])
            for i, logprob in zip(asking, found):
                seqs[i].logprobs.append(logprob)

    def _ban_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Below min_tokens, eos and the stop tokens cannot be sampled (a copy; the logprobs see the model's own)."""
        banned = [(i, t) for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens for t in self._stop_ids(s.params)]
        if not banned:
            return logits
        rows, ids = zip(*banned)
        logits = logits.clone()
        logits[list(rows), list(ids)] = float("-inf")
        return logits

    def _stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
        return p.stop_token_ids if p.ignore_eos else (*p.stop_token_ids, *self.eos_token_ids)

    def steps_since(self, num_steps: int) -> list[StepStats]:
        """Stats of every step after the first `num_steps` (as far as step_stats still holds them)."""
        with self._stats_lock:
            count = min(len(self.step_stats), self.num_steps - num_steps)
            return list(itertools.islice(reversed(self.step_stats), max(0, count)))[::-1]  # from the newest end: O(count)

    def snapshot(self, recent_steps: int = 32) -> EngineSnapshot:
        return EngineSnapshot(
            running=len(self.scheduler.running),
            waiting=self.num_waiting,
            pages_used=self.pages.num_used,
            pages_free=self.pages.num_free,
            pages_cached=self.pages.num_cached,
            prefix_queried_tokens=self.pages.num_queried_tokens,
            prefix_hit_tokens=self.pages.num_hit_tokens,
            num_steps=self.num_steps,
            recent_steps=self.steps_since(self.num_steps - recent_steps),
        )

    def pack(self, plan: StepPlan, bucket: int) -> Batch:
        c = self.config
        decode_rows = min(bucket, c.decode_rows)  # a bucket below decode_rows is all decode rows
        return pack(plan, bucket, decode_rows, c.page_size, c.q_block, self.pages.num_pages, self.model.args.sliding_window, self.runner.decode_table)

    def _drain_inbox(self) -> list[RequestOutput]:
        aborted = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == "add":
                self._seqs[item.seq_id] = item
                self.scheduler.add(item)
            elif kind == "reset_prefix_cache":
                log.info("prefix cache reset: %d pages forgotten", self.pages.reset_prefix_cache())
            elif (seq := self._seqs.get(item)) is not None:
                self._finish(seq, "abort")
                aborted.append(self._output(seq, "", []))
        return aborted

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.output_token_ids.append(token)
        p = seq.params
        may_stop = len(seq.output_token_ids) >= p.min_tokens
        reason: FinishReason | None = None
        if may_stop and token in self._stop_ids(p):
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        stop_strings = p.stop if may_stop else ()
        delta, stopped = self.detokenizer.update(seq.text_state, seq.output_token_ids, stop_strings, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is not None:
            self._finish(seq, reason)
        return self._output(seq, delta, [token])

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq.seq_id)
        del self._seqs[seq.seq_id]

    def _output(self, seq: Sequence, delta_text: str, delta_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text_state.text[: seq.text_state.num_emitted],
            token_ids=list(seq.output_token_ids),
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            finished=seq.status is Status.FINISHED,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            # complete (and no longer written) from the first sampled token on: no copy per token
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
        )
