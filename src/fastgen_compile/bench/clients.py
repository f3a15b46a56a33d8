"""Load generators: closed-loop clients and open-loop Poisson arrivals, through a system's stream."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from fastgen_compile.bench.metrics import Trace
from fastgen_compile.bench.workload import Request


class StreamingSystem(Protocol):
    name: str

    def stream(self, request: Request) -> Iterator[int]:
        """Yields the number of new tokens each time some arrive."""
        ...


def run_request(system: StreamingSystem, request: Request, done: Callable[[], None]) -> Trace:
    trace = Trace(len(request.prompt_token_ids), time.perf_counter())
    try:
        for new in system.stream(request):
            trace.token_times.extend([time.perf_counter()] * new)
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not the end of the run
        trace.error = f"{type(e).__name__}: {e}"
    done()
    return trace


def closed_loop(system: StreamingSystem, requests: list[Request], clients: int, done: Callable[[], None]) -> list[Trace]:
    """`clients` users, each sending its next request when its last one ends."""
    todo, lock = iter(enumerate(requests)), threading.Lock()
    traces: list[Trace | None] = [None] * len(requests)

    def client() -> None:
        while True:
            with lock:
                i, request = next(todo, (None, None))
            if request is None:
                return
            traces[i] = run_request(system, request, done)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    _join(threads)
    return traces  # type: ignore[return-value]


def poisson(system: StreamingSystem, requests: list[Request], rate: float, seed: int, done: Callable[[], None]) -> list[Trace]:
    """Requests arrive at `rate` per second on average, whatever the system's progress."""
    rng = random.Random(seed)
    traces: list[Trace | None] = [None] * len(requests)
    threads = []

    def send(i: int, request: Request) -> None:
        traces[i] = run_request(system, request, done)

    for i, request in enumerate(requests):
        if i:
            time.sleep(rng.expovariate(rate))
        threads.append(threading.Thread(target=send, args=(i, request)))
        threads[-1].start()
    _join(threads)
    return traces  # type: ignore[return-value]


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()
