"""`fastgen-compile chat`: a multi-turn chat in the terminal beside a live panel of what the engine
does (tokens/s, time to first token, KV pages, sequences, what each forward pass carried), and
/load to pour long prompts in next to the chat, so SplitFuse can be watched at work."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fastgen_compile.corpus import corpus, random_slices
from fastgen_compile.engine.engine import EngineSnapshot, StepStats
from fastgen_compile.entrypoints.llm import LLM, RequestStream
from fastgen_compile.errors import CommandError, EngineDied, FastGenError
from fastgen_compile.request import SamplingParams

HELP = {
    "/help": "this list",
    "/reset": "forget the conversation (the system prompt stays)",
    "/params k=v ...": "temperature, top_p, top_k, max_new_tokens, seed (none: off)",
    "/stats": "print the engine panel",
    "/load N [TOKENS]": "N clients sending long prompts back to back beside the chat; /load 0 stops them",
    "/quit": "leave (Ctrl-D too); Ctrl-C stops an answer, not the chat",
}
PARAM_TYPES = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}
PROMPT = "[bold cyan]you>[/] "
LOAD_PROMPT_TOKENS = 1024  # /load's default prompt length; also at most 4 steps' budget and a quarter of the KV pool
LOAD_PARAMS = SamplingParams(max_new_tokens=32, temperature=0)  # short answers: prompt chunks keep coming
MAX_LOAD = 64
RATE_STEPS = 32  # steps the engine's rates are averaged over
CHART_STEPS = 10  # steps in the rolling chart
CHART_WIDTH = 32  # cells for the token budget (the largest bucket)
PANEL_LINES = CHART_STEPS + 9  # the engine panel's height, so the live answer above it can be cropped to fit


@dataclass
class Answer:
    """The answer being streamed, or the last one: its text and timing."""

    submitted: float  # time.perf_counter() when the request went in
    text: str = ""
    tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None

    def summary(self) -> str:
        if self.first_token is None:
            return "no token yet"
        line = f"{self.tokens} tokens · first token {self.first_token - self.submitted:.2f} s"
        if self.tokens > 1:
            line += f" · {(self.tokens - 1) / max(self.last_token - self.first_token, 1e-9):.1f} tok/s"
        return line


class BackgroundLoad:
    """/load: clients that each send long-prompt requests (summarize a stretch of real text) back
    to back, on their own threads, so prompt chunks keep flowing into the steps beside the chat."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.clients = self.finished = 0
        self._streams: set[RequestStream] = set()  # each client's request in flight
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards the counts, _streams and _stopping
        self._stopping = False
        self._corpus: list[int] | None = None  # token ids, cut into prompts
        self._rng = random.Random(0)

    def default_prompt_tokens(self) -> int:
        engine = self.llm.engine
        return min(LOAD_PROMPT_TOKENS, 4 * engine.config.token_budget, engine.pages.capacity_tokens // 4, engine.max_model_len // 2)

    def start(self, clients: int, prompt_tokens: int) -> None:
        """The first request of each client is made here, so a bad size fails on the caller's thread."""
        if self._corpus is None:
            self._corpus = self.llm.tokenizer.encode(corpus())
        if prompt_tokens > len(self._corpus):
            raise CommandError(f"/load prompts can have at most {len(self._corpus)} tokens (the text they are cut from), got {prompt_tokens}")
        firsts: list[RequestStream] = []
        try:
            for _ in range(clients):
                firsts.append(self._request(prompt_tokens))
        except FastGenError:
            for stream in firsts:
                self._streams.discard(stream)
                stream.close()
            raise
        with self._lock:
            self.clients += clients
        for stream in firsts:
            thread = threading.Thread(target=self._client, args=(stream, prompt_tokens), name="fastgen-load", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _request(self, prompt_tokens: int) -> RequestStream | None:
        with self._lock:
            if self._stopping:
                return None
            (ids,) = random_slices(self._corpus, [prompt_tokens], self._rng)
            text = self.llm.tokenizer.decode(ids)
            prompt = self.llm.apply_chat_template([{"role": "user", "content": f"Summarize this text in one paragraph:\n\n{text}"}])
            stream = self.llm.stream(prompt, LOAD_PARAMS)
            self._streams.add(stream)
            return stream

    def _client(self, stream: RequestStream | None, prompt_tokens: int) -> None:
        try:
            while stream is not None:
                for _ in stream:
                    pass
                with self._lock:
                    self._streams.discard(stream)
                    self.finished += 1
                stream = self._request(prompt_tokens)
        except EngineDied:
            pass  # the chat's own next request reports it
        except FastGenError:
            pass  # a prompt that re-encoded too long for the pool ends its client
        finally:
            with self._lock:
                self.clients -= 1

    def stop(self) -> None:
        """Abort every client's request in flight and end the clients."""
        with self._lock:
            self._stopping = True
            streams = list(self._streams)
        for stream in streams:
            stream.abort()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._stopping = False


def step_bar(step: StepStats, budget: int) -> Text:
    """One forward pass as a bar over the token budget: decode tokens, prompt-chunk tokens, padding."""

    def cells(tokens: int) -> int:
        return math.ceil(tokens * CHART_WIDTH / budget)  # rounded up: a lone decode token still shows

    decode = cells(step.decode_tokens)
    prompt = max(cells(step.decode_tokens + step.prompt_tokens) - decode, 1 if step.prompt_tokens else 0)
    padding = max(0, cells(step.bucket) - decode - prompt)
    bar = Text.assemble(("█" * decode, "green"), ("▒" * prompt, "yellow"), ("·" * padding, "bright_black"))
    bar.append(" " * max(0, CHART_WIDTH - bar.cell_len))
    bar.append(f" {step.decode_tokens:>3}+{step.prompt_tokens:<4}{step.num_seqs:>3} seqs {step.seconds * 1000:>5.0f} ms")
    return bar


def prefix_cache_line(snap: EngineSnapshot, enabled: bool) -> str:
    """How much of the prompts the prefix cache served: a chat resends its history each turn, so hits grow with the turns."""
    if not enabled:
        return "off"
    if not snap.prefix_queried_tokens:
        return "no prompt yet"
    return (f"hit {snap.prefix_hit_tokens / snap.prefix_queried_tokens:.0%} of {snap.prefix_queried_tokens} prompt tokens · "
            f"{snap.pages_cached} pages cached")


def engine_panel(snap: EngineSnapshot, answer: Answer | None, load: BackgroundLoad, budget: int, title: str, prefix_caching: bool = True) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_row("answer", answer.summary() if answer else "ask something")
    steps = snap.recent_steps[-RATE_STEPS:]
    if steps:
        tokens, seconds = sum(s.decode_tokens + s.prompt_tokens for s in steps), sum(s.seconds for s in steps)
        mixed = sum(1 for s in steps if s.decode_tokens and s.prompt_tokens) / len(steps)
        grid.add_row("engine", f"step {snap.num_steps} · {tokens / len(steps):.0f} tokens/step · {seconds / len(steps) * 1000:.0f} ms/step · "
                               f"{tokens / max(seconds, 1e-9):.0f} tok/s · {mixed:.0%} mixed")
    else:
        grid.add_row("engine", "no step yet")
    grid.add_row("seqs", f"{snap.running} running · {snap.waiting} waiting · /load: {load.clients} clients, {load.finished} done")
    pages = snap.pages_used + snap.pages_free
    used = round(snap.pages_used / max(pages, 1) * CHART_WIDTH)
    grid.add_row("KV pages", Text.assemble(("█" * used, "magenta"), ("░" * (CHART_WIDTH - used), "bright_black"),
                                            f" {snap.pages_used} used · {snap.pages_free} free"))
    grid.add_row("prefix cache", prefix_cache_line(snap, prefix_caching))
    grid.add_row("bucket", Text.assemble(("█", "green"), " decode ", ("▒", "yellow"), " prompt chunk ", ("·", "bright_black"), " padding  (newest last)"))
    for step in snap.recent_steps[-CHART_STEPS:]:
        grid.add_row(f"{step.bucket:>6}", step_bar(step, budget))
    return Panel(grid, title=title, title_align="left", expand=False)


class ChatConsole:
    """The chat loop: turns go through the chat template; lines starting with / are commands."""

    def __init__(self, llm: LLM, console: Console, params: SamplingParams, system: str | None = None, live: bool = True):
        self.llm, self.console, self.params, self.live = llm, console, params, live
        self.system = system
        self.history = self._new_history()
        self.answer: Answer | None = None
        self.load = BackgroundLoad(llm)
        self.commands = {"/help": self.show_help, "/reset": self.reset, "/params": self.set_params, "/stats": self.show_stats, "/load": self.start_load}
        cfg = llm.engine.config
        self.title = f"engine · {escape(llm.engine.model_name)} · {cfg.dtype} on {cfg.device} · buckets {' '.join(map(str, cfg.buckets))}"

    def run(self, script: TextIO | None = None) -> None:
        """Until /quit or the end of input (Ctrl-D, or the script's last line)."""
        self.console.print(f"[bold]fastgen-compile chat[/] with {escape(self.llm.engine.model_name)}. "
                           "/help lists the commands; Ctrl-C stops an answer; /quit leaves.")
        try:
            for line in self._script_turns(script) if script else self._typed_turns():
                try:
                    if not self.handle(line.strip()):
                        return
                except KeyboardInterrupt:
                    self.console.print("[yellow]interrupted[/]")
        finally:
            self.load.stop()

    def _typed_turns(self) -> Iterator[str]:
        while True:
            try:
                line = self.console.input(PROMPT)
            except KeyboardInterrupt:  # at the prompt, like a shell: a fresh line
                self.console.print()
                continue
            except EOFError:
                self.console.print()
                return
            yield line

    def _script_turns(self, script: TextIO) -> Iterator[str]:
        for line in script:
            self.console.print(f"{PROMPT}{escape(line.rstrip())}")
            yield line

    def handle(self, line: str) -> bool:
        """One turn or command; False once the user quits. Bad input costs one error line."""
        if not line:
            return True
        try:
            if not line.startswith("/"):
                self.say(line)
                return True
            command, *args = line.split()
            if command == "/quit":
                return False
            if command not in self.commands:
                raise CommandError(f"unknown command {command}; /help lists them")
            self.commands[command](args)
        except FastGenError as e:
            self.console.print(f"[red]error:[/] {escape(str(e))}")
        return True

    # ---- a turn ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        messages = [*self.history, {"role": "user", "content": text}]
        submitted = time.perf_counter()
        stream = self.llm.stream(self.llm.apply_chat_template(messages), self.params)
        self.answer = answer = Answer(submitted)
        stopped = False
        try:
            with Live(get_renderable=self._live_view, console=self.console, refresh_per_second=10, transient=True) if self.live else nullcontext():
                for out in stream:
                    answer.last_token = time.perf_counter()
                    answer.first_token = answer.first_token or answer.last_token
                    answer.text, answer.tokens = out.text, len(out.token_ids)
                    if not self.live:
                        self.console.print(out.delta_text, end="", markup=False, emoji=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            stopped = True
        finally:
            stream.close()  # aborts the request if it is still running
        if self.live:
            self.console.print(Text(answer.text), soft_wrap=True)
        else:
            self.console.print()
        self.console.print(f"[dim]{'stopped (Ctrl-C) · ' if stopped else ''}{answer.summary()}[/]")
        self.history = [*messages, {"role": "assistant", "content": answer.text}]

    def _live_view(self) -> Group:
        """Runs on Live's refresh thread: reads the answer's fields and an engine snapshot only."""
        width = self.console.width - 4
        lines = Text(self.answer.text).wrap(self.console, width)
        tail = lines[-max(3, self.console.height - PANEL_LINES - 4) :]
        return Group(Panel(Text("\n").join(tail), title="assistant", title_align="left"), self.panel())

    def panel(self) -> Panel:
        snap = self.llm.engine.snapshot(RATE_STEPS)
        engine = self.llm.engine
        return engine_panel(snap, self.answer, self.load, engine.config.token_budget, self.title, engine.pages.prefix_caching)

    # ---- commands --------------------------------------------------------------------

    def _new_history(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    @staticmethod
    def _no_args(command: str, args: list[str]) -> None:
        if args:
            raise CommandError(f"{command} takes no arguments, got {' '.join(args)!r}")

    def show_help(self, args: list[str]) -> None:
        self._no_args("/help", args)
        for command, what in HELP.items():
            self.console.print(f"  [bold]{escape(command):<16}[/] {what}")

    def reset(self, args: list[str]) -> None:
        self._no_args("/reset", args)
        self.history = self._new_history()
        self.console.print("[dim]conversation cleared[/]")

    def set_params(self, args: list[str]) -> None:
        changes = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise CommandError(f"/params takes key=value pairs, got {arg!r}")
            if key not in PARAM_TYPES:
                raise CommandError(f"unknown sampling parameter {key!r}; known: {', '.join(PARAM_TYPES)}")
            kind = PARAM_TYPES[key]
            try:
                changes[key] = None if key == "seed" and value.lower() == "none" else kind(value)
            except ValueError:
                raise CommandError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        self.params = dataclasses.replace(self.params, **changes)  # SamplingParams checks the values
        self.console.print("[dim]" + " ".join(f"{k}={getattr(self.params, k)}" for k in PARAM_TYPES) + "[/]")

    def show_stats(self, args: list[str]) -> None:
        self._no_args("/stats", args)
        self.console.print(self.panel())

    def start_load(self, args: list[str]) -> None:
        if not 1 <= len(args) <= 2 or not all(a.isdigit() for a in args):
            raise CommandError(f"/load takes a count of clients and optionally their prompt tokens, got {' '.join(args)!r}")
        clients = int(args[0])
        prompt_tokens = int(args[1]) if len(args) == 2 else self.load.default_prompt_tokens()
        if clients == 0:
            self.load.stop()
            self.console.print("[dim]background clients stopped[/]")
            return
        if clients > MAX_LOAD or prompt_tokens < 1:
            raise CommandError(f"/load takes 0 to {MAX_LOAD} clients and at least 1 prompt token, got {' '.join(args)!r}")
        self.load.start(clients, prompt_tokens)
        self.console.print(f"[dim]{clients} background clients started, sending prompts of {prompt_tokens} tokens back to back; "
                           "ask something to watch the chat stream beside their prompt chunks (/load 0 stops them)[/]")
