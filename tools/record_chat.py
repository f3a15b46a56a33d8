"""Screenshot of `fastgen-compile chat` under /load, from a real run: the chat runs in a tmux
pane, turns are typed into it, and the pane is captured while an answer streams beside the
background prompts. Writes docs/chat_under_load.txt (plain) and .svg (colours, via rich).

    .venv/bin/python tools/record_chat.py [--clients 4] [--columns 110] [--rows 44]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

SESSION = "fastgen-chat-recording"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def pane(colours: bool = False) -> str:
    return tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", SESSION)


def wait_for(text: str, count: int = 1, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while pane().count(text) < count:
        if time.monotonic() > deadline:
            sys.exit(f"{text!r} never appeared:\n{pane()}")
        time.sleep(0.5)


def mixed_steps(screen: str) -> list[bool]:
    """For each row of the step chart: did that step carry decode and prompt-chunk tokens?"""
    return [bool(re.search(r"█+▒", line)) for line in screen.splitlines() if re.match(r"│ +\d+ +[█▒·]", line)]


def type_line(line: str) -> None:
    tmux("send-keys", "-t", SESSION, "-l", line)
    tmux("send-keys", "-t", SESSION, "Enter")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--columns", type=int, default=110)
    p.add_argument("--rows", type=int, default=44)
    args = p.parse_args()
    chat = f"{sys.executable} -m fastgen_compile.cli chat --temperature 0 --max-new-tokens 160"
    tmux("new-session", "-d", "-s", SESSION, "-x", str(args.columns), "-y", str(args.rows), chat)
    try:
        wait_for("you>")
        type_line(f"/load {args.clients}")
        wait_for("you>", 2)
        type_line("Write a short poem about the sea.")
        # capture while the answer streams and the newest step (and another) fused decodes with prompt chunks
        deadline = time.monotonic() + 600
        while not (re.search(r"answer +\d\d+ tokens", (screen := pane())) and mixed_steps(screen)[-1:] == [True] and sum(mixed_steps(screen)) >= 2):
            if time.monotonic() > deadline:
                sys.exit(f"no mixed step while the answer streamed:\n{pane()}")
            time.sleep(0.2)
        plain, coloured = pane(), pane(colours=True)
        type_line("/quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    lines = plain.rstrip().splitlines()
    (DOCS / "chat_under_load.txt").write_text("\n".join(line.rstrip() for line in lines) + "\n")
    console = Console(record=True, width=args.columns, file=open("/dev/null", "w"), force_terminal=True, color_system="truecolor")
    console.print(Text.from_ansi(coloured.rstrip()))
    console.save_svg(str(DOCS / "chat_under_load.svg"), title="fastgen-compile chat · /load")
    print(plain)


if __name__ == "__main__":
    main()
