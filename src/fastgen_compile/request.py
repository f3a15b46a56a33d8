"""What callers send and get back: sampling parameters, outputs, finish reasons.

Torch-free and picklable: a client process (the gRPC client, a Ray Serve proxy) builds and
validates these without the engine's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastgen_compile.errors import RequestError

MAX_LOGPROBS = 20  # top alternatives a request may ask for per token (OpenAI's chat limit; completions allow 5)

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
    min_tokens: int = 0  # eos, stop tokens and stop strings do not end the output before this many tokens
    logprobs: int | None = None  # each generated token's logprob and this many top alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (its first has none)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise RequestError(f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        # accept lists from callers, keep the frozen dataclass hashable
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability under the model (raw logits, before temperature and top-k/p),
    and the most likely tokens at its position, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    logprobs: list[TokenLogprob] | None = None  # one per generated token so far, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first None), when asked
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, not computed

    @property
    def generated_text(self) -> str:  # DeepSpeed-MII's name
        return self.text
