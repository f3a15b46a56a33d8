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
from dataclasses import dataclass

import torch

from fastgen_compile import kernels
from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.attention import LayerKV, PagedAttention, paged_attend
from fastgen_compile.engine.batch import Batch, BlockLists
from fastgen_compile.engine.compiler import Compiler
from fastgen_compile.models import linears, packed
from fastgen_compile.models.decoder import Decoder, ModelArgs, decoder_layer
from fastgen_compile.models.rope import Rope

DEVICE_FIELDS = ("input_ids", "positions", "context_lens", "slots", "q_seq", "q_bit", "page_bits", "decode_pages", "decode_lens")  # None where a path has none


def layer_group(num_layers: int, most: int) -> int:
    """Layers per compiled call: the largest divisor of num_layers up to `most`, so every call
    has the same shape and one graph per bucket serves them all."""
    return max(d for d in range(1, min(most, num_layers) + 1) if num_layers % d == 0)


def decoder_layers(x: torch.Tensor, weights: list, kv_caches: list, cos, sin, slots, masks, *, layer) -> torch.Tensor:
    """Consecutive decoder layers in one graph: each compiled call costs ~110 µs of Python and
    dynamo on this CPU, a third of a one-row step when it was called once per layer."""
    for w, kv_cache in zip(weights, kv_caches):
        x = layer(x, w, kv_cache, cos, sin, slots, masks)
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
        for name in DEVICE_FIELDS:
            if (mine := getattr(self.batch, name)) is not None:
                mine.copy_(getattr(batch, name), non_blocking=True)
        for mine, new in ((self.batch.decode_blocks, batch.decode_blocks), (self.batch.prompt_blocks, batch.prompt_blocks)):
            if mine is not None:
                for f in dataclasses.fields(BlockLists):
                    getattr(mine, f.name).copy_(getattr(new, f.name), non_blocking=True)


class Runner:
    def __init__(self, model: Decoder, config: EngineConfig, num_pages: int, max_model_len: int, compiler: Compiler, decode_kernel: bool,
                 prefix_caching: bool = False):
        """decode_kernel: decode rows attend through our CPU kernel (the engine checked it builds);
        prefix_caching: sequences may start on pages other sequences wrote (the engine decided it)."""
        args, c = model.args, config
        self.device = device = model.embed.device
        self.model = model
        self.compiler = compiler
        # decode rows through our CPU kernel: the width of their page tables (0: FlexAttention)
        self.decode_table = -(-max_model_len // c.page_size) if decode_kernel else 0
        group = args.num_heads // args.num_kv_heads
        self.attention = PagedAttention(num_pages, c.page_size, c.token_budget, c.decode_rows, c.q_block, group, args.sliding_window, device,
                                        cached_prefixes=prefix_caching)
        slots, heads, dim = num_pages * c.page_size, args.num_kv_heads, args.head_dim

        def layer_kv() -> LayerKV:
            kv = [torch.zeros((1, slots, heads, dim), dtype=c.torch_kv_dtype, device=device) for _ in range(2)]
            if decode_kernel:
                shapes = (num_pages, heads, dim, kernels.key_stride(c.page_size)), (slots, heads, dim)
                kv += [torch.zeros(shape, dtype=c.torch_dtype, device=device) for shape in shapes]
            return LayerKV(*kv)

        self.kv_caches = [layer_kv() for _ in model.layers]
        self.rope = Rope(args.rope, device) if args.rope is not None else None  # None: learned positions
        if packed.available(device, c.torch_dtype) and c.linear_kernel in ("auto", "onednn"):
            packed.pack(model)
        self.kernels = linears.LinearKernels(self._kernel_record(c))  # the decoder's linear
        self.group = layer_group(args.num_layers, c.layers_per_graph)
        self.layer_weights = [layer.weights() for layer in model.layers]  # once: quantized and packed above, fixed from here on
        layer = functools.partial(decoder_layer, args=args, attend=paged_attend, linear=self.kernels)
        self.layers = compiler.compile(functools.partial(decoder_layers, layer=layer))
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
        """The pool FlexAttention reads, plus the decode kernel's copy where it is used."""
        per_slot = args.num_layers * args.num_kv_heads * args.head_dim
        total = 2 * per_slot * config.torch_kv_dtype.itemsize
        if decode_kernel:
            keys = -(-kernels.key_stride(config.page_size) * per_slot // config.page_size)
            total += (keys + per_slot) * config.torch_dtype.itemsize
        return total

    @torch.inference_mode()
    def forward(self, batch: Batch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) of the given rows only (default: the sampled rows)."""
        inputs = self.inputs.get(batch.bucket)
        if inputs is None:
            inputs = self.inputs[batch.bucket] = BucketInputs.like(batch, self.device, self.attention)
        inputs.fill(batch)
        hidden = self.compiler.run(batch.bucket, lambda: self._body(inputs))
        rows = batch.sample_rows if rows is None else rows
        return self.model.logits(hidden[rows.to(self.device)], self.kernels)

    def _body(self, inputs: BucketInputs) -> torch.Tensor:
        """The bucket's forward up to the last hidden states: only in-place writes and fixed shapes,
        so on CUDA it can be captured as a CUDA graph."""
        b = inputs.batch
        self.attention.update(b)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(b.positions, b.context_lens)
        x = self.model.embed_tokens(b.input_ids, b.positions)
        weights, g = self.layer_weights, self.group
        for i in range(0, len(weights), g):
            x = self.layers(x, weights[i : i + g], self.kv_caches[i : i + g], cos, sin, b.slots, inputs.masks)
        return x
