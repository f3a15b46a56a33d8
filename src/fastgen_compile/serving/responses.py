"""OpenAI response bodies built from engine outputs: choices, stream chunks, logprobs, usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from fastgen_compile.request import RequestOutput, TokenLogprob


class TokenTexts:
    """Each token id's own text, decoded once (logprobs name tokens by their text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._known: dict[int, str] = {}

    def __call__(self, token_ids: list[int]) -> list[str]:
        new = [t for t in dict.fromkeys(token_ids) if t not in self._known]
        if new:
            self._known.update(zip(new, self.tokenizer.batch_decode([[t] for t in new])))
        return [self._known[t] for t in token_ids]


@dataclass
class Reply:
    """One response's identity, and its choices' logprob formatter."""

    model: str
    texts: TokenTexts
    kind: str  # "text_completion" or "chat.completion"
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'cmpl' if self.kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"

    def body(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        obj = {"id": self.id, "object": self.kind + (".chunk" if chunk and self.kind != "text_completion" else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    def completion_logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int], offset: int = 0) -> dict:
        """The legacy completions shape; the chosen token is always among the alternatives (OpenAI, vLLM)."""
        texts = self.texts(token_ids)
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self._alternatives(e) for e in entries],
            "text_offset": offsets,
        }

    def _alternatives(self, e: TokenLogprob) -> dict[str, float]:
        ids = [t for t, _ in e.top]
        alternatives = dict(zip(self.texts(ids), (lp for _, lp in e.top)))
        alternatives.setdefault(self.texts([e.token_id])[0], e.logprob)
        return alternatives

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def one(token_id: int, logprob: float) -> dict:
            text = self.texts([token_id])[0]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose keys and values came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def new_logprobs(out: RequestOutput) -> list[TokenLogprob]:
    """The logprobs of this output's new tokens."""
    n = len(out.delta_token_ids)
    return out.logprobs[len(out.logprobs) - n :] if out.logprobs and n else []
