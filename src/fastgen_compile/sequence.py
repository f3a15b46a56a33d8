"""Per-request state and what the engine hands back to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fastgen_compile.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose keys/values are in the pool
    block_table: list[int] = field(default_factory=list)
    kv_id: int = -1  # owner tag of the KV slots it writes, new at every admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""  # detokenized output, cut before any stop string
    num_emitted: int = 0  # characters of text already handed to the caller
    num_preemptions: int = 0

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


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # all text so far
    token_ids: list[int]  # all generated tokens so far
    delta_text: str  # new since the previous output of this request
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running

    @property
    def generated_text(self) -> str:  # DeepSpeed-MII's name
        return self.text
