"""Which part of the model one rank of tensor parallelism holds (Megatron-style).

Attention is split by KV head, each KV head with its group of query heads (GQA groups stay
whole, so every rank folds the same group into its attention rows): the fused QKV projection is
column-parallel (each rank's q, k and v rows), the output projection row-parallel (the columns of
its heads). The MLP's intermediate size is split the same way: gate/up column-parallel, down
row-parallel, for each expert of a mixture. Row-parallel outputs are partial sums, added across
ranks by one all-reduce each (models/decoder.py `reduce`); their biases are kept by rank 0 only,
so each is added once. The embedding and lm_head are split by vocabulary rows.

Counts that do not divide by the ranks split unevenly (the first ranks hold one unit more): the
embedded SmolLM2's 3 KV heads over 2 ranks are 2 + 1 (6 + 3 query heads). Only fewer KV heads
than ranks cannot be split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastgen_compile.errors import ConfigError
from fastgen_compile.models.decoder import ModelArgs
from fastgen_compile.models.quantize import GROUP

ROW_PARALLEL_BIASES = ("bo", "b_down")


def split(n: int, world: int, rank: int) -> range:
    """The units of n this rank holds, as evenly as they go: the first n % world ranks hold one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def check(self, a: ModelArgs, name: str) -> None:
        """A clear error where the model cannot be split over this many ranks."""
        if a.num_kv_heads < self.world:
            raise ConfigError(f"tensor_parallel_size={self.world} needs at least one KV head per rank: {name} has {a.num_heads} query heads "
                              f"and {a.num_kv_heads} KV heads (GQA groups of {a.num_heads // a.num_kv_heads} stay on one rank)")

    def kv_heads(self, a: ModelArgs) -> range:
        return split(a.num_kv_heads, self.world, self.rank)

    def heads(self, a: ModelArgs) -> range:
        group, kv = a.num_heads // a.num_kv_heads, self.kv_heads(a)
        return range(kv.start * group, kv.stop * group)

    def intermediate(self, a: ModelArgs) -> range:
        """In whole int4 groups where the size allows, so each rank's shard quantizes as the whole weight does."""
        unit = GROUP if a.intermediate_size % GROUP == 0 and a.intermediate_size // GROUP >= self.world else 1
        units = split(a.intermediate_size // unit, self.world, self.rank)
        return range(units.start * unit, units.stop * unit)

    def vocab(self, a: ModelArgs) -> tuple[int, int]:
        """(first row, rows): every rank holds as many rows (the last padded with zeros), so the
        lm_head's logits gather into one tensor whose columns past vocab_size are dropped."""
        rows = -(-a.vocab_size // self.world)
        return self.rank * rows, rows

    def args(self, a: ModelArgs) -> ModelArgs:
        """What this rank's decoder computes with: its head counts and intermediate size, its vocabulary rows."""
        if self.world == 1:
            return a
        return replace(a, num_heads=len(self.heads(a)), num_kv_heads=len(self.kv_heads(a)), intermediate_size=len(self.intermediate(a)),
                       vocab_shard=self.vocab(a))

    def weight(self, name: str, w: torch.Tensor, a: ModelArgs) -> torch.Tensor:
        """This rank's part of a whole-model weight (our name for it, models/decoder.py), a copy of its own
        (a view would keep the whole checkpoint tensor alive). a: the whole model's args."""
        if self.world == 1:
            return w
        d = a.head_dim
        if name in ("wqkv", "bqkv"):
            q, k, v = w.split([a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d])
            heads, kv = self.heads(a), self.kv_heads(a)
            return torch.cat([q[heads.start * d : heads.stop * d], k[kv.start * d : kv.stop * d], v[kv.start * d : kv.stop * d]])
        if name == "wo":
            heads = self.heads(a)
            return w[:, heads.start * d : heads.stop * d].contiguous()
        if name in ("w_up", "b_up"):  # gated: the gate rows, then the up rows, of this rank's share of each
            dim, inner = (-2 if name == "w_up" else -1), self.intermediate(a)
            parts = w.chunk(2, dim) if a.gated_mlp else (w,)
            return torch.cat([p.narrow(dim, inner.start, len(inner)) for p in parts], dim)
        if name == "w_down":
            inner = self.intermediate(a)
            return w.narrow(-1, inner.start, len(inner)).contiguous()
        if name in ROW_PARALLEL_BIASES:  # added to a partial sum: once, by rank 0
            return w if self.rank == 0 else torch.zeros_like(w)
        if name in ("embed", "lm_head"):
            first, rows = self.vocab(a)
            part = w[first : first + rows]
            return F.pad(part, (0, 0, 0, rows - len(part)))  # a copy, zero rows past the vocabulary
        return w  # norms, the router, learned positions, projections: every rank holds them whole


WHOLE = Shard()  # one process holds the whole model
