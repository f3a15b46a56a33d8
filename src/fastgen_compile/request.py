"""What callers send and get back: sampling parameters, outputs, finish reasons.

Torch-free and picklable: a client process (the gRPC client, a Ray Serve proxy) builds and
validates these without the engine's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastgen_compile.errors import RequestError

FinishReason = Literal["stop", "length", "abort"]  # eos / stop token / stop string; max_new_tokens or context; aborted


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
    finish_reason: FinishReason | None  # None while running

    @property
    def generated_text(self) -> str:  # DeepSpeed-MII's name
        return self.text
