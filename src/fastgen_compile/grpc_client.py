"""The gRPC client, after DeepSpeed-MII's `mii.client`: torch-free, so any process can call a server.

    client = fastgen_compile.client("127.0.0.1:50051")
    for r in client.generate(["Hello", "Bonjour"], max_new_tokens=32):
        print(r.generated_text, r.finish_reason)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fastgen_compile.errors import RequestError, ServerError
from fastgen_compile.serving.proto import fastgen_pb2 as pb
from fastgen_compile.serving.proto import fastgen_pb2_grpc as pb_grpc

SCALARS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "min_tokens")


@dataclass
class Response:
    """One prompt's generation (in streaming: what is new, with the totals so far)."""

    generated_text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None until the last reply
    prompt_length: int = 0
    generated_length: int = 0
    cached_prompt_length: int = 0  # prompt tokens whose keys and values came from the server's prefix cache


class Client:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TextGenerationStub(self.channel)

    def generate(self, prompts: str | list[str], streaming_fn: Callable[[list[Response]], None] | None = None, *,
                 request_id: str | None = None, timeout: float | None = None, **sampling) -> list[Response]:
        """sampling: SamplingParams' fields (max_new_tokens, temperature, top_k, top_p, seed, stop,
        stop_token_ids, ignore_eos, min_tokens). streaming_fn gets each new piece as it comes, as a
        one-element list (MII's shape); the whole responses are returned at the end either way."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        unknown = set(sampling) - {*SCALARS, "stop", "stop_token_ids"}
        if unknown:
            raise RequestError(f"unknown sampling options: {', '.join(sorted(unknown))}")
        stop = sampling.pop("stop", ())
        options = pb.Sampling(**{k: v for k, v in sampling.items() if k in SCALARS}, stop=[stop] if isinstance(stop, str) else stop,
                              stop_token_ids=sampling.pop("stop_token_ids", ()))
        request = pb.GenerateRequest(prompts=prompts, sampling=options, request_id=request_id or uuid.uuid4().hex)
        try:
            if streaming_fn is None:
                return [_response(g) for g in self.stub.Generate(request, timeout=timeout).generations]
            whole = [Response("") for _ in prompts]
            for reply in self.stub.GenerateStream(request, timeout=timeout):
                for g in reply.generations:
                    piece, total = _response(g), whole[g.index]
                    total.generated_text += piece.generated_text
                    total.token_ids += piece.token_ids
                    total.finish_reason, total.prompt_length, total.generated_length = piece.finish_reason, piece.prompt_length, piece.generated_length
                    total.cached_prompt_length = piece.cached_prompt_length
                    streaming_fn([piece])
            return whole
        except grpc.RpcError as e:
            raise _error(e) from None

    def abort(self, request_id: str) -> bool:
        """Stop a running call (from any thread); it ends with finish_reason "abort". False: no such call."""
        try:
            return self.stub.Abort(pb.AbortRequest(request_id=request_id)).aborted
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def client(address: str) -> Client:
    return Client(address)


def _response(g: pb.Generation) -> Response:
    return Response(g.text, list(g.token_ids), g.finish_reason or None, g.prompt_length, g.generated_length, g.cached_prompt_length)


def _error(e: grpc.RpcError) -> Exception:
    code, details = e.code(), e.details()
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return RequestError(details)
    return ServerError(code.name, details)
