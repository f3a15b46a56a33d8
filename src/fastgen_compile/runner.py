"""Runs one padded bucket through the model: per-bucket compiled layer graph, paged KV pool."""

from __future__ import annotations

import functools
import logging

import torch

from fastgen_compile.attention import PagedAttention, paged_attend
from fastgen_compile.batch import Batch
from fastgen_compile.config import EngineConfig
from fastgen_compile.models.decoder import Decoder, decoder_layer
from fastgen_compile.models.rope import Rope

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, model: Decoder, config: EngineConfig, num_pages: int):
        args, c = model.args, config
        device = model.embed.device
        self.model = model
        group = args.num_heads // args.num_kv_heads
        self.attention = PagedAttention(num_pages, c.page_size, c.token_budget, c.decode_rows, c.q_block, group, args.sliding_window, device)
        shape = (1, num_pages * c.page_size, args.num_kv_heads, args.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=c.torch_kv_dtype, device=device) for _ in model.layers]
        self.v_caches = [torch.zeros(shape, dtype=c.torch_kv_dtype, device=device) for _ in model.layers]
        self.device = device
        self.rope = Rope(args.rope, device) if args.rope is not None else None  # None: learned positions
        layer = functools.partial(decoder_layer, args=args, attend=paged_attend)
        if c.compile:
            # one graph per bucket shape, shared by all layers (weights and caches are inputs)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            layer = torch.compile(layer, fullgraph=True, dynamic=False, backend=self._inductor_counting_graphs)
        self.layer = layer
        self.graphs_compiled = 0  # by this runner: other torch.compile users in the process don't count
        self.graphs_after_warmup: int | None = None
        self._graphs_warned = 0

    def _inductor_counting_graphs(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs_compiled += 1
        return compile_fx(gm, example_inputs)

    @staticmethod
    def kv_bytes_per_token(model: Decoder, kv_dtype: torch.dtype) -> int:
        a = model.args
        return 2 * a.num_layers * a.num_kv_heads * a.head_dim * kv_dtype.itemsize

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (fp32) of the sampled rows only."""
        device = self.device
        ids = batch.input_ids.to(device, non_blocking=True)
        positions = batch.positions.to(device, non_blocking=True)
        slots = batch.slots.to(device, non_blocking=True)
        self.attention.update(batch, positions, slots)
        masks = self.attention.block_masks(batch)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(positions, batch.context_lens.to(device, non_blocking=True))
        x = self.model.embed_tokens(ids, positions)
        for layer, k_cache, v_cache in zip(self.model.layers, self.k_caches, self.v_caches):
            x = self.layer(x, layer.weights(), k_cache, v_cache, cos, sin, slots, masks)
        self._check_recompile()
        return self.model.logits(x[batch.sample_rows.to(device)])

    def mark_warm(self) -> None:
        self.graphs_after_warmup = self._graphs_warned = self.graphs_compiled

    def recompiles_since_warmup(self) -> int:
        return 0 if self.graphs_after_warmup is None else self.graphs_compiled - self.graphs_after_warmup

    def _check_recompile(self) -> None:
        if self.graphs_after_warmup is not None and self.graphs_compiled != self._graphs_warned:
            self._graphs_warned = self.graphs_compiled
            log.warning("recompiled while serving (%d graphs since warmup): a shape or guard changed in the hot path; "
                        "run with TORCH_LOGS=recompiles to see which guard failed", self.recompiles_since_warmup())
