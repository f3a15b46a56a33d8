"""Runs one padded bucket through the model: per-bucket compiled layer graph, paged KV pool.

Each bucket's inputs live in persistent device buffers (`BucketInputs`), refilled in place
every step, and the block masks are built once over them. On CUDA that is what lets the
whole forward of a bucket (eager glue and 30 compiled layer calls, mixed prefill + decode
steps included) be captured once as a CUDA graph and replayed; on CPU the same buffers
and the same body run directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen_compile import kernels
from fastgen_compile.attention import LayerKV, PagedAttention, paged_attend
from fastgen_compile.batch import Batch, BlockLists
from fastgen_compile.config import EngineConfig
from fastgen_compile.errors import RecompileError
from fastgen_compile.graphs import GraphCache
from fastgen_compile.models import packed
from fastgen_compile.models.decoder import Decoder, ModelArgs, decoder_layer
from fastgen_compile.models.rope import Rope

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
DEVICE_FIELDS = ("input_ids", "positions", "context_lens", "slots", "q_seq", "decode_pages", "decode_lens")  # None where a path has none


@dataclass
class BucketInputs:
    """A bucket's forward inputs as device buffers, the masks over them, and its output rows."""

    batch: Batch
    masks: tuple
    hidden: torch.Tensor | None = None

    @classmethod
    def like(cls, batch: Batch, device: torch.device, attention: PagedAttention) -> BucketInputs:
        def lists(b: BlockLists | None) -> BlockLists | None:
            return b and BlockLists(*(getattr(b, f.name).to(device, copy=True) for f in dataclasses.fields(BlockLists)))

        fields = {name: getattr(batch, name).to(device, copy=True) for name in DEVICE_FIELDS if getattr(batch, name) is not None}
        static = dataclasses.replace(batch, **fields, decode_blocks=lists(batch.decode_blocks), prompt_blocks=lists(batch.prompt_blocks))
        return cls(static, attention.block_masks(static))

    def fill(self, batch: Batch) -> None:
        for name in DEVICE_FIELDS:
            if (mine := getattr(self.batch, name)) is not None:
                mine.copy_(getattr(batch, name), non_blocking=True)
        for mine, new in ((self.batch.decode_blocks, batch.decode_blocks), (self.batch.prompt_blocks, batch.prompt_blocks)):
            if mine is not None:
                for f in dataclasses.fields(BlockLists):
                    getattr(mine, f.name).copy_(getattr(new, f.name), non_blocking=True)


class Runner:
    def __init__(self, model: Decoder, config: EngineConfig, num_pages: int, max_model_len: int, kernels_root: Path, graph_cache: GraphCache | None = None):
        args, c = model.args, config
        self.device = device = model.embed.device
        self.model = model
        # decode rows through our CPU kernel: the width of their page tables (0: FlexAttention)
        self.decode_table = 0
        if self.uses_decode_kernel(args, c, device) and kernels.paged_decode_available(kernels_root):
            self.decode_table = -(-max_model_len // c.page_size)
        group = args.num_heads // args.num_kv_heads
        self.attention = PagedAttention(num_pages, c.page_size, c.token_budget, c.decode_rows, c.q_block, group, args.sliding_window, device)
        slots, heads, dim = num_pages * c.page_size, args.num_kv_heads, args.head_dim

        def layer_kv() -> LayerKV:
            kv = [torch.zeros((1, slots, heads, dim), dtype=c.torch_kv_dtype, device=device) for _ in range(2)]
            if self.decode_table:
                shapes = (num_pages, heads, dim, kernels.key_stride(c.page_size)), (slots, heads, dim)
                kv += [torch.zeros(shape, dtype=c.torch_dtype, device=device) for shape in shapes]
            return LayerKV(*kv)

        self.kv_caches = [layer_kv() for _ in model.layers]
        self.rope = Rope(args.rope, device) if args.rope is not None else None  # None: learned positions
        self.graph_cache = graph_cache
        self.strict = c.strict_recompiles
        self.compiled = c.compile
        self.packed_weights = c.pack_weights and packed.available(device, c.torch_dtype)
        if self.packed_weights:
            packed.pack(model)
        self.linear = packed.packed_linear if self.packed_weights else torch.nn.functional.linear
        layer = functools.partial(decoder_layer, args=args, attend=paged_attend, linear=self.linear)
        if c.compile:
            # one graph per bucket shape, shared by all layers (weights and caches are inputs);
            # its own guard cache, so other engines in the process neither count nor collide
            layer = torch._dynamo.optimize(
                self._inductor_counting_graphs,
                nopython=True,
                dynamic=False,
                guard_fail_fn=self._guard_failed,
                recompile_limit=RECOMPILE_LIMIT,
                isolate_recompiles=True,
            )(layer)
        self.layer = layer
        self.inputs: dict[int, BucketInputs] = {}
        self.cuda_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None  # one memory pool shared by every bucket's CUDA graph
        self.graphs_compiled = 0  # by this runner: other torch.compile users in the process don't count
        self.graphs_after_warmup: int | None = None
        self._graphs_warned = 0
        self._guard_failures: list[str] = []  # why the last (re)compile happened
        self.last_recompile_reason: str | None = None

    def _guard_failed(self, failure) -> None:
        self._guard_failures.append(failure.reason)

    def _inductor_counting_graphs(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        if self.graphs_after_warmup is not None:
            self.last_recompile_reason = "; ".join(self._guard_failures) or "no guard failed: a new code path"
            if self.strict:
                self._guard_failures.clear()
                raise RecompileError(f"recompile while serving: {self.last_recompile_reason}")
        self._guard_failures.clear()
        self.graphs_compiled += 1
        with self.graph_cache.compiling() if self.graph_cache else contextlib.nullcontext():
            return compile_fx(gm, example_inputs)

    @staticmethod
    def uses_decode_kernel(args: ModelArgs, config: EngineConfig, device: torch.device) -> bool:
        """Whether decode rows go to our CPU kernel, if it builds."""
        return config.decode_kernel and config.decode_rows > 0 and kernels.paged_decode_fits(device, config.torch_dtype, args.head_dim)

    @staticmethod
    def kv_bytes_per_token(args: ModelArgs, config: EngineConfig) -> int:
        """The pool FlexAttention reads, plus the decode kernel's copy where it is used."""
        per_slot = args.num_layers * args.num_kv_heads * args.head_dim
        total = 2 * per_slot * config.torch_kv_dtype.itemsize
        if Runner.uses_decode_kernel(args, config, torch.device(config.device)):
            keys = -(-kernels.key_stride(config.page_size) * per_slot // config.page_size)
            total += (keys + per_slot) * config.torch_dtype.itemsize
        return total

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (fp32) of the sampled rows only."""
        inputs = self.inputs.get(batch.bucket)
        if inputs is None:
            inputs = self.inputs[batch.bucket] = BucketInputs.like(batch, self.device, self.attention)
        inputs.fill(batch)
        graph = self.cuda_graphs.get(batch.bucket)
        if graph is not None:
            graph.replay()
        else:
            try:
                inputs.hidden = self._body(inputs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if isinstance(e.inner_exception, RecompileError):
                    raise e.inner_exception from None
                raise
        self._check_recompile()
        return self.model.logits(inputs.hidden[batch.sample_rows.to(self.device)], self.linear)

    def _body(self, inputs: BucketInputs) -> torch.Tensor:
        """The bucket's forward up to the last hidden states: only in-place writes and fixed shapes."""
        b = inputs.batch
        self.attention.update(b.q_seq, b.positions, b.slots)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(b.positions, b.context_lens)
        x = self.model.embed_tokens(b.input_ids, b.positions)
        for layer, kv_cache in zip(self.model.layers, self.kv_caches):
            x = self.layer(x, layer.weights(), kv_cache, cos, sin, b.slots, inputs.masks)
        return x

    @torch.inference_mode()
    def warm(self, batch: Batch) -> None:
        """Compile batch's bucket (a forward over it), then on CUDA capture it as a CUDA graph."""
        self.forward(batch)
        if self.device.type == "cuda" and self.compiled:
            self._capture(batch.bucket)

    def _capture(self, bucket: int) -> None:
        """Record the bucket's whole forward; buckets share one memory pool (capture the largest first)."""
        inputs = self.inputs[bucket]
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            inputs.hidden = self._body(inputs)
        self.cuda_graphs[bucket] = graph

    def mark_warm(self) -> None:
        self.graphs_after_warmup = self._graphs_warned = self.graphs_compiled
        self._guard_failures.clear()

    def recompiles_since_warmup(self) -> int:
        return 0 if self.graphs_after_warmup is None else self.graphs_compiled - self.graphs_after_warmup

    def _check_recompile(self) -> None:
        if self.graphs_after_warmup is not None and self.graphs_compiled != self._graphs_warned:
            self._graphs_warned = self.graphs_compiled
            log.warning("recompiled while serving (%d graphs since warmup): %s", self.recompiles_since_warmup(), self.last_recompile_reason)
