"""The OpenAI request bodies we accept, as pydantic models. Unknown fields are accepted and
ignored and a `null` means the default, as in vLLM; a bad value fails validation naming its
field (the `param` of the 400)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fastgen_compile.request import SamplingParams

COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
CHAT_LOGPROBS = 20


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Lenient):
    include_usage: bool = False


class Sampling(Lenient):
    """The fields /v1/completions and /v1/chat/completions share (vLLM's extras included)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # -1 or 0: off
    seed: int | None = None
    stop: str | list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, ignored

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if not info.data.get("stream"):
            raise ValueError("stream_options can only be given when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def params(self, max_tokens: int, choice: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """choice: the n choices of a prompt draw from different seeds (seed, seed + 1, ...)."""
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
            seed=None if self.seed is None else self.seed + choice, stop_token_ids=tuple(self.stop_token_ids),
            stop=self.stop, ignore_eos=self.ignore_eos, min_tokens=min(self.min_tokens, max_tokens),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=COMPLETION_LOGPROBS)] | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """OpenAI's content parts: the text ones, joined."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=CHAT_LOGPROBS)] | None = None

    @property
    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[int]


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error", "server_error"]
