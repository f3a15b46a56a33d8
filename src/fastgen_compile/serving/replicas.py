"""`fastgen-compile serve --replicas N`: the same OpenAI app and gRPC service on Ray Serve, over N
engine replicas.

Two deployments in one Ray Serve application:
- `EngineReplica` (N replicas, one engine each, --threads-per-replica cores): streams one
  prompt's outputs per call.
- `Ingress` (one replica, no engine): openai_api's app and grpc_server's TextGeneration over a
  ReplicaSet, which sends each prompt of a request to the replica Ray Serve's router picks (power
  of two choices, fewest ongoing requests), so a multi-prompt request is spread, not pinned.

A replica that dies: a prompt it had produced nothing for is sent again to another replica; one
it was streaming ends with EngineDied (HTTP 503, or an error event mid-stream; gRPC INTERNAL).
Ray Serve restarts the replica; /health counts the replicas running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from fastgen_compile.engine.engine import Prompt
from fastgen_compile.entrypoints.async_llm import RequestStreams
from fastgen_compile.errors import EngineDied, RequestError
from fastgen_compile.request import RequestOutput, SamplingParams
from fastgen_compile.serving.grpc_server import TextGeneration
from fastgen_compile.serving.metrics import Metrics
from fastgen_compile.serving.openai_api import ServerState, build_app
from fastgen_compile.serving.proto import fastgen_pb2 as pb
from fastgen_compile.serving.service import ModelCard, Service, Unsupported

APP_NAME = "fastgen"
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError, BackPressureError)
RESUBMITS = 2  # times a prompt no replica has produced anything for is sent again after its replica died
HEALTH_POLL_S = 1.0


@dataclass(frozen=True)
class Accepted:
    """A replica's first item for a call: it took the prompt."""

    replica: str


@dataclass(frozen=True)
class Rejected:
    """A replica's only item for a call: the prompt cannot be served as given (RequestError's message)."""

    message: str


class EngineReplica:
    """One engine in a Ray Serve replica. engine: EngineConfig's keyword arguments."""

    def __init__(self, engine: dict, threads: int, stand_in_seconds: float | None = None):
        import torch

        torch.set_num_threads(threads)  # before the engine's loop thread makes its pool
        self.replica = serve.get_replica_context().replica_id.unique_id
        if stand_in_seconds is None:
            from fastgen_compile.entrypoints.async_llm import AsyncLLM

            self.llm = AsyncLLM(**engine)
            self.model = ModelCard.of(self.llm.engine)
        else:
            self.llm = FixedServiceTime(stand_in_seconds)
            self.model = self.llm.card

    def card(self) -> ModelCard:
        return self.model

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Accepted | Rejected | RequestOutput]:
        try:
            streams = self.llm.generate_many([prompt], [params])
        except RequestError as e:
            yield Rejected(str(e))
            return
        yield Accepted(self.replica)
        async with contextlib.aclosing(streams):  # a cancelled call (the ingress's client left) aborts the request
            async for _, out in streams:
                yield out

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine loop stopped is replaced."""
        if self.llm.stopped is not None:
            raise RuntimeError(self.llm.stopped)


class FixedServiceTime:
    """A test double for the engine, named as such: it holds each request for a fixed service time,
    one at a time, without using the CPU, and answers one token. With it the balancer's scaling is
    measured apart from the engines' (tools/bench_replicas.py)."""

    card = ModelCard("fixed-service-time stand-in", None, 1 << 20, 1 << 20, 1, frozenset(), "a test double, no engine")
    stopped = None

    def __init__(self, seconds: float):
        self.seconds, self.lock, self.ids = seconds, asyncio.Lock(), itertools.count()

    def generate_many(self, prompts: Seq[Prompt], params: Seq[SamplingParams]) -> RequestStreams:
        rid = next(self.ids)

        async def outputs() -> AsyncIterator[tuple[int, RequestOutput]]:
            async with self.lock:
                await asyncio.sleep(self.seconds)
            yield 0, RequestOutput(rid, prompts[0] if isinstance(prompts[0], str) else None, [0], "x", [0], "x", [0], True, "length")

        return RequestStreams([rid], outputs())


@dataclass
class _Call:
    """One prompt on one replica."""

    response: DeploymentResponseGenerator
    replica: str


class ReplicaSet:
    """The Service backend of the ingress: each prompt a call to the EngineReplica deployment."""

    def __init__(self, engine: DeploymentHandle, target_replicas: int):
        self.engine = engine.options(stream=True)
        self.target = target_replicas
        self.running_replicas = target_replicas  # as Ray Serve last said
        self.in_flight = 0  # prompts submitted and not finished
        self._ids = itertools.count()
        self._aborts: dict[int, asyncio.Event] = {}  # request id -> set to abort it

    @property
    def num_waiting(self) -> int:
        """What admission bounds (--max-waiting): the prompts in flight over all replicas."""
        return self.in_flight

    @property
    def stopped(self) -> str | None:
        return None if self.running_replicas else "no engine replica is running (Ray Serve is restarting them)"

    def health(self) -> dict:
        return {"replicas": {"running": self.running_replicas, "target": self.target}}

    async def poll_replicas(self) -> None:
        """Forever: the replicas running, as Ray Serve's controller counts them."""
        while True:
            with contextlib.suppress(Exception):  # a controller hiccup: keep the last count
                status = await asyncio.to_thread(serve.status)
                deployment = status.applications[APP_NAME].deployments["EngineReplica"]
                self.running_replicas = deployment.replica_states.get("RUNNING", 0)
            await asyncio.sleep(HEALTH_POLL_S)

    async def _call(self, prompt: Prompt, params: SamplingParams) -> _Call:
        """A replica that accepted the prompt (resubmitted where one died first); RequestError if rejected."""
        for attempt in range(RESUBMITS + 1):
            response = self.engine.generate.remote(prompt, params)
            try:
                first = await response.__anext__()
            except REPLICA_LOST as e:
                if attempt == RESUBMITS:
                    raise EngineDied(f"no engine replica could take the request: {type(e).__name__}") from None
                continue
            if isinstance(first, Rejected):
                raise RequestError(first.message)
            return _Call(response, first.replica)
        raise AssertionError("unreachable")

    async def submit(self, prompts: Seq[Prompt], sampling_params: Seq[SamplingParams]) -> RequestStreams:
        """Every prompt accepted by some replica, or none runs (the accepted ones are cancelled)."""
        calls = await asyncio.gather(*(self._call(p, sp) for p, sp in zip(prompts, sampling_params)), return_exceptions=True)
        if failures := [c for c in calls if isinstance(c, BaseException)]:
            for c in calls:
                if isinstance(c, _Call):
                    c.response.cancel()
            raise failures[0]
        ids = [next(self._ids) for _ in prompts]
        return RequestStreams(ids, self._merge(ids, list(prompts), list(sampling_params), calls), tuple(c.replica for c in calls))

    async def _merge(self, ids: list[int], prompts: list[Prompt], params: list[SamplingParams], calls: list[_Call]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every call as they come; leaving early cancels the calls."""
        queue: asyncio.Queue = asyncio.Queue()
        self.in_flight += len(ids)
        tasks = [asyncio.ensure_future(self._follow(i, rid, prompts[i], params[i], call, queue)) for i, (rid, call) in enumerate(zip(ids, calls))]
        try:
            for _ in tasks:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self.in_flight -= len(ids)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, index: int, rid: int, prompt: Prompt, params: SamplingParams, call: _Call, queue: asyncio.Queue) -> None:
        """One call's outputs into queue, then None; an error instead where its replica died mid-stream."""
        abort = self._aborts[rid] = asyncio.Event()
        last: RequestOutput | None = None
        try:
            while True:
                try:
                    async for out in _until(call.response, abort):
                        last = dataclasses.replace(out, request_id=rid)
                        await queue.put((index, last))
                    break
                except REPLICA_LOST:
                    if last is not None:
                        died = f"the engine replica {call.replica} died while serving this request (Ray Serve restarts it); try again"
                        await queue.put(EngineDied(died))
                        return
                    call = await self._call(prompt, params)  # nothing was streamed yet: another replica starts it afresh
            if abort.is_set() and (last is None or not last.finished):
                await queue.put((index, _aborted(rid, prompt, last)))
        except EngineDied as e:
            await queue.put(e)
        finally:
            call.response.cancel()
            del self._aborts[rid]
            await queue.put(None)

    def abort(self, request_id: int) -> None:
        if (event := self._aborts.get(request_id)) is not None:
            event.set()

    def reset_prefix_cache(self) -> None:
        # a call through the handle reaches the one replica the router picks, not each of them
        raise Unsupported("resetting the prefix cache is not supported with --replicas: each replica has its own cache and "
                          "Ray Serve routes a call to one of them; restart the application to clear them")


async def _until(response: DeploymentResponseGenerator, abort: asyncio.Event) -> AsyncIterator[RequestOutput]:
    """response's outputs until it ends or abort is set."""
    aborted = asyncio.ensure_future(abort.wait())
    try:
        while True:
            step = asyncio.ensure_future(response.__anext__())
            await asyncio.wait({step, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        aborted.cancel()


def _aborted(rid: int, prompt: Prompt, last: RequestOutput | None) -> RequestOutput:
    if last is not None:
        return dataclasses.replace(last, delta_text="", delta_token_ids=[], finished=True, finish_reason="abort")
    return RequestOutput(rid, prompt if isinstance(prompt, str) else None, [] if isinstance(prompt, str) else list(prompt), "", [], "", [], True, "abort")


class GrpcAborted(Exception):
    """A gRPC call ended with a status (Ray Serve's proxy sends the code set on the context)."""


class RayGrpcContext:
    """What TextGeneration asks of grpc.aio's context, over Ray Serve's."""

    def __init__(self, context):
        self.context = context

    async def abort(self, code, details: str) -> None:
        self.context.set_code(code)
        self.context.set_details(details)
        raise GrpcAborted(details)


@serve.ingress()
class Ingress:
    """The OpenAI app (HTTP, through Ray Serve's proxy) and TextGeneration (through its gRPC proxy)."""

    async def __init__(self, engine: DeploymentHandle, replicas: int, model_name: str | None, api_key: str | None, max_waiting: int, max_body_bytes: int):
        card: ModelCard = await engine.card.remote()
        backend = ReplicaSet(engine, replicas)
        self.poller = asyncio.get_running_loop().create_task(backend.poll_replicas())
        gauges = {"replicas_running": ("engine replicas running", lambda: backend.running_replicas),
                  "replicas_target": ("engine replicas asked for", lambda: backend.target),
                  "requests_in_flight": ("prompts in flight over all replicas", lambda: backend.in_flight)}
        self.service = Service(backend, card, max_waiting, Metrics(None, gauges))
        self.state = ServerState(model_name or card.name, api_key, max_body_bytes, self.service, backend.health)
        self.grpc = TextGeneration(lambda: self.service)

    def __serve_build_asgi_app__(self):
        return build_app(self.state)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateReply:  # noqa: N802 - gRPC's names
        return await self.grpc.Generate(request, RayGrpcContext(grpc_context))

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateReply]:  # noqa: N802
        async with contextlib.aclosing(self.grpc.GenerateStream(request, RayGrpcContext(grpc_context))) as replies:
            async for reply in replies:
                yield reply

    async def Abort(self, request: pb.AbortRequest, grpc_context) -> pb.AbortReply:  # noqa: N802
        return await self.grpc.Abort(request, RayGrpcContext(grpc_context))


def application(engine: dict, replicas: int, threads: int, *, model_name: str | None = None, api_key: str | None = None,
                max_waiting: int = 1024, max_body_bytes: int = 8 << 20, max_ongoing: int = 256, stand_in_seconds: float | None = None):
    """The Ray Serve application: Ingress over `replicas` EngineReplicas of `threads` cores each.
    max_ongoing: calls a replica takes at once, what its engine batches (Ray's default of 5 would
    starve continuous batching)."""
    engines = serve.deployment(
        EngineReplica, num_replicas=replicas, max_ongoing_requests=max_ongoing, max_queued_requests=-1,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5, max_constructor_retry_count=1,
    ).bind(engine, threads, stand_in_seconds)
    front = serve.deployment(Ingress, num_replicas=1, max_ongoing_requests=max(1024, max_waiting), ray_actor_options={"num_cpus": 0})
    return front.bind(engines, replicas, model_name, api_key, max_waiting, max_body_bytes)
