"""Rotary position embeddings with every scaling rule our families carry, as per-token cos/sin.

cos/sin are computed eagerly for the rows of a step and passed to the compiled layer as
inputs, so the layer graph never depends on the scaling rule. Rules whose frequencies
depend on the sequence length (dynamic NTK, longrope) read it per token from
`context_lens`: the length the token's sequence reaches at the end of the chunk the token
is computed in. transformers uses max(position_ids) + 1 of its forward call; for one
sequence fed the same chunks (whole prompt, then one token a step) that is the same
number. See docs/architecture.md for where the two can differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen_compile.errors import ModelLoadError

KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeArgs:
    theta: float
    dim: int  # rotated dims of a head (head_dim x partial_rotary_factor)
    kind: str
    params: tuple[tuple[str, object], ...]  # the config's scaling fields, hashable
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg, head_dim: int) -> RopeArgs:
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        kind = "longrope" if kind == "su" else kind
        if kind not in KINDS:
            raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: {', '.join(KINDS)}")
        if kind == "longrope":
            rope.setdefault("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
        params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
        return cls(float(theta), int(head_dim * partial), kind, params, cfg.max_position_embeddings)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, s: dict, theta: float, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between; and its attention factor."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor") or (
        mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]) if s.get("mscale") and s.get("mscale_all_dim") else mscale(factor)
    )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), attention


class Rope:
    """cos/sin for a step's rows, in the rotate-half layout, fp32."""

    def __init__(self, args: RopeArgs, device: torch.device):
        self.args, s = args, dict(args.params)
        inv_freq = _base_inv_freq(args.theta, args.dim)
        self.scale = 1.0  # multiplies cos and sin (yarn's and longrope's attention factor)
        if args.kind in ("linear", "dynamic"):
            self.factor = s["factor"]
        if args.kind == "linear":
            inv_freq = inv_freq / self.factor
        elif args.kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        elif args.kind == "yarn":
            inv_freq, self.scale = _yarn(inv_freq, s, args.theta, args.dim, args.max_position_embeddings)
        elif args.kind == "longrope":
            self.original_len = s["original_max_position_embeddings"]
            factor = s.get("factor") or args.max_position_embeddings / self.original_len
            self.scale = s.get("attention_factor") or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_len))
            )
            self.long_inv_freq = (inv_freq / torch.tensor(s["long_factor"], dtype=torch.float64)).to(device)
            inv_freq = inv_freq / torch.tensor(s["short_factor"], dtype=torch.float64)
        self.inv_freq = inv_freq.to(device)
        # frequencies that do not depend on the sequence's length: one table, a gather per step
        self.table = None
        if args.kind not in ("dynamic", "longrope"):
            self.table = self._cos_sin(torch.arange(args.max_position_embeddings, device=device), self.inv_freq)

    def cos_sin(self, positions: torch.Tensor, context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, context_lens: (tokens,) -> cos, sin: (tokens, 1, dim)."""
        if self.table is not None:
            pos = positions.long()
            return self.table[0][pos], self.table[1][pos]
        a = self.args
        inv_freq = self.inv_freq.expand(positions.shape[0], -1)
        if a.kind == "dynamic":
            # NTK: a bigger base once the sequence outgrows the trained context (a per-token base)
            factor, trained = self.factor, a.max_position_embeddings
            length = context_lens.double().clamp(min=trained)
            base = a.theta * ((factor * length / trained) - (factor - 1)) ** (a.dim / (a.dim - 2))
            inv_freq = 1.0 / base[:, None] ** (torch.arange(0, a.dim, 2, dtype=torch.float64, device=base.device) / a.dim)
        elif a.kind == "longrope":
            inv_freq = torch.where((context_lens > self.original_len)[:, None], self.long_inv_freq, inv_freq)
        return self._cos_sin(positions, inv_freq)

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.double()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).float().unsqueeze(1), (emb.sin() * self.scale).float().unsqueeze(1)
