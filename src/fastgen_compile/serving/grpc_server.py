"""The gRPC face (DeepSpeed-MII style): TextGeneration over Service, plus grpc.health.v1.

Runs on the same event loop as the HTTP app. A call the client cancels (or whose deadline
passes) is cancelled here too, and leaving service.generate aborts its sequences.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from fastgen_compile.errors import EngineDied, RequestError
from fastgen_compile.request import RequestOutput, SamplingParams
from fastgen_compile.serving.proto import fastgen_pb2 as pb
from fastgen_compile.serving.proto import fastgen_pb2_grpc as pb_grpc
from fastgen_compile.serving.service import Draining, Overloaded, Service

SERVICE_NAME = "fastgen.TextGeneration"
STATUS_OF = {RequestError: grpc.StatusCode.INVALID_ARGUMENT, Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
             Draining: grpc.StatusCode.UNAVAILABLE, EngineDied: grpc.StatusCode.INTERNAL}


def sampling_params(s: pb.Sampling) -> SamplingParams:
    """The fields the caller set; SamplingParams' defaults for the rest."""
    scalars = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "min_tokens")
    given = {name: getattr(s, name) for name in scalars if s.HasField(name)}
    return SamplingParams(**given, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids))


def generation(index: int, out: RequestOutput, delta: bool) -> pb.Generation:
    return pb.Generation(index=index, text=out.delta_text if delta else out.text, token_ids=out.delta_token_ids if delta else out.token_ids,
                         finish_reason=out.finish_reason or "", prompt_length=len(out.prompt_token_ids), generated_length=len(out.token_ids),
                         cached_prompt_length=out.num_cached_tokens)


class TextGeneration(pb_grpc.TextGenerationServicer):
    def __init__(self, get_service: Callable[[], Service | None]):
        self.get_service = get_service
        self.running: dict[str, list[int]] = {}  # a running call's request_id -> its engine request ids

    async def _outputs(self, request: pb.GenerateRequest, call_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[int, RequestOutput]]:
        service = self.get_service()
        if service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if call_id in self.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"a call with request_id {call_id!r} is running")
        if not request.prompts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompts must not be empty")
        try:
            params = sampling_params(request.sampling)
            outputs = await service.generate(list(request.prompts), [params] * len(request.prompts))
        except tuple(STATUS_OF) as e:
            await context.abort(next(code for kind, code in STATUS_OF.items() if isinstance(e, kind)), str(e))
        self.running[call_id] = outputs.request_ids
        try:
            async with contextlib.aclosing(outputs):
                async for i, out in outputs:
                    yield i, out
        except EngineDied as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            del self.running[call_id]

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateReply:  # noqa: N802 - gRPC's names
        call_id, final = request.request_id or uuid.uuid4().hex, {}
        async with contextlib.aclosing(self._outputs(request, call_id, context)) as outputs:
            async for i, out in outputs:
                final[i] = out
        return pb.GenerateReply(request_id=call_id, generations=[generation(i, final[i], delta=False) for i in sorted(final)])

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateReply]:  # noqa: N802
        call_id = request.request_id or uuid.uuid4().hex
        # closed here, not when collected, if the call is cancelled while a reply is being sent
        async with contextlib.aclosing(self._outputs(request, call_id, context)) as outputs:
            async for i, out in outputs:
                yield pb.GenerateReply(request_id=call_id, generations=[generation(i, out, delta=True)])

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortReply:  # noqa: N802
        ids, service = self.running.get(request.request_id), self.get_service()
        if ids is None or service is None:
            return pb.AbortReply(aborted=False)
        service.abort(ids)
        return pb.AbortReply(aborted=True)


class GrpcServer:
    def __init__(self, get_service: Callable[[], Service | None], host: str, port: int):
        """Call inside the running event loop; binds now (OSError if the port cannot be had)."""
        # no SO_REUSEPORT (grpc's default): a second server on a taken port must fail, not split its connections
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.servicer = TextGeneration(get_service)
        pb_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc's way of saying the address is taken or bad
            self.port = 0
        if not self.port:
            raise OSError(f"cannot bind {address}: in use, or not an address of this machine")

    async def start(self) -> None:
        await self.server.start()
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self, serving: bool) -> None:
        await self._set(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)

