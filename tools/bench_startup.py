"""Start-up: a fresh process started four ways, each timed from process start to ready and
to its first streamed token. Prints a table and writes JSON.

    no cache          graphs/ empty: parse the GGUF file, compile every bucket, save both
    warm cache        graphs/ as the previous process left it
    after warmup      `fastgen-compile warmup` first (its time is the first-warmup figure), then a fresh process
    warm cache, lazy  warm graphs/ and warmup=False: only the buckets the first token needs load

    .venv/bin/python tools/bench_startup.py [--model PATH] [--dtype bfloat16] [--kv-pages N]

Every run gets its own fresh graphs folder (FASTGEN_GRAPHS_DIR), so other caches on this
machine (the checkout's graphs/, ~/.cache) play no part. The KV pool is sized as a user's
`LLM()` and `fastgen-compile warmup` size it (free memory, or a size the folder was warmed for,
if near); --kv-pages N pins it. The table says the pool each start had.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

CHILD = """
import json, sys, time
t_start = float(sys.argv[1])
from fastgen_compile import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[2]))
ready = time.time()
for out in llm.stream("The capital of France is", SamplingParams(max_new_tokens=1, temperature=0)):
    first = time.time()
w = [[x.bucket, round(x.seconds, 2), x.cache] for x in llm.engine.compiler.warmups]
print(json.dumps({"ready": ready - t_start, "first_token": first - t_start, "warmups": w, "graphs_compiled": llm.engine.compiler.graphs_compiled,
                  "kv_pages": llm.engine.pages.num_pages}))
llm.close()
"""


def timed_process(args: list[str], graphs: str) -> tuple[float, str]:
    env = {**os.environ, "FASTGEN_GRAPHS_DIR": graphs}
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stdout


def start(knobs: dict, graphs: str) -> dict:
    _, stdout = timed_process(["-c", CHILD, repr(time.time()), json.dumps(knobs)], graphs)
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-pages", type=int, default=None, help="pin the KV pool (default: sized as LLM() sizes it)")
    p.add_argument("--out", default="bench_results/startup.json")
    args = p.parse_args()
    knobs = {"model": args.model, "dtype": args.dtype, "kv_pages": args.kv_pages}
    pool = ["--kv-pages", str(args.kv_pages)] if args.kv_pages is not None else []
    cli = ["-m", "fastgen_compile.cli", "warmup", "--dtype", args.dtype, *pool] + (["--model", args.model] if args.model else [])
    console = Console()
    rows = {}
    with tempfile.TemporaryDirectory() as fresh, tempfile.TemporaryDirectory() as warmed:
        console.print("[dim]no cache…[/]")
        rows["no cache"] = start(knobs, fresh)
        console.print("[dim]warm cache…[/]")
        rows["warm cache"] = start(knobs, fresh)
        console.print("[dim]fastgen-compile warmup…[/]")
        warmup_seconds, warmup_out = timed_process(cli, warmed)
        console.print(warmup_out)
        console.print("[dim]after warmup…[/]")
        rows["after warmup"] = start(knobs, warmed)
        console.print("[dim]warm cache, lazy…[/]")
        rows["warm cache, lazy"] = start(knobs | {"warmup": False}, warmed)

    title = f"start-up from process start ({args.dtype}, {platform.machine()}, {os.cpu_count()} CPUs)"
    table = Table("start", "ready (s)", "first token (s)", "KV pages", "buckets: seconds, cache", title=title)
    for name, r in rows.items():
        buckets = ", ".join(f"{b}: {s:.1f} s {c}" for b, s, c in r["warmups"]) or "compiled on first use"
        table.add_row(name, f"{r['ready']:.1f}", f"{r['first_token']:.1f}", str(r["kv_pages"]), buckets)
    console.print(table)
    console.print(f"`fastgen-compile warmup` of every bucket, from process start: {warmup_seconds:.1f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"runs": rows, "warmup_command_seconds": warmup_seconds, "args": vars(args), "cpus": os.cpu_count()}, f, indent=2)
    console.print(f"[dim]wrote {args.out}[/]")


if __name__ == "__main__":
    main()
