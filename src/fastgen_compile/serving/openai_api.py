"""The OpenAI-compatible HTTP face: a plain ASGI app (FastAPI) over Service.

/v1/* and the admin route POST /reset_prefix_cache need the API key when one is set; /health,
/version, /metrics and the tokenizer routes do not (as in vLLM). A request whose client goes
away, streaming or not, is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fastgen_compile import __version__
from fastgen_compile.entrypoints.async_llm import RequestStreams
from fastgen_compile.errors import EngineDied, RequestError
from fastgen_compile.request import RequestOutput
from fastgen_compile.serving.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, ErrorType, Sampling, TokenizeRequest
from fastgen_compile.serving.responses import Reply, new_logprobs, usage
from fastgen_compile.serving.service import Draining, Overloaded, Service, Unsupported

M = TypeVar("M", bound=BaseModel)
REPLICA_HEADER = "x-fastgen-replica"
ADMIN_PATHS = ("/reset_prefix_cache",)  # vLLM's paths, outside /v1/ but behind the key: they change what every client gets


@dataclass
class ServerState:
    """What the app serves; service is None while the engine loads."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    service: Service | None = None
    health_details: Callable[[], dict] = dict  # more for /health (Ray Serve: the replicas running)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: ErrorType = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def unavailable(state: ServerState) -> ApiError | None:
    """Why /v1/* cannot be served now, if it cannot."""
    if state.service is None:
        return ApiError(503, "the model is still loading", "server_error")
    if (problem := state.service.problem()) is not None:
        return ApiError(503, problem, "server_error")
    return None


class Gate:
    """ASGI middleware in front of every route: the API key, availability and the declared body size,
    checked before a body is read. Pure ASGI (not BaseHTTPMiddleware): streaming and disconnects pass through."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := self.refusal(scope)) is not None:
            return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.state.max_body_bytes:
            return ApiError(413, f"the body of {declared} bytes exceeds the limit of {self.state.max_body_bytes}")
        if not scope["path"].startswith("/v1/") and scope["path"] not in ADMIN_PATHS:
            return None
        key = self.state.api_key
        if key is not None:
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return ApiError(401, "a missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        return unavailable(self.state)


async def read_body(request: Request, model: type[M], limit: int) -> M:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable) -> object:
    """work's result; if the client goes first, work is cancelled (its requests abort) and None returned."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    for t in (task, gone):
        t.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def sse(events: AsyncIterator[dict], headers: dict[str, str]) -> StreamingResponse:
    """Server-sent events, one line of JSON each, then [DONE]; an engine failure mid-stream becomes an error event."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
        except EngineDied as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="fastgen-compile", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(Gate, state=state)

    def service() -> Service:
        if (refusal := unavailable(state)) is not None:
            raise refusal
        return state.service

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{state.model_name}`", "not_found_error", "model", "model_not_found")

    async def start(prompts: list[str | list[int]], body: Sampling, params) -> RequestStreams:
        """Submit every choice of every prompt: choice k is prompt k // n."""
        return await service().generate([p for p in prompts for _ in range(body.n)], params)

    def served_by(outputs: RequestStreams) -> dict[str, str]:
        """The replicas that served a response (Ray Serve), in a header."""
        return {REPLICA_HEADER: ",".join(dict.fromkeys(outputs.replicas))} if outputs.replicas else {}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error_response(ApiError(400, str(e)))

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, e: Overloaded) -> JSONResponse:
        return error_response(ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}))

    @app.exception_handler(Draining)
    async def _draining(_: Request, e: Draining) -> JSONResponse:
        return error_response(ApiError(503, str(e), "server_error"))

    @app.exception_handler(EngineDied)
    async def _died(_: Request, e: EngineDied) -> JSONResponse:
        return error_response(ApiError(503, str(e), "server_error"))

    @app.exception_handler(Unsupported)
    async def _unsupported(_: Request, e: Unsupported) -> JSONResponse:
        return error_response(ApiError(501, str(e), "server_error"))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind: ErrorType = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, str(e.detail), kind))

    @app.get("/health")
    async def health() -> Response:
        s = state.service
        status = "starting" if s is None else "draining" if s.draining else "ok" if s.backend.stopped is None else "dead"
        return JSONResponse({"status": status, **state.health_details()}, status_code=200 if status == "ok" else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service().metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        """Forget every cached prompt prefix (e.g. to time cold prompts); queued before the next request's admission."""
        service().reset_prefix_cache()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        model = service().card
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "fastgen-compile", "root": model.name,
                "max_model_len": model.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_body(request, TokenizeRequest, state.max_body_bytes)
        check_model(body.model)
        model = service().card
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        text = body.prompt if body.messages is None else chat_text(model.tokenizer, body.messages)
        tokens = model.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": model.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_body(request, DetokenizeRequest, state.max_body_bytes)
        check_model(body.model)
        model = service().card
        if any(not 0 <= t < model.vocab_size for t in body.tokens):
            raise ApiError(400, f"tokens must be in [0, {model.vocab_size})", param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        model = service().card
        tok = model.tokenizer
        return {"tokenizer_class": type(tok).__name__, "vocab_size": model.vocab_size, "max_model_len": model.max_model_len,
                "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token, "eos_token_ids": sorted(model.eos_token_ids),
                "chat_template": tok.chat_template}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, state.max_body_bytes)
        check_model(body.model)
        prompts = body.prompts()
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        top = body.logprobs
        params = [body.params(body.max_tokens, k, top, top if body.echo else None) for _ in prompts for k in range(body.n)]
        outputs = await start(prompts, body, params)
        reply = Reply(state.model_name, service().texts, "text_completion")
        tokenizer = service().card.tokenizer

        def echoed(out: RequestOutput) -> tuple[str, dict | None]:
            """The prompt's text and logprobs, which an echo puts before the first generated text."""
            text = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)
            lp = reply.completion_logprobs(out.prompt_logprobs, out.prompt_token_ids) if top is not None else None
            return text, lp

        def joined(a: dict | None, b: dict | None) -> dict | None:
            if a is None or b is None:
                return a or b
            shift = sum(map(len, a["tokens"]))
            return {k: a[k] + ([o + shift for o in b[k]] if k == "text_offset" else b[k]) for k in a}

        if not body.stream:
            last = await unless_disconnected(request, outputs.finals())
            if last is None:
                return Response(status_code=499)
            choices = []
            for k, out in enumerate(last):
                lp = reply.completion_logprobs(out.logprobs, out.token_ids) if top is not None else None
                text = out.text
                if body.echo:
                    prompt_text, prompt_lp = echoed(out)
                    text, lp = prompt_text + text, joined(prompt_lp, lp)
                choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
            return JSONResponse(reply.body(choices, request_usage(last, body.n)), headers=served_by(outputs))

        async def events() -> AsyncIterator[dict]:
            last: list[RequestOutput | None] = [None] * len(params)
            async with contextlib.aclosing(outputs):
                async for k, out in outputs:
                    first, last[k] = last[k] is None, out
                    entries = new_logprobs(out)
                    text = out.delta_text
                    lp = reply.completion_logprobs(entries, out.delta_token_ids if entries else []) if top is not None else None
                    if first and body.echo:
                        prompt_text, prompt_lp = echoed(out)
                        text, lp = prompt_text + text, joined(prompt_lp, lp)
                    if text or out.finished or (lp and lp["tokens"]):
                        choice = {"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason if out.finished else None}
                        yield reply.body([choice])
            if body.include_usage:
                yield reply.body([], request_usage(last, body.n))

        return sse(events(), served_by(outputs))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatRequest, state.max_body_bytes)
        check_model(body.model)
        model = service().card
        prompt = model.tokenizer.encode(chat_text(model.tokenizer, body.messages))
        room = min(model.max_model_len, model.capacity_tokens) - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
        params = [body.params(max_tokens, k, body.token_logprobs) for k in range(body.n)]
        outputs = await start([prompt], body, params)
        reply = Reply(state.model_name, service().texts, "chat.completion")
        wants_logprobs = body.token_logprobs is not None

        if not body.stream:
            last = await unless_disconnected(request, outputs.finals())
            if last is None:
                return Response(status_code=499)
            choices = [{"index": k, "message": {"role": "assistant", "content": out.text},
                        "logprobs": reply.chat_logprobs(out.logprobs) if wants_logprobs else None, "finish_reason": out.finish_reason}
                       for k, out in enumerate(last)]
            return JSONResponse(reply.body(choices, request_usage(last, body.n)), headers=served_by(outputs))

        async def events() -> AsyncIterator[dict]:
            for k in range(len(params)):  # the role first, as OpenAI sends it
                yield reply.body([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}], chunk=True)
            last: list[RequestOutput | None] = [None] * len(params)
            async with contextlib.aclosing(outputs):
                async for k, out in outputs:
                    last[k] = out
                    entries = new_logprobs(out)
                    if out.delta_text or out.finished or (wants_logprobs and entries):
                        choice = {"index": k, "delta": {"content": out.delta_text} if out.delta_text else {},
                                  "logprobs": reply.chat_logprobs(entries) if wants_logprobs else None,
                                  "finish_reason": out.finish_reason if out.finished else None}
                        yield reply.body([choice], chunk=True)
            if body.include_usage:
                yield reply.body([], request_usage(last, body.n), chunk=True)

        return sse(events(), served_by(outputs))

    return app


def chat_text(tokenizer, messages) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template rejecting the conversation is the client's error
        raise ApiError(400, f"messages: the chat template rejected them: {e}", param="messages") from None


def request_usage(outputs: list[RequestOutput | None], n: int) -> dict:
    """Each prompt counted once (its n choices share it; its first choice's cache hit stands for
    them), every choice's tokens counted."""
    done = [o for o in outputs if o is not None]
    prompts = [o for k, o in enumerate(outputs) if o is not None and k % n == 0]
    return usage(sum(len(o.prompt_token_ids) for o in prompts), sum(len(o.token_ids) for o in done), sum(o.num_cached_tokens for o in prompts))

