"""`fastgen-compile serve --replicas N`: start (or join) Ray, deploy serving/replicas.py's
application, print one ready line, and on SIGTERM or SIGINT shut Serve down (replicas get
Ray's graceful-shutdown time to finish their requests) and stop the Ray instance it started.

Multi-node: `ray start --head` on one machine, `ray start --address=HEAD:6379` on the others,
then `fastgen-compile serve --ray-address auto --replicas N` on the head.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from fastgen_compile.config import EngineConfig, engine_overrides
from fastgen_compile.errors import FastGenError
from fastgen_compile.models.loader import check_path, embedded_model_path
from fastgen_compile.serving.server import _shown, fail

SERVICER = "fastgen_compile.serving.proto.fastgen_pb2_grpc.add_TextGenerationServicer_to_server"


def main(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        return fail(f"--replicas must be >= 1, got {args.replicas}")
    if args.threads_per_replica is not None and args.threads_per_replica < 1:
        return fail(f"--threads-per-replica must be >= 1, got {args.threads_per_replica}")
    engine = engine_overrides(args)
    try:  # what every replica would fail on, said once here
        EngineConfig(**engine)
        check_path(engine.get("model") or embedded_model_path())
    except FastGenError as e:
        return fail(f"the model could not be loaded: {e}")
    if importlib.util.find_spec("ray") is None:  # not imported yet: connect sets what Ray reads at import
        return fail("--replicas needs Ray Serve: pip install 'fastgen-compile[ray]'")
    try:
        http_port, grpc_port = free_port(args.host, args.port), free_port(args.host, args.grpc_port) if args.grpc else None
    except OSError as e:
        return fail(f"cannot listen on {args.host}: {e.strerror or e}")
    threads = threads_per_replica(args.replicas, args.threads_per_replica)
    t0 = time.perf_counter()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    local = args.ray_address is None
    try:
        head = connect(args.ray_address, max(os.cpu_count() or 1, args.replicas * threads))
    except (OSError, RuntimeError, ConnectionError) as e:
        return fail(f"cannot reach Ray: {e}")
    import ray
    from ray import serve

    from fastgen_compile.serving.replicas import APP_NAME, application

    for sig in (signal.SIGTERM, signal.SIGINT):  # again: ray.init installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        from ray.serve.config import HTTPOptions, gRPCOptions

        grpc_options = gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]) if grpc_port else None
        serve.start(http_options=HTTPOptions(host=args.host, port=http_port), grpc_options=grpc_options)
        app = application(engine, args.replicas, threads, model_name=args.served_model_name, api_key=args.api_key or None,
                          max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes)
        deployed = threading.Thread(target=deploy, args=(serve, app, APP_NAME, failure := []), daemon=True)
        deployed.start()
        deadline = time.monotonic() + args.startup_timeout
        while deployed.is_alive() and not stop.is_set() and time.monotonic() < deadline:
            deployed.join(0.5)
        if stop.is_set():
            return 0
        if deployed.is_alive() or failure:
            why = failure[0] if failure else f"the replicas were not ready within --startup-timeout {args.startup_timeout:.0f} s"
            return fail(f"the model could not be served: {why}")
        card = serve.get_deployment_handle("EngineReplica", APP_NAME).card.remote().result()
        grpc_address = f", gRPC at {_shown(args.host)}:{grpc_port} (Ray Serve's proxy)" if grpc_port else ""
        where = "a local Ray instance" if local else f"the Ray cluster at {args.ray_address}"
        print(f"ready: serving {args.served_model_name or card.name} ({card.description}) at http://{_shown(args.host)}:{http_port} "
              f"(OpenAI API, /metrics){grpc_address}; {args.replicas} replicas x {threads} threads on {where}; "
              f"started in {time.perf_counter() - t0:.1f} s", flush=True)
        stop.wait()
        print("stopping: Ray Serve shuts the replicas down (in-flight requests get its graceful-shutdown time)", flush=True)
        return 0
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if head is not None:
            head.stop()


def deploy(serve, app, name: str, failure: list[str]) -> None:
    """serve.run; where it fails, one line: the last line of a failed deployment's message (the
    exception its replicas' constructor raised), else serve.run's own."""
    try:
        serve.run(app, name=name, route_prefix="/")
    except Exception as e:  # noqa: BLE001 - whatever stopped the deployment is reported, not raised
        messages = [str(e)]
        with contextlib.suppress(Exception):
            deployments = serve.status().applications[name].deployments.values()
            messages = [d.message for d in deployments if d.status != "HEALTHY" and d.message] + messages
        lines = [line.strip() for line in messages[0].splitlines() if line.strip()]
        failure.append(lines[-1] if lines else type(e).__name__)


def threads_per_replica(replicas: int, given: int | None) -> int:
    """given, else this machine's cores shared out (at least one each)."""
    return given or max(1, (os.cpu_count() or 1) // replicas)


def free_port(host: str, port: int) -> int:
    """port if it can be had now (0: one the OS picks); Ray's proxies bind it themselves a moment later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))
        return s.getsockname()[1]


@dataclass
class LocalRay:
    """`ray start --head --block` in a session of its own: a Ctrl-C or a SIGTERM to our process group
    reaches us, not Ray's processes, so we shut Serve down in order and then stop the head, which
    ends every process it started. It gets SIGTERM if we die first (PR_SET_PDEATHSIG)."""

    proc: subprocess.Popen
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def connect(address: str | None, num_cpus: int) -> LocalRay | None:
    """ray.init to the cluster at address, or to a local head started now with num_cpus (a local
    instance gets the cores the replicas ask for, even past this machine's: their choice)."""
    head = None
    if address is None:  # before Ray is imported (it reads them then): a token only this process and its children know
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"})
        head = start_local_ray(num_cpus)
    import ray

    try:
        ray.init(address=address or f"127.0.0.1:{head.port}", log_to_driver=False, logging_level="warning")
    except BaseException:
        if head is not None:
            head.stop()
        raise
    return head


def start_local_ray(num_cpus: int, timeout: float = 120.0) -> LocalRay:
    port = free_port("127.0.0.1", 0)
    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent)
    head = LocalRay(proc, port)
    output: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # its progress, until it says it blocks
        output.append(line)
        if "will now block" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keeps the pipe drained
            return head
        if time.monotonic() > deadline:
            break
    head.stop()
    raise RuntimeError(f"the local Ray instance did not start: {''.join(output[-5:]).strip()}")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
