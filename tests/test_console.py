"""`fastgen-compile chat`: the step chart, the chat loop and its commands in-process, and the
whole command in a pseudo-terminal (live panel, /load, Ctrl-C, /quit)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import signal
import struct
import sys
import termios
import threading
import time

import pytest
from rich.console import Console

from fastgen_compile import SamplingParams, cli
from fastgen_compile.corpus import corpus
from fastgen_compile.engine.engine import EngineSnapshot, StepStats
from fastgen_compile.entrypoints.console import CHART_WIDTH, ChatConsole, prefix_cache_line, step_bar

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
FRANCE, ITALY = "What is the capital of France?", "And of Italy?"


def engine_flags(config: dict) -> list[str]:
    """The conftest engines' configuration as chat flags: the chat process reuses their compiled graphs (inductor's cache)."""
    flags = ["--dtype", config["dtype"], "--buckets", *map(str, config["buckets"])]
    for knob in ("decode_rows", "page_size", "q_block", "kv_pages", "itl_target_ms"):
        flags += [f"--{knob.replace('_', '-')}", str(config[knob])]
    return flags


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_step_bar_draws_each_step_to_the_token_budget():
    # budget 288 over 32 cells (9 tokens a cell): 4 decode tokens take 1 cell, 4 + 256 tokens end in cell 29
    mixed = step_bar(StepStats(bucket=288, decode_tokens=4, prompt_tokens=256, num_seqs=5, seconds=0.045), budget=288)
    assert mixed.plain == "█" + "▒" * 28 + "·" * 3 + "   4+256   5 seqs    45 ms"
    # a lone decode token still shows; the padding runs to the bucket (32 rows: 4 cells), not the budget
    lone = step_bar(StepStats(bucket=32, decode_tokens=1, prompt_tokens=0, num_seqs=1, seconds=0.0123), budget=288)
    assert lone.plain == "█" + "·" * 3 + " " * (CHART_WIDTH - 4) + "   1+0     1 seqs    12 ms"
    # a full prompt-only step fills every cell
    full = step_bar(StepStats(bucket=64, decode_tokens=0, prompt_tokens=64, num_seqs=2, seconds=0.2), budget=64)
    assert full.plain.startswith("▒" * CHART_WIDTH + "   0+64 ")


def test_prefix_cache_line_shows_the_hit_rate():
    def snap(queried: int, hit: int, cached: int) -> EngineSnapshot:
        return EngineSnapshot(running=0, waiting=0, pages_used=0, pages_free=100, pages_cached=cached, prefix_queried_tokens=queried,
                              prefix_hit_tokens=hit, num_steps=0, recent_steps=[])

    assert prefix_cache_line(snap(400, 300, 12), enabled=True) == "hit 75% of 400 prompt tokens · 12 pages cached"
    assert prefix_cache_line(snap(0, 0, 0), enabled=True) == "no prompt yet"
    assert prefix_cache_line(snap(400, 300, 12), enabled=False) == "off"


def test_a_bad_sampling_flag_fails_before_the_model_loads(capsys):
    assert cli.main(["chat", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err == "error: top_p must be in (0, 1], got 1.5\n"


def test_chat_turns_and_commands(llm_compiled, wait_idle, idle_free_pages):
    llm = llm_compiled
    assert wait_idle(llm)
    first = llm.chat([user(FRANCE)], GREEDY)
    second = llm.chat([user(FRANCE), {"role": "assistant", "content": first.text}, user(ITALY)], GREEDY)
    script = io.StringIO("\n".join([
        FRANCE, "/params top_p=0.5 seed=3", "/params top_p=2", "/params top_k=1.5", "/params warmth=1", "/params 0.5",
        "/frobnicate", "/load", "/load x", "/load 65", "/load 2 30000", "/load 2 96", ITALY, "/stats", "/load 0", "/reset", "/help now", "/quit", "never read",
    ]))
    console = Console(file=io.StringIO(), width=100, highlight=False)
    chat = ChatConsole(llm, console, SamplingParams(max_new_tokens=8, temperature=0), live=False)
    chat.run(script)
    transcript = console.file.getvalue()

    assert f"{first.text}\n{len(first.token_ids)} tokens · first token" in transcript
    assert f"{second.text}\n{len(second.token_ids)} tokens · first token" in transcript
    assert "temperature=0 top_p=0.5 top_k=0 max_new_tokens=8 seed=3" in transcript
    errors = [line for line in transcript.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: top_p must be in (0, 1], got 2.0",
        "error: top_k must be an integer, got '1.5'",
        "error: unknown sampling parameter 'warmth'; known: temperature, top_p, top_k, max_new_tokens, seed",
        "error: /params takes key=value pairs, got '0.5'",
        "error: unknown command /frobnicate; /help lists them",
        "error: /load takes a count of clients and optionally their prompt tokens, got ''",
        "error: /load takes a count of clients and optionally their prompt tokens, got 'x'",
        "error: /load takes 0 to 64 clients and at least 1 prompt token, got '65'",
        f"error: /load prompts can have at most {len(llm.tokenizer.encode(corpus()))} tokens (the text they are cut from), got 30000",
        "error: /help takes no arguments, got 'now'",
    ]
    assert "2 background clients started, sending prompts of 96 tokens back to back" in transcript
    # /stats: the panel, while the two clients' requests run beside the chat
    assert re.search(r"seqs +\d running · \d waiting · /load: 2 clients, \d+ done", transcript)
    assert re.search(r"KV pages +[█░]{32} \d+ used · \d+ free", transcript)
    # the second turn resent the first: its chat template's leading pages came from the prefix cache
    hit = re.search(r"prefix cache +hit (\d+)% of \d+ prompt tokens · \d+ pages cached", transcript)
    assert hit and int(hit.group(1)) > 0
    assert "▒" in transcript  # a step in the chart carried prompt-chunk tokens
    assert "background clients stopped" in transcript
    assert "conversation cleared" in transcript and "you> never read" not in transcript
    # /reset forgot both turns; the one before it had both in its prompt
    assert chat.history == []
    assert chat.params == SamplingParams(max_new_tokens=8, temperature=0, top_p=0.5, seed=3)
    # leaving aborted the clients' requests: the engine is idle and every page is free again
    assert chat.load.clients == 0 and chat.load.finished >= 2
    assert wait_idle(llm)
    assert llm.engine.pages.num_free == idle_free_pages(llm)


def test_the_system_prompt_leads_every_turn_and_outlives_reset(llm_compiled, wait_idle):
    llm = llm_compiled
    assert wait_idle(llm)
    system = {"role": "system", "content": "You answer in French."}
    reference = llm.chat([system, user(FRANCE)], GREEDY)
    console = Console(file=io.StringIO(), width=100)
    chat = ChatConsole(llm, console, GREEDY, system=system["content"], live=False)
    chat.run(io.StringIO(f"{FRANCE}\n"))
    assert f"{reference.text}\n{len(reference.token_ids)} tokens · first token" in console.file.getvalue()
    assert chat.history == [system, user(FRANCE), {"role": "assistant", "content": reference.text}]
    chat.handle("/reset")
    assert chat.history == [system]


ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[78=>]|\r")


class Terminal:
    """A command on a pseudo-terminal (its controlling terminal, so Ctrl-C is a real SIGINT)."""

    def __init__(self, argv: list[str], rows: int = 40, columns: int = 120):
        env = {**os.environ, "TERM": "xterm-256color", "LINES": str(rows), "COLUMNS": str(columns)}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command
            os.execve(argv[0], argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self._bytes = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            self._bytes.extend(chunk)

    def screen(self) -> str:
        """Everything written so far, without escape sequences."""
        return ANSI.sub("", bytes(self._bytes).decode("utf-8", errors="replace"))

    def expect(self, pattern: str, start: int = 0, timeout: float = 240) -> int:
        """Wait until the regex appears after position `start` of screen(); returns where it ends.
        The timeout only guards against a hang."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.compile(pattern).search(self.screen(), start):
                return m.end()
            time.sleep(0.1)
        pytest.fail(f"{pattern!r} never appeared; the screen ends with:\n{self.screen()[-3000:]}")

    def prompt(self, start: int) -> int:
        return self.expect(r"you> ", start)

    def type(self, line: str) -> int:
        """Type a line (once the prompt is there); returns where its output starts."""
        mark = len(self.screen())
        os.write(self.fd, line.encode() + b"\r")
        return mark

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self._reader.join()
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_chat_in_a_pseudo_terminal(llm_compiled, wait_idle, engine_config):
    llm = llm_compiled
    assert wait_idle(llm)
    # the answers, from the in-process engine of the same configuration (greedy)
    first = llm.chat([user(FRANCE)], GREEDY)
    second = llm.chat([user(FRANCE), {"role": "assistant", "content": first.text}, user(ITALY)], GREEDY)

    argv = [sys.executable, "-m", "fastgen_compile.cli", "chat", *engine_flags(engine_config), "--temperature", "0", "--max-new-tokens", "8"]
    term = Terminal(argv)
    try:
        at = term.prompt(0)  # loaded and compiled
        at = term.expect(re.escape(first.text), term.type(FRANCE))
        at = term.prompt(at)
        at = term.expect(r"temperature=0.0 top_p=0.5 top_k=0 max_new_tokens=8 seed=None", term.type("/params top_p=0.5"))
        at = term.expect(r"error: unknown command /nonsense; /help lists them", term.type("/nonsense"))
        at = term.expect(r"3 background clients started, sending prompts of 256 tokens", term.type("/load 3"))
        at = term.prompt(at)
        mark = term.type(ITALY)
        # the live panel, while the answer streams beside the three background requests
        term.expect(r"/load: 3 clients, \d+ done", mark)
        term.expect(r"KV pages +[█░]{32} \d+ used · \d+ free", mark)
        term.expect(r"tokens/step · \d+ ms/step", mark)
        at = term.expect(re.escape(second.text) + rf"\n{len(second.token_ids)} tokens · first token", mark)
        at = term.prompt(at)

        # Ctrl-C ends the answer, not the chat
        at = term.prompt(term.expect(r"max_new_tokens=400", term.type("/params max_new_tokens=400")))
        mark = term.type("Tell me a very long story about a dragon and a knight.")
        term.expect(r"answer +\d+ tokens · first token", mark)  # it is streaming
        os.write(term.fd, b"\x03")
        at = term.expect(r"stopped \(Ctrl-C\) · \d+ tokens", mark)
        at = term.prompt(at)
        term.type("/quit")
        assert term.exit_code() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
