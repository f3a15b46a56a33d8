"""Runs one padded bucket through the model: per-bucket compiled layer graph, paged KV pool.

Each bucket's inputs live in persistent device buffers (`BucketInputs`), refilled in place
every step, and the block masks are built once over them. On CUDA that is what lets the
whole forward of a bucket (eager glue and 30 compiled layer calls, mixed prefill + decode
steps included) be captured once as a CUDA graph and replayed; on CPU the same buffers
and the same body run directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastgen_compile import kernels
from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.attention import LayerKV, PagedAttention, paged_attend
from fastgen_compile.engine.batch import Batch, BlockLists
from fastgen_compile.engine.compiler import Compiler
from fastgen_compile.models import linears, packed
from fastgen_compile.models.decoder import Decoder, ModelArgs, alone, decoder_layer
from fastgen_compile.models.rope import Rope

if TYPE_CHECKING:
    from fastgen_compile.engine.parallel import TensorParallel

DEVICE_FIELDS = ("input_ids", "positions", "context_lens", "slots", "q_seq", "q_bit", "page_bits", "decode_pages", "decode_lens")  # None where a path has none


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on CPU over anonymous memory, which the OS zeroes page by page as it is first
    touched: writing zeros over a pool of GBs was 1.7 s of a 10 s warm start."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE)  # as malloc's: not shared with a forked child
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def layer_group(num_layers: int, most: int) -> int:
    """Layers per compiled call: the largest divisor of num_layers up to `most`, so every call
    has the same shape and one graph per bucket serves them all."""
    return max(d for d in range(1, min(most, num_layers) + 1) if num_layers % d == 0)


@dataclass(frozen=True)
class DecoderLayers:
    """Consecutive decoder layers in one graph: each compiled call costs ~110 µs of Python and
    dynamo on this CPU, a third of a one-row step when it was called once per layer. A bound
    method is what the compiler traces: torch's precompile (Compiler) saves a function, not a partial."""

    layer: Callable

    def forward(self, x: torch.Tensor, weights: list, kv_caches: list, cos, sin, slots, masks) -> torch.Tensor:
        for w, kv_cache in zip(weights, kv_caches):
            x = self.layer(x, w, kv_cache, cos, sin, slots, masks)
        return x


@dataclass
class BucketInputs:
    """A bucket's forward inputs as device buffers, and the masks over them."""

    batch: Batch
    masks: tuple

    @classmethod
    def like(cls, batch: Batch, device: torch.device, attention: PagedAttention) -> BucketInputs:
        def lists(b: BlockLists | None) -> BlockLists | None:
            return b and BlockLists(*(getattr(b, f.name).to(device, copy=True) for f in dataclasses.fields(BlockLists)))

        fields = {name: getattr(batch, name).to(device, copy=True) for name in DEVICE_FIELDS if getattr(batch, name) is not None}
        static = dataclasses.replace(batch, **fields, decode_blocks=lists(batch.decode_blocks), prompt_blocks=lists(batch.prompt_blocks))
        return cls(static, attention.block_masks(static))

    def fill(self, batch: Batch) -> None:
        for mine, new in zip(self.tensors(), device_tensors(batch)):
            mine.copy_(new, non_blocking=True)

    def tensors(self) -> list[torch.Tensor]:
        """The buffers a step refills (what tensor parallelism's rank 0 broadcasts), in a fixed order."""
        return device_tensors(self.batch)


def device_tensors(batch: Batch) -> list[torch.Tensor]:
    fields = [getattr(batch, name) for name in DEVICE_FIELDS]
    lists = [getattr(b, f.name) for b in (batch.decode_blocks, batch.prompt_blocks) if b is not None for f in dataclasses.fields(BlockLists)]
    return [t for t in fields if t is not None] + lists


class Runner:
    def __init__(self, model: Decoder, config: EngineConfig, num_pages: int, max_model_len: int, compiler: Compiler, decode_kernel: bool,
                 prefix_caching: bool = False, tp: TensorParallel | None = None):
        """decode_kernel: decode rows attend through our CPU kernel (the engine checked it builds);
        prefix_caching: sequences may start on pages other sequences wrote (the engine decided it);
        tp: this rank's side of tensor parallelism (model is its shard), None: one process."""
        args, c = model.args, config
        self.device = device = model.embed.device
        self.model = model
        self.compiler = compiler
        self.tp = tp
        # the collectives that combine the shards' partial results (traced into the layer graph); alone: one process
        self.reduce, self.gather = (tp.all_reduce, tp.all_gather) if tp is not None else (alone, alone)
        # decode rows through our CPU kernel: the width of their page tables (0: FlexAttention)
        self.decode_table = -(-max_model_len // c.page_size) if decode_kernel else 0
        group = args.num_heads // args.num_kv_heads
        self.attention = PagedAttention(num_pages, c.page_size, c.token_budget, c.decode_rows, c.q_block, group, args.sliding_window, device,
                                        cached_prefixes=prefix_caching)
        slots, heads, dim = num_pages * c.page_size, args.num_kv_heads, args.head_dim

        def layer_kv() -> LayerKV:
            kv = [zeroed((1, slots, heads, dim), c.torch_kv_dtype, device) for _ in range(2)]
            if decode_kernel:
                shapes = (num_pages, heads, dim, kernels.key_stride(c.page_size)), (slots, heads, dim)
                kv += [zeroed(shape, c.torch_dtype, device) for shape in shapes]
            return LayerKV(*kv)

        self.kv_caches = [layer_kv() for _ in model.layers]
        self.rope = Rope(args.rope, device) if args.rope is not None else None  # None: learned positions
        if packed.available(device, c.torch_dtype) and c.linear_kernel in ("auto", "onednn"):
            packed.pack(model)
        self.kernels = linears.LinearKernels(self._kernel_record(c))  # the decoder's linear
        self.group = layer_group(args.num_layers, c.layers_per_graph)
        self.layer_weights = [layer.weights() for layer in model.layers]  # once: quantized and packed above, fixed from here on
        layer = functools.partial(decoder_layer, args=args, attend=paged_attend, linear=self.kernels, reduce=self.reduce)
        self.layers = compiler.compile(DecoderLayers(layer).forward)
        self.inputs: dict[int, BucketInputs] = {}

    def _kernel_record(self, c: EngineConfig) -> linears.KernelRecord:
        """The kernels measured on this machine and kept with the graphs, else measured now (or as forced)."""
        rows = sorted(set(c.buckets))
        if c.linear_kernel != "auto":
            return linears.forced(self.model, rows, c.linear_kernel, self.device, c.torch_dtype)
        cache = self.compiler.graph_cache
        if cache is not None and (saved := cache.record(linears.RECORD)) is not None:
            return linears.KernelRecord.from_json(saved)
        record = linears.measure(self.model, rows, self.device, c.torch_dtype, bf16_activations=c.dtype_reason != "as asked")
        if cache is not None:
            cache.save_record(linears.RECORD, record.to_json())
        return record

    @staticmethod
    def kv_bytes_per_token(args: ModelArgs, config: EngineConfig, decode_kernel: bool) -> int:
        """The pool FlexAttention reads, plus the decode kernel's copy where it is used (args: a
        shard's, with tensor parallelism: each rank's pool holds its KV heads only)."""
        per_slot = args.num_layers * args.num_kv_heads * args.head_dim
        total = 2 * per_slot * config.torch_kv_dtype.itemsize
        if decode_kernel:
            keys = -(-kernels.key_stride(config.page_size) * per_slot // config.page_size)
            total += (keys + per_slot) * config.torch_dtype.itemsize
        return total

    def bucket_inputs(self, batch: Batch) -> BucketInputs:
        """batch's bucket's buffers, made on first use (batch: any batch of that bucket)."""
        inputs = self.inputs.get(batch.bucket)
        if inputs is None:
            inputs = self.inputs[batch.bucket] = BucketInputs.like(batch, self.device, self.attention)
        return inputs

    @torch.inference_mode()
    def forward(self, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) of the given rows only (default: the sampled rows). With tensor parallelism
        (this is rank 0), the other ranks get the step and run it alongside."""
        inputs = self.bucket_inputs(batch)
        inputs.fill(batch)
        rows = batch.sample_rows if rows is None else rows
        if self.tp is None:
            return self.run(inputs, rows)
        with self.tp.naming_dead_ranks():
            self.tp.send_step(inputs, rows)
            return self.run(inputs, rows)

    @torch.inference_mode()
    def run(self, inputs: BucketInputs, rows: torch.Tensor) -> torch.Tensor:
        """The forward of the bucket whose buffers hold the step: logits (fp32) of rows."""
        hidden = self.compiler.run(inputs.batch.bucket, lambda: self._body(inputs))
        return self.model.logits(hidden[rows.to(self.device)], self.kernels, self.gather)

    def _body(self, inputs: BucketInputs) -> torch.Tensor:
        """The bucket's forward up to the last hidden states: only in-place writes and fixed shapes,
        so on CUDA it can be captured as a CUDA graph."""
        b = inputs.batch
        self.attention.update(b)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(b.positions, b.context_lens)
        x = self.model.embed_tokens(b.input_ids, b.positions, self.reduce)
        weights, g = self.layer_weights, self.group
        for i in range(0, len(weights), g):
            x = self.layers(x, weights[i : i + g], self.kv_caches[i : i + g], cos, sin, b.slots, inputs.masks)
        return x
