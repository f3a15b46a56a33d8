"""Tensor parallelism across processes, on torch.distributed: gloo on CPU, NCCL on CUDA.

Rank 0 is the engine the caller built: scheduler, sampling, the API. It starts one worker process
per other rank, a fresh interpreter that builds the same engine over its own shard of the model
(models/shard.py) and then only follows: every step rank 0 broadcasts the step's header (bucket,
rows to score) and the bucket's input buffers packed into one byte buffer, and every rank runs the
same compiled bucket. Inside it the layers' all-reduces (functional collectives, traced into the
graph: one graph per bucket and rank, no recompiles) sum the shards' partial results; the
vocabulary-parallel embedding and lm_head run outside it, with an all-reduce and an all-gather.

A worker is started as `python -c` (not multiprocessing's spawn, which re-imports the caller's
`__main__`: a script without an `if __name__ == "__main__"` guard would build a second engine in
the child), in a session of its own (a Ctrl-C at the terminal reaches rank 0, which stops the
workers; a signal to the server's process group does not kill them mid-step). It ends when rank 0
sends STOP (`Engine.close`: LLM.close, context exit, interpreter exit, a server's SIGTERM), and
when rank 0's process is gone however it ended: its end of the worker's control socket closes,
which a thread of the worker watches (PR_SET_PDEATHSIG would fire when the *thread* that started
the worker exits, not the process). A worker that dies makes rank 0's next collective fail at once
(gloo sees the closed connection), and the step raises EngineDied naming the rank, so every pending
request fails instead of hanging; a rank alive but stuck fails its peers after TIMEOUT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from fastgen_compile.config import EngineConfig
from fastgen_compile.errors import ConfigError, EngineDied
from fastgen_compile.models.shard import Shard

if TYPE_CHECKING:
    from fastgen_compile.engine.engine import Engine
    from fastgen_compile.engine.runner import BucketInputs

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # one machine: the rendezvous and gloo's connections stay on loopback
TIMEOUT = timedelta(minutes=10)  # a collective waiting longer on a rank that is alive but stuck fails
STOP_WAIT = 30.0  # seconds a worker gets to leave after STOP before it is killed
DEATH_WAIT = 5.0  # seconds rank 0 waits, after a failed collective, for the rank that failed it to be seen dead
STEP, STOP = 1, 2  # header commands
HEADER = 3  # command, bucket, number of rows to score; then those rows


def threads_per_rank(world: int) -> int:
    """The cores this process may use, shared out over the ranks (all on this machine)."""
    return max(1, len(os.sched_getaffinity(0)) // world)


class Wire:
    """A bucket's input buffers as views of one byte buffer: a step's inputs cross in one broadcast."""

    def __init__(self, tensors: list[torch.Tensor]):
        tensors = sorted(tensors, key=lambda t: -t.element_size())  # widest first: every view starts aligned
        sizes = [t.numel() * t.element_size() for t in tensors]
        self.buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=tensors[0].device)
        self.pairs = [(t, part.view(t.dtype).view(t.shape)) for t, part in zip(tensors, self.buffer.split(sizes))]

    def pack(self) -> None:
        for tensor, view in self.pairs:
            view.copy_(tensor)

    def unpack(self) -> None:
        for tensor, view in self.pairs:
            tensor.copy_(view)


class TensorParallel:
    """One rank's side: its shard, the process group, the collectives its graphs call, the step it
    receives. Rank 0's side is a Leader."""

    def __init__(self, shard: Shard, config: EngineConfig, store_port: int = 0, conn: Connection | None = None):
        """store_port: rank 0's TCPStore (the rendezvous); conn: the control socket to rank 0 (workers)."""
        self.shard, self.config = shard, config
        self.device = torch.device(config.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.store_port, self.conn = store_port, conn
        self.group_name: str | None = None  # the process group's, once connected
        self.header = torch.zeros(HEADER + config.token_budget, dtype=torch.int64)  # rows to score: at most a bucket's
        self.wires: dict[int, Wire] = {}  # bucket -> its inputs' wire

    @property
    def world(self) -> int:
        return self.shard.world

    def start(self, config: EngineConfig) -> None:
        """Rank 0 starts the other ranks here; a worker is one of them."""

    def connect(self) -> None:
        """This rank's shard is built: say so, and join the process group."""
        self.conn.send(("ready", None))
        store = dist.TCPStore(HOST, self.store_port, self.world, is_master=False, timeout=TIMEOUT)
        self._init_group(store)

    def _init_group(self, store: dist.Store) -> None:
        dist.init_process_group(self.backend, store=store, rank=self.shard.rank, world_size=self.world, timeout=TIMEOUT)
        self.group_name = dist.group.WORLD.group_name

    # ---- collectives (inside the compiled layer graph, and eager around it) -----------------

    # waited at once: eager (the embedding), the result is then a plain tensor; an AsyncCollectiveTensor
    # handed to the layer graph is a tensor subclass its first call would compile a second graph for
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self.group_name))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n) on every rank -> (rows, world * n): rank 0's columns, then rank 1's..."""
        rows, n = x.shape
        gathered = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), 0, self.group_name))  # (world * rows, n)
        return gathered.view(self.world, rows, n).permute(1, 0, 2).reshape(rows, self.world * n)

    # ---- the step, as workers receive it ----------------------------------------------------

    def wire(self, inputs: BucketInputs) -> Wire:
        found = self.wires.get(inputs.batch.bucket)
        if found is None:
            found = self.wires[inputs.batch.bucket] = Wire(inputs.tensors())
        return found

    def _broadcast_header(self) -> None:
        if self.device.type == "cuda":  # NCCL moves device tensors only
            header = self.header.to(self.device)
            dist.broadcast(header, 0)
            self.header.copy_(header)
        else:
            dist.broadcast(self.header, 0)

    def receive_header(self) -> tuple[int, int, torch.Tensor]:
        """(command, bucket, rows to score) of rank 0's next step."""
        self._broadcast_header()
        command, bucket, n = self.header[:HEADER].tolist()
        return command, bucket, self.header[HEADER : HEADER + n].clone()

    def receive_inputs(self, inputs: BucketInputs) -> None:
        wire = self.wire(inputs)
        dist.broadcast(wire.buffer, 0)
        wire.unpack()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Worker:
    """Rank 0's handle on a worker process."""

    rank: int
    proc: subprocess.Popen
    conn: Connection

    @classmethod
    def start(cls, rank: int, config: EngineConfig, store_port: int, threads: int) -> Worker:
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very fastgen_compile
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", f"from fastgen_compile.engine.parallel import worker_main; worker_main({theirs.fileno()})"]
        try:
            proc = subprocess.Popen(command, pass_fds=(theirs.fileno(),), start_new_session=True, env=env)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send((rank, config, store_port, threads))
        return cls(rank, proc, conn)

    def death(self) -> str | None:
        """Why this worker is gone (its own last word where it sent one), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        said = ""
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(0):
                kind, detail = self.conn.recv()
                said = f": {detail}" if kind == "failed" else said
        return f"tensor-parallel worker rank {self.rank} (pid {self.proc.pid}) exited with code {code}{said}"

    def wait_ready(self) -> None:
        while not self.conn.poll(0.2):
            if (gone := self.death()) is not None:
                raise EngineDied(f"{gone} while building its shard")
        kind, detail = self.conn.recv()
        if kind == "failed":
            self.stop(0)
            raise detail if isinstance(detail, BaseException) else EngineDied(f"tensor-parallel worker rank {self.rank} failed to build its shard: {detail}")

    def stop(self, wait: float) -> None:
        """Wait for it to leave (after STOP), else kill it."""
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class Leader(TensorParallel):
    """Rank 0: starts and stops the workers, sends every step."""

    def __init__(self, config: EngineConfig):
        super().__init__(Shard(0, config.tensor_parallel_size), config)
        self.workers: list[Worker] = []
        self._store: dist.TCPStore | None = None
        self._conn_lock = threading.Lock()  # stats are asked from any thread
        self._closed = False

    def start(self, config: EngineConfig) -> None:
        """config: rank 0's, its pool's pages fixed (kv_pages): every rank's pool has as many."""
        if dist.is_initialized():
            raise ConfigError("a tensor-parallel engine is already open in this process (torch.distributed has one default group): close it first")
        if self.device.type == "cuda" and torch.cuda.device_count() < self.world:
            raise ConfigError(f"tensor_parallel_size={self.world} needs {self.world} GPUs, this machine has {torch.cuda.device_count()}")
        threads = threads_per_rank(self.world)
        torch.set_num_threads(threads)  # this process is rank 0: its share of the cores
        # port 0: the OS picks a free one while the store binds it (several deployments on one machine)
        self._store = dist.TCPStore(HOST, 0, self.world, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        for rank in range(1, self.world):
            device = f"cuda:{rank}" if self.device.type == "cuda" else config.device
            self.workers.append(Worker.start(rank, replace(config, device=device), self._store.port, threads))

    def connect(self) -> None:
        for worker in self.workers:
            worker.wait_ready()
        self._init_group(self._store)

    def send_step(self, inputs: BucketInputs, rows: torch.Tensor) -> None:
        """Every worker gets the step whose inputs fill `inputs` (rank 0's buffers, filled)."""
        self._raise_if_dead()
        n = len(rows)
        self.header[:HEADER] = torch.tensor([STEP, inputs.batch.bucket, n])
        self.header[HEADER : HEADER + n] = rows
        self._broadcast_header()
        wire = self.wire(inputs)
        wire.pack()
        dist.broadcast(wire.buffer, 0)

    def _raise_if_dead(self) -> None:
        for worker in self.workers:
            if (gone := worker.death()) is not None:
                raise EngineDied(gone)

    @contextlib.contextmanager
    def naming_dead_ranks(self):
        """A collective that failed because a worker died raises EngineDied naming it."""
        try:
            yield
        except EngineDied:
            raise
        except RuntimeError as e:
            deadline = time.monotonic() + DEATH_WAIT
            while time.monotonic() < deadline:
                for worker in self.workers:
                    if (gone := worker.death()) is not None:
                        raise EngineDied(gone) from e
                time.sleep(0.05)
            raise

    def worker_stats(self, timeout: float = 30.0) -> list[dict]:
        """Each worker's compile counts (graphs, recompiles since warmup), asked over its control socket."""
        with self._conn_lock:
            stats = []
            for worker in self.workers:
                worker.conn.send("stats")
                if not worker.conn.poll(timeout):
                    raise EngineDied(worker.death() or f"tensor-parallel worker rank {worker.rank} did not answer in {timeout:.0f} s")
                stats.append(worker.conn.recv()[1])
            return stats

    def close(self) -> None:
        """STOP to every worker (if all still follow), then each is waited for, or killed; idempotent.
        Called on the thread that steps the engine: a STOP must not cross a step's broadcasts."""
        if self._closed:
            return
        self._closed = True
        following = self.group_name is not None and all(w.death() is None for w in self.workers)
        if following:
            self.header[:HEADER] = torch.tensor([STOP, 0, 0])
            try:
                self._broadcast_header()
            except RuntimeError:  # a worker died just now
                following = False
        with self._conn_lock:
            for worker in self.workers:
                worker.stop(STOP_WAIT if following else 0)
        super().close()
        self._store = None


# ---- the worker process ------------------------------------------------------------------


class Stopped(Exception):
    """Rank 0 sent STOP."""


def worker_main(fd: int) -> None:
    """A worker process: build this rank's engine, then run every step rank 0 sends until STOP."""
    conn = Connection(fd)
    rank, config, store_port, threads = conn.recv()
    torch.set_num_threads(threads)
    tp = TensorParallel(Shard(rank, config.tensor_parallel_size), config, store_port, conn)
    engine: Engine | None = None
    sending = threading.Lock()  # the main thread's last word and the listener's answers share the socket

    def listen() -> None:
        """Rank 0's questions; EOF: rank 0's process is gone, and so is this one."""
        while True:
            try:
                question = conn.recv()
            except (EOFError, OSError):
                os._exit(1)
            if question == "stats" and engine is not None:
                c = engine.compiler
                with sending:
                    conn.send(("stats", {"rank": rank, "pid": os.getpid(), "warm": c.warm, "graphs_compiled": c.graphs_compiled,
                                         "recompiles_since_warmup": c.recompiles_since_warmup()}))

    threading.Thread(target=listen, name="fastgen-tp-listener", daemon=True).start()
    from fastgen_compile.engine.engine import Engine  # the engine imports this module

    try:
        engine = Engine(replace(config, warmup=False), tp=tp)  # its warmup is rank 0's, followed below
    except BaseException as e:  # noqa: BLE001 - handed to rank 0, which raises it
        with sending:
            conn.send(("failed", e if _picklable(e) else f"{type(e).__name__}: {e}"))
        return
    try:
        follow(engine, tp, warmup=config.compile and config.warmup)
    except Stopped:
        pass
    except BaseException as e:  # noqa: BLE001 - rank 0 names it when its collective fails
        traceback.print_exc()
        with sending, contextlib.suppress(OSError):
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        os._exit(1)
    tp.close()


def follow(engine: Engine, tp: TensorParallel, warmup: bool) -> None:
    """Run each step rank 0 sends, until STOP (raised as Stopped). warmup: rank 0 warms up first,
    one step per bucket in the compiler's order; this rank's compiler does the same alongside."""
    from fastgen_compile.engine.scheduler import StepPlan

    runner = engine.runner

    def step() -> None:
        command, bucket, rows = tp.receive_header()
        if command == STOP:
            raise Stopped
        inputs = runner.inputs.get(bucket) or runner.bucket_inputs(engine.pack(StepPlan(), bucket))
        tp.receive_inputs(inputs)
        runner.run(inputs, rows)

    if warmup:
        engine.compiler.warmup(engine.config.buckets, lambda bucket: step())
    while True:
        step()


def _picklable(e: BaseException) -> bool:
    import pickle

    try:
        pickle.dumps(e)
        return True
    except Exception:  # noqa: BLE001 - any reason at all: send its text instead
        return False
