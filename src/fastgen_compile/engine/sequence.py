"""Per-request state on the engine's side. Plain bookkeeping, no torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fastgen_compile.engine.detokenizer import TextState
from fastgen_compile.request import FinishReason, SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose keys/values are in the pool
    num_cached_tokens: int = 0  # of them, found in the prefix cache at its last admission
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of its leading full pages (pages.py)
    num_hashed_pages: int = 0  # leading pages of page_table already offered to the prefix cache
    page_table: list[int] = field(default_factory=list)
    kv_id: int = -1  # owner tag of the KV slots it writes, new at every admission
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    text_state: TextState = field(default_factory=TextState)  # the output as text, and how much of it was handed out
    num_preemptions: int = 0
    arrival: float = 0.0  # perf_counter seconds when the engine took it (its prompt deadline counts from here)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of each output token, when params.logprobs asks
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])  # the first prompt token has none

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model (1 for a decode, more for a prompt)."""
        return self.num_tokens - self.num_computed

    def token_ids(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]
