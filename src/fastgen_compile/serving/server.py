"""`fastgen-compile serve`: the OpenAI HTTP app (uvicorn) and the gRPC service on one event loop,
over one engine.

Sockets are bound before the model loads, so a port in use fails at once; /health answers 503
until the engine is ready, then one line says where it serves. SIGTERM or SIGINT drains: new
requests get 503 (gRPC UNAVAILABLE), in-flight ones finish (up to --grace seconds), exit 0; a
second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time

import uvicorn

from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.entrypoints.async_llm import AsyncLLM
from fastgen_compile.serving.openai_api import ServerState, build_app
from fastgen_compile.serving.service import Service

API_KEY_ENV = "FASTGEN_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (default: 8000)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    p.add_argument("--no-grpc", dest="grpc", action="store_false", help="serve HTTP only")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"key /v1/* requires as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the model file's)")
    p.add_argument("--max-waiting", type=int, default=1024, help="requests queued for admission before new ones get 429 (default: 1024)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body (default: 8 MiB)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM (default: 30)")
    r = p.add_argument_group("replicas on Ray Serve (pip install 'fastgen-compile[ray]')")
    r.add_argument("--replicas", type=int, default=None, help="serve through Ray Serve with this many engine replicas (default: one engine here, no Ray)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (auto: the one `ray start` made here) instead of starting a local one")
    r.add_argument("--threads-per-replica", type=int, default=None, help="cores each replica's engine uses (default: this machine's cores / replicas)")
    r.add_argument("--startup-timeout", type=float, default=600.0, help="seconds the replicas get to load and warm up (default: 600)")


class Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: draining is ours (it would re-raise the signal at exit)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(args: argparse.Namespace) -> int:
    if args.max_waiting < 1 or args.max_body_bytes < 1:
        return fail("--max-waiting and --max-body-bytes must be >= 1")
    if args.replicas is not None:
        from fastgen_compile.serving import ray_serve

        return ray_serve.main(args)
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    state = ServerState(model_name=args.served_model_name or "", api_key=args.api_key or None, max_body_bytes=args.max_body_bytes)
    grpc = None
    if args.grpc:
        from fastgen_compile.serving.grpc_server import GrpcServer

        try:
            grpc = GrpcServer(lambda: state.service, args.host, args.grpc_port)
        except OSError as e:
            sock.close()
            return fail(f"cannot listen for gRPC on {args.host}:{args.grpc_port}: {e}")
        await grpc.start()
    http = Uvicorn(uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1))
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)

    async def stop_servers() -> None:
        http.should_exit = True
        await http_task
        if grpc is not None:
            await grpc.stop(grace=1)

    t0 = time.perf_counter()
    try:
        llm = await asyncio.to_thread(AsyncLLM, **engine_overrides(args))
    except Exception as e:  # noqa: BLE001 - any reason the model cannot load ends the server with one line
        await stop_servers()
        return fail(f"the model could not be loaded: {e}")
    state.service = service = Service.local(llm, args.max_waiting)
    state.model_name = state.model_name or service.card.name
    if grpc is not None:
        await grpc.set_serving(True)
    http_address = f"http://{_shown(args.host)}:{sock.getsockname()[1]}"
    grpc_address = f", gRPC at {_shown(args.host)}:{grpc.port}" if grpc is not None else ""
    print(f"ready: serving {state.model_name} ({service.card.description}) at {http_address} (OpenAI API, /metrics)"
          f"{grpc_address}"
          f"{'; API key required on /v1/*' if state.api_key else ''}; started in {time.perf_counter() - t0:.1f} s", flush=True)

    stop = asyncio.ensure_future(signals.get())
    await asyncio.wait({stop, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if stop.done():
        service.draining = True
        if grpc is not None:
            await grpc.set_serving(False)
        print(f"draining: {service.in_flight} requests in flight, new ones get 503 (a second signal stops at once)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.grace
        while service.in_flight and time.monotonic() < deadline and signals.empty():
            await asyncio.sleep(0.05)
    else:
        stop.cancel()
    await stop_servers()
    llm.close()
    return 0


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host
