"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen_compile.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text ends before them
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        # accept lists from callers, keep the frozen dataclass hashable
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def new_generator(seed: int | None) -> torch.Generator:
    """A request's own random stream: with a seed its samples do not depend on the batch."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits: (rows, vocab) fp32, one row per sequence to sample."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy.tolist()
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    if any(p.top_k or p.top_p < 1 for p in params):
        scaled, order = scaled.sort(dim=-1, descending=True)
        top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        probs = scaled.softmax(dim=-1)
        beyond_k = torch.arange(vocab, device=logits.device)[None, :] >= top_k[:, None]
        beyond_p = probs.cumsum(dim=-1) - probs > top_p[:, None]  # the first token always stays
        scaled = scaled.masked_fill(beyond_k | beyond_p, float("-inf"))
    else:
        order = None
    probs = scaled.softmax(dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p, noise from each request's generator
    noise = torch.stack([torch.empty(vocab).exponential_(generator=g) for g in generators]).to(logits.device)
    choice = (probs / noise).argmax(dim=-1)
    if order is not None:
        choice = order.gather(1, choice[:, None])[:, 0]
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, choice).tolist()
