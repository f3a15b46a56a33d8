"""The compile lifecycle of one engine, in one place: compiling each bucket's layer graph (at
warmup, or on first use), counting graphs, loading and saving them through the graph cache,
capturing CUDA graphs, and the recompile guard that holds once warmup is over.

The runner hands over the layer function once (`compile`) and then runs every bucket's
forward through `run`, the same call whether it compiles, replays a CUDA graph or just runs.

With a graph cache, each bucket's graph is also *precompiled* (torch's `aot_compile`): dynamo's
trace, its guards and inductor's code saved as one file per bucket under the key, so a warm start
loads them and traces nothing (tracing was most of a warm start: ~1.5-4 s a bucket here).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch
from torch._dynamo.guards import CheckFunctionManager
from torch._dynamo.utils import counters

from fastgen_compile.engine.graph_cache import BucketWarmup, GraphCache, inductor_options
from fastgen_compile.errors import RecompileError
from fastgen_compile.progress import progress_bar

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
PRECOMPILED = "precompiled"  # under a graph cache's key folder: <bucket>.bin, one precompiled graph each


def _without_pytree_registry_guards(guards) -> list[bool]:
    """Drop guards on the size of torch's pytree registry: any later import that registers a type
    (transformers registers each ModelOutput class when its model runs) failed them and recompiled
    every bucket while serving. Our inputs' own types are registered before warmup and keep their
    meaning, so those guards protect nothing here."""
    return ["SUPPORTED_NODES" not in g.name for g in guards]


def _savable_guards(guards) -> list[bool]:
    """What a precompiled graph keeps: guards on its inputs' shapes, dtypes and strides. Guards on
    globals and object identities cannot be saved; what they protect (the model, the kernels
    chosen, torch's version) is in the graph cache's key, which names the file."""
    kept = _without_pytree_registry_guards(guards)
    return [k and not (g.is_global or g.guard_type in CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES) for k, g in zip(kept, guards)]


def start_isa_probe(device: torch.device) -> threading.Thread | None:
    """Inductor's probe of this CPU's vector ISAs, started on a thread: once a process, it loads a
    test library per ISA, each in a child Python (0.9 s of a 7 s warm start here, spent waiting on
    the children, without the GIL), so it can overlap the model's loading. Join it before compiling
    or loading a graph. None where graphs do not run on the CPU."""
    if device.type != "cpu":
        return None
    # imported here, not on the thread: two threads importing torch's modules at once can deadlock
    from torch._inductor import codecache, cpp_builder  # noqa: F401  (the probe's own lazy imports)
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    probe = threading.Thread(target=pick_vec_isa, name="isa-probe", daemon=True)
    probe.start()
    return probe


class Compiler:
    def __init__(self, enabled: bool, device: torch.device, graph_cache: GraphCache | None = None, strict: bool = False,
                 precompile: bool = True):
        """enabled False: the model runs eagerly. strict: a recompile after warmup raises
        RecompileError (the test suite's engines) instead of logging a warning. precompile: save
        each bucket's graph whole beside the graph cache's (False where torch cannot pickle it)."""
        self.enabled, self.graph_cache, self.strict = enabled, graph_cache, strict
        self.precompile = precompile and graph_cache is not None
        self.capture_cuda_graphs = enabled and device.type == "cuda"
        self.inductor_options = inductor_options(device)
        self.graphs_compiled = 0  # by this engine: other torch.compile users in the process don't count
        self.graphs_at_warmup: int | None = None  # None until warmup is over
        self.warmups: list[BucketWarmup] = []  # per bucket: how its graph came to be (compiled or loaded)
        self.last_recompile_reason: str | None = None
        self._guard_failures: list[str] = []  # why the next compile happens
        self._warming_up = False
        self._cuda_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> graph, its output
        self._cuda_graph_pool = None  # one memory pool shared by every bucket's CUDA graph
        self._precompiled: dict[int, object | None] = {}  # bucket -> its precompiled graph (None: it could not be made)
        self._came: str | None = None  # how the bucket now running got its precompiled graph: "hit" or "miss"

    @property
    def warm(self) -> bool:
        return self.graphs_at_warmup is not None

    def compile(self, layers: Callable) -> Callable:
        """layers: a bound method (what torch's precompile saves). One graph per bucket shape, shared
        by all layers (weights and caches are inputs); its own guard cache, so other engines in the
        process neither count nor collide. With a graph cache, a bucket's precompiled graph runs
        first, this dynamo one only where its guards fail."""
        if not self.enabled:
            return layers

        def optimize(guard_filter_fn: Callable) -> Callable:
            return torch._dynamo.optimize(self._backend, nopython=True, dynamic=False, guard_fail_fn=self._guard_failed,
                                          guard_filter_fn=guard_filter_fn, recompile_limit=RECOMPILE_LIMIT,
                                          isolate_recompiles=True)(layers)

        traced = optimize(_without_pytree_registry_guards)
        if not self.precompile:
            return traced
        owner, precompile = layers.__self__, optimize(_savable_guards).aot_compile

        def run(*args):
            bucket = args[0].shape[0]
            if bucket not in self._precompiled and not self.warm:
                self._precompiled[bucket] = self._load_or_precompile(bucket, precompile, args)
            graph = self._precompiled.get(bucket)
            if graph is not None and graph.guard_check(owner, *args):
                return graph(owner, *args)
            if self.warm:  # dynamo compiles unless it already has this shape: say why (its own guards have not run)
                self._guard_failures.append(self._why_not_precompiled(bucket, graph, (owner, *args)))
            try:
                return traced(*args)
            finally:
                self._guard_failures.clear()

        return run

    def _load_or_precompile(self, bucket: int, precompile: Callable, args: tuple):
        """The bucket's precompiled graph: loaded from the graph cache, else made from these inputs
        (the layers' arguments) and saved there. None if torch cannot precompile it (logged): dynamo's graph serves it."""
        path = self.graph_cache.folder / PRECOMPILED / f"{bucket}.bin"
        with self.graph_cache.compiling():  # inductor's built kernels are read from (and written to) the key folder
            graph = self._load(path) if path.is_file() else None
            self._came = "hit" if graph is not None else "miss"
            if graph is None:
                try:
                    graph = precompile((args, {}))
                except torch._dynamo.exc.BackendCompilerFailed:
                    raise  # inductor failed: as it would under dynamo (run() says why)
                except Exception as e:  # a graph torch cannot save: dynamo traces it at every start instead
                    log.warning("bucket %d cannot be precompiled (%s: %s); it is traced at each start", bucket, type(e).__name__, e)
                    return None
                path.parent.mkdir(exist_ok=True)
                graph.save_compiled_function(str(path))
        graph.disable_guard_check()  # run() checks them, once a call
        return graph

    def _why_not_precompiled(self, bucket: int, graph, args: tuple) -> str:
        if graph is None:
            warmed = ", ".join(str(b) for b, g in sorted(self._precompiled.items()) if g is not None)
            return f"an input of {bucket} rows, which no warmed bucket has (warmed: {warmed})"
        # what AOTCompiledFunction itself reports when its guards fail
        failed = graph._artifacts.guard_manager.check_verbose(graph.prepare_f_locals(*args))
        return f"the inputs of bucket {bucket} fail its precompiled graph's guards: {failed}"

    @staticmethod
    def _load(path):
        try:
            # a guard on an imported module (the prompt region's FlexAttention has one) installs
            # itself while unpickling, which needs a tracing context (torch 2.13)
            with open(path, "rb") as f, torch._guards.tracing(torch._guards.TracingContext(None)):
                return torch.compiler.load_compiled_function(f)
        except Exception as e:  # its checksum held (the graph cache checked), so torch itself refused it
            log.warning("precompiled graph %s did not load (%s: %s); compiling it again", path, type(e).__name__, e)
            return None

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
            return compile_fx(gm, example_inputs, config_patches=self.inductor_options)

    def run(self, bucket: int, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A bucket's forward (body: over its persistent input buffers): its CUDA graph replayed if
        it has one, else body run, which compiles the bucket's graph or loads it on first use."""
        if (captured := self._cuda_graphs.get(bucket)) is not None:
            graph, out = captured
            graph.replay()
            return out
        t0, hits, compiled = time.perf_counter(), counters["inductor"]["fxgraph_cache_hit"], self.graphs_compiled
        self._came = None
        try:
            out = body()
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, RecompileError):
                raise e.inner_exception from None
            raise
        if self.graphs_compiled > compiled and self.warm:
            log.warning("recompiled while serving (%d graphs since warmup): %s", self.recompiles_since_warmup(), self.last_recompile_reason)
        elif self.graphs_compiled > compiled or self._came is not None:
            came = self._came or ("hit" if counters["inductor"]["fxgraph_cache_hit"] > hits else "miss")
            self._record(BucketWarmup(bucket, time.perf_counter() - t0, came))
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
