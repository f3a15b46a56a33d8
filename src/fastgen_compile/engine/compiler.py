"""The compile lifecycle of one engine, in one place: compiling each bucket's layer graph (at
warmup, or on first use), counting graphs, loading and saving them through the graph cache,
capturing CUDA graphs, and the recompile guard that holds once warmup is over.

The runner hands over the layer function once (`compile`) and then runs every bucket's
forward through `run`, the same call whether it compiles, replays a CUDA graph or just runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch._dynamo.utils import counters

from fastgen_compile.engine.graph_cache import BucketWarmup, GraphCache
from fastgen_compile.errors import RecompileError
from fastgen_compile.progress import progress_bar

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64


def _without_pytree_registry_guards(guards) -> list[bool]:
    """Drop guards on the size of torch's pytree registry: any later import that registers a type
    (transformers registers each ModelOutput class when its model runs) failed them and recompiled
    every bucket while serving. Our inputs' own types are registered before warmup and keep their
    meaning, so those guards protect nothing here."""
    return ["SUPPORTED_NODES" not in g.name for g in guards]


class Compiler:
    def __init__(self, enabled: bool, device: torch.device, graph_cache: GraphCache | None = None, strict: bool = False):
        """enabled False: the model runs eagerly. strict: a recompile after warmup raises
        RecompileError (the test suite's engines) instead of logging a warning."""
        self.enabled, self.graph_cache, self.strict = enabled, graph_cache, strict
        self.capture_cuda_graphs = enabled and device.type == "cuda"
        self.graphs_compiled = 0  # by this engine: other torch.compile users in the process don't count
        self.graphs_at_warmup: int | None = None  # None until warmup is over
        self.warmups: list[BucketWarmup] = []  # per bucket: how its graph came to be (compiled or loaded)
        self.last_recompile_reason: str | None = None
        self._guard_failures: list[str] = []  # why the next compile happens
        self._warming_up = False
        self._cuda_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, its output
        self._cuda_graph_pool = None  # one memory pool shared by every bucket's CUDA graph

    @property
    def warm(self) -> bool:
        return self.graphs_at_warmup is not None

    def compile(self, layer: Callable) -> Callable:
        """One graph per bucket shape, shared by all layers (weights and caches are inputs); its own
        guard cache, so other engines in the process neither count nor collide."""
        if not self.enabled:
            return layer
        return torch._dynamo.optimize(
            self._backend,
            nopython=True,
            dynamic=False,
            guard_fail_fn=self._guard_failed,
            guard_filter_fn=_without_pytree_registry_guards,
            recompile_limit=RECOMPILE_LIMIT,
            isolate_recompiles=True,
        )(layer)

    def _guard_failed(self, failure) -> None:
        self._guard_failures.append(failure.reason)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        reason = "; ".join(self._guard_failures) or "no guard failed: a new code path"
        self._guard_failures.clear()
        if self.warm:
            self.last_recompile_reason = reason
            if self.strict:
                raise RecompileError(f"recompile while serving: {reason}")
        self.graphs_compiled += 1
        with self.graph_cache.compiling() if self.graph_cache else contextlib.nullcontext():
            return compile_fx(gm, example_inputs)

    def run(self, bucket: int, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A bucket's forward (body: over its persistent input buffers): its CUDA graph replayed if
        it has one, else body run, which compiles the bucket's graph or loads it on first use."""
        if (captured := self._cuda_graphs.get(bucket)) is not None:
            graph, out = captured
            graph.replay()
            return out
        t0, hits, compiled = time.perf_counter(), counters["inductor"]["fxgraph_cache_hit"], self.graphs_compiled
        try:
            out = body()
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, RecompileError):
                raise e.inner_exception from None
            raise
        if self.graphs_compiled > compiled:
            if self.warm:
                log.warning("recompiled while serving (%d graphs since warmup): %s", self.recompiles_since_warmup(), self.last_recompile_reason)
            else:
                self._record(BucketWarmup(bucket, time.perf_counter() - t0, "hit" if counters["inductor"]["fxgraph_cache_hit"] > hits else "miss"))
        if self._warming_up and self.capture_cuda_graphs:
            out = self._capture(bucket, body)
        return out

    def _record(self, done: BucketWarmup) -> None:
        self.warmups = sorted([w for w in self.warmups if w.bucket != done.bucket] + [done], key=lambda w: w.bucket)
        if not self._warming_up and done.cache == "miss":  # compiled on first use: keep it for the next start
            self.save()

    def _capture(self, bucket: int, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record the bucket's whole forward; buckets share one memory pool (capture the largest first)."""
        if self._cuda_graph_pool is None:
            self._cuda_graph_pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._cuda_graph_pool):
            out = body()
        self._cuda_graphs[bucket] = (graph, out)
        return out

    def warmup(self, buckets: Iterable[int], forward: Callable[[int], object]) -> list[BucketWarmup]:
        """Compile (or load) every bucket's graph now, with progress shown, by a forward of each;
        on CUDA capture each as a CUDA graph. Saves what it compiled; from then on a recompile is a bug."""
        buckets = sorted(buckets, reverse=True)  # largest first: on CUDA the smaller graphs reuse its memory pool
        self._warming_up = True
        try:
            with progress_bar(f"compiling {len(buckets)} buckets") as bar:
                task = bar.add_task("warmup", total=len(buckets))
                for bucket in buckets:
                    bar.update(task, description=f"bucket {bucket} tokens")
                    forward(bucket)
                    bar.advance(task)
        finally:
            self._warming_up = False
        self.mark_warm()
        self.save()
        return self.warmups

    def mark_warm(self) -> None:
        """From now on every new graph counts as a recompile."""
        self.graphs_at_warmup = self.graphs_compiled
        self._guard_failures.clear()

    def recompiles_since_warmup(self) -> int:
        return 0 if self.graphs_at_warmup is None else self.graphs_compiled - self.graphs_at_warmup

    def save(self) -> None:
        """Write the graph cache's manifest, unless every graph was loaded from it."""
        if self.graph_cache is not None and (not self.graph_cache.loaded or any(w.cache == "miss" for w in self.warmups)):
            self.graph_cache.save(self.warmups)
