"""EngineLoop: the one thread that steps an engine. Requests from any thread (or any asyncio
event loop) are fused into the same forward passes; each request's outputs go to the sink
its caller gave (a queue put, an event loop's call_soon_threadsafe).

The thread is stopped and joined before the interpreter tears torch down: an engine left
open at exit would otherwise still be inside torch while its native threads are destroyed
(SIGABRT, "terminate called without an active exception").

The engine is built (loaded, warmed up) on the loop's own thread, not the caller's: libgomp
keeps an OpenMP thread pool per thread that ever ran a parallel region, and once two pools
exist on this 2-core machine it counts the cores oversubscribed and puts its workers to sleep
after every region, so a small decode step pays a wake-up per kernel. An engine warmed up on one
thread and stepped on another decoded at half speed (21 against 43 tok/s, docs/architecture.md).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq

from fastgen_compile.config import EngineConfig
from fastgen_compile.engine.engine import Engine, Prompt
from fastgen_compile.errors import EngineDied
from fastgen_compile.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput | BaseException], None]  # called on the loop thread; an exception ends the request

_open_loops: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


def unwrap(item: RequestOutput | BaseException) -> RequestOutput:
    """What a sink received, as the caller sees it: an output, or EngineDied raised."""
    if isinstance(item, EngineDied):
        raise item
    if isinstance(item, BaseException):
        raise EngineDied("the engine loop failed") from item
    return item


@atexit.register
def _close_open_loops() -> None:
    for loop in list(_open_loops):
        loop.close()


class EngineLoop:
    def __init__(self, config: EngineConfig):
        """Builds the engine on the loop's thread and returns once it is ready; a model that
        cannot load raises here, as Engine(config) would."""
        self._sinks: dict[int, Sink] = {}  # request id -> where its outputs go, until its last one
        self._work = threading.Condition()  # guards _sinks, _closed, _failure; wakes the thread
        self._closed = False
        self._failure: Exception | None = None  # what stopped the loop, if anything
        self.engine: Engine
        failed: list[BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, failed, ready), name="fastgen-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]
        _open_loops.add(self)

    @property
    def num_pending(self) -> int:
        """Requests whose last output has not been handed to their sink yet."""
        with self._work:
            return len(self._sinks)

    @property
    def alive(self) -> bool:
        """Open and not failed: it takes requests."""
        with self._work:
            return not self._closed and self._failure is None

    def submit(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None, sinks: Seq[Sink]) -> list[int]:
        """Validate and queue the requests, all or none (Engine.add_requests); sinks: one per prompt."""
        with self._work:
            if self._closed:
                raise EngineDied("this engine is closed")
            if self._failure is not None:
                raise EngineDied("the engine loop failed earlier; create a new one") from self._failure
            # under the lock: the thread hands out no output before every sink is in place
            ids = self.engine.add_requests(prompts, params)
            self._sinks.update(zip(ids, sinks))
            self._work.notify()
        return ids

    def abort(self, request_id: int, keep_sink: bool = False) -> None:
        """keep_sink: the request's sink still gets its last output (finish_reason "abort")."""
        self.engine.abort(request_id)
        with self._work:
            if not keep_sink:
                self._sinks.pop(request_id, None)
            self._work.notify()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix before the next request is admitted; the thread is woken so
        an idle engine forgets now (its snapshot and metrics show it)."""
        self.engine.reset_prefix_cache()
        with self._work:
            self._work.notify()

    def close(self) -> None:
        """Stop the thread after its current step; requests still running fail with EngineDied.
        Idempotent, and safe from any thread, the loop's own included."""
        with self._work:
            self._closed = True
            self._work.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._fail_all(EngineDied("the engine was closed before this request finished"))
        _open_loops.discard(self)

    def _fail_all(self, error: BaseException) -> None:
        with self._work:
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            self._deliver(sink, error)

    @staticmethod
    def _deliver(sink: Sink, item: RequestOutput | BaseException) -> bool:
        try:
            sink(item)
            return True
        except Exception:  # noqa: BLE001 - one caller's broken sink must not stop everyone's engine
            log.exception("dropping a request whose output sink failed")
            return False

    def _run(self, config: EngineConfig, failed: list[BaseException], ready: threading.Event) -> None:
        try:
            self.engine = Engine(config)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            failed.append(e)
            return
        finally:
            ready.set()
        try:
            self._serve()
        finally:
            self.engine.close()  # on this thread: tensor parallelism's STOP must not cross a step's broadcasts

    def _serve(self) -> None:
        while True:
            with self._work:
                while not self._closed and not self.engine.has_work():
                    self._work.wait()
                if self._closed:
                    return
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - surface it to every waiting caller
                with self._work:
                    self._failure = e
                self._fail_all(e)
                log.exception("the engine loop stopped; every pending and later request fails with EngineDied")
                return
            with self._work:
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if sink is None:
                        continue
                    delivered = self._deliver(sink, out)
                    if not delivered or out.finished:
                        del self._sinks[out.request_id]
                    if not delivered and not out.finished:
                        self.engine.abort(out.request_id)
