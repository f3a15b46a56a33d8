"""The batched sampler (greedy, temperature, top-k, top-p) and each request's own random stream."""

from __future__ import annotations

import torch

from fastgen_compile.request import SamplingParams, TokenLogprob


class Sampler:
    """Draws the next token of every sampled row. A seeded request's draws come from its own
    generator, so they do not depend on the batch it shares; the generators live here, keyed by
    request id, so the bookkeeping side (Sequence, Scheduler) holds no tensors."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: list[tuple[int, SamplingParams]]) -> list[int]:
        """logits: (rows, vocab) fp32, one row per (request id, params)."""
        params = [p for _, p in requests]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        generators = [self._generator(rid, p.seed) for rid, p in requests]
        return sample(logits, params, generators)

    def _generator(self, request_id: int, seed: int | None) -> torch.Generator:
        if (g := self._generators.get(request_id)) is None:
            g = self._generators[request_id] = new_generator(seed)
        return g

    def forget(self, request_id: int) -> None:
        self._generators.pop(request_id, None)


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


def token_logprobs(logits: torch.Tensor, token_ids: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's log-softmax at its token, with its tops[i] most likely tokens (the model's own
    distribution: before temperature and top-k/p, as vLLM and OpenAI report them)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    best_lp, best_ids = (t.tolist() for t in logp.topk(k, dim=-1)) if k else ([[]] * len(tops), [[]] * len(tops))
    return [TokenLogprob(t, lp, tuple(zip(ids[:n], lps[:n]))) for t, lp, ids, lps, n in zip(token_ids, chosen, best_ids, best_lp, tops)]
