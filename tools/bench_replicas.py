"""Replicas on Ray Serve (`serve --replicas N`): two figures, measured apart.

1. The balancer: N = 1, 2, 4, 8 replicas of `FixedServiceTime`, a test double in place of the
   engine (each holds a request for a fixed service time, one at a time, without using the CPU),
   behind the same Ingress, router and proxy; closed-loop clients, 4 per replica. Requests/s
   against the N / service-time a perfect balancer gives: what the routing layer costs, apart from
   what engines on 2 shared cores can do. The paper's persistent deployment: 1.46 -> 23.7 req/s
   from 1 to 16 replicas.
2. Real replicas: `fastgen-compile serve --replicas R` (the cores split) for R = 1, 2 on the
   embedded model, measured by `fastgen-compile bench --server URL`.

    .venv/bin/python tools/bench_replicas.py [--service-ms 250] [--seconds 10] [--skip-real]

Writes bench_results/replicas/replicas.json and docs/bench/replicas.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fastgen_compile.hardware import machine
from fastgen_compile.serving.ray_serve import connect, free_port

PAPER = {1: 1.46, 16: 23.7}  # DeepSpeed-FastGen's replica scaling, requests/s
REAL_BENCH = ["--systems", "server", "--clients", "4", "8", "--requests", "12", "--prompt-mean", "512", "--gen-mean", "48"]


async def closed_loop(url: str, clients: int, seconds: float) -> dict:
    """clients loops of one-token completions for `seconds` (after one warm-up request each)."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as http:

        async def one() -> float:
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            r.raise_for_status()
            return time.perf_counter() - t0

        await asyncio.gather(*(one() for _ in range(clients)))
        end = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < end:
                latencies.append(await one())

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "latency_p50_s": latencies[len(latencies) // 2], "latency_p99_s": latencies[int(len(latencies) * 0.99)]}


def balancer(replica_counts: list[int], service_s: float, seconds: float) -> list[dict]:
    head = connect(None, max(replica_counts))
    from ray import serve
    from ray.serve.config import HTTPOptions

    from fastgen_compile.serving.replicas import APP_NAME, application

    rows = []
    try:
        port = free_port("127.0.0.1", 0)
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        url = f"http://127.0.0.1:{port}"
        for n in replica_counts:
            serve.run(application({}, n, 1, stand_in_seconds=service_s), name=APP_NAME, route_prefix="/")
            if n == replica_counts[0]:  # the service time as a client sees it, one request at a time
                alone = asyncio.run(closed_loop(url, 1, seconds / 2))
            row = {"replicas": n, "clients": 4 * n, **asyncio.run(closed_loop(url, 4 * n, seconds)), "ideal_requests_per_s": n / service_s}
            row["share_of_ideal"] = row["requests_per_s"] / row["ideal_requests_per_s"]
            print(f"balancer: {n} replicas, {4 * n} clients: {row['requests_per_s']:.2f} req/s = {row['share_of_ideal']:.3f} of {n} / service time", flush=True)
            rows.append(row)
        rows[0]["service_time_alone_s"] = alone["latency_p50_s"]
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        if head is not None:
            head.stop()
    return rows


def real(replica_counts: list[int], out: Path) -> list[dict]:
    rows = []
    for r in replica_counts:
        port = free_port("127.0.0.1", 0)
        with tempfile.TemporaryFile("w+") as log:
            server = subprocess.Popen([sys.executable, "-m", "fastgen_compile.cli", "serve", "--replicas", str(r), "--port", str(port), "--no-grpc"],
                                      stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
            try:
                ready = server.stdout.readline()
                if not ready.startswith("ready:"):
                    log.seek(0)
                    raise RuntimeError(f"serve --replicas {r} did not start: {log.read()[-2000:]}")
                print(ready.strip(), flush=True)
                folder = out / f"real-{r}"
                subprocess.run([sys.executable, "-m", "fastgen_compile.cli", "bench", "--server", f"http://127.0.0.1:{port}", *REAL_BENCH,
                                "--out", str(folder)], check=True)
                results = json.loads((folder / "serving.json").read_text())["results"]
            finally:
                server.terminate()  # SIGTERM: it shuts Ray Serve and its local Ray down
                server.wait(120)
        threads = int(re.search(r"x (\d+) threads", ready).group(1))
        for row in results:
            rows.append({"replicas": r, "threads_per_replica": threads, "clients": row["clients"], "requests_per_s": row["requests_per_s"],
                         "output_tok_per_s": row["output_tok_per_s"], "effective_throughput": row["effective_throughput"],
                         "ttft_p50_s": row["ttft_s"]["p50"], "inter_token_p95_s": row["inter_token_s"]["p95"]})
            print(f"real: {r} replicas x {threads} threads, {row['clients']} clients: {row['requests_per_s']:.3f} req/s, "
                  f"{row['output_tok_per_s']:.1f} out tok/s", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = result["balancer"]
    ns = [r["replicas"] for r in rows]
    base = rows[0]["requests_per_s"] / rows[0]["replicas"]
    left.plot(ns, [r["requests_per_s"] / base for r in rows], "o-", label=f"ours: stand-in replicas ({result['service_ms']:.0f} ms each, no CPU)")
    left.plot([1, 16], [1, 16], ":", color="gray", label="linear")
    left.plot(list(PAPER), [v / PAPER[1] for v in PAPER.values()], "s--", label="paper: 1.46 -> 23.7 req/s (real replicas)")
    for r in rows:
        left.annotate(f"{r['requests_per_s']:.1f} req/s", (r["replicas"], r["requests_per_s"] / base), textcoords="offset points", xytext=(5, -12), fontsize=8)
    left.set(xlabel="replicas", ylabel="requests/s relative to one replica", title="the balancer (Ray Serve router + our ingress)")
    left.legend(fontsize=8)
    if result.get("real"):
        real_rows = result["real"]
        labels = [f"{r['replicas']}x{r['threads_per_replica']}t\n{r['clients']} clients" for r in real_rows]
        x = range(len(real_rows))
        right.bar([i - 0.2 for i in x], [r["requests_per_s"] for r in real_rows], 0.4, label="requests/s")
        eff = [r["effective_throughput"].get("512/4", 0.0) for r in real_rows]
        right.bar([i + 0.2 for i in x], eff, 0.4, label="effective req/s (512 tok/s, 4 tok/s SLA)")
        right.set_xticks(list(x), labels, fontsize=8)
        right.set(title=f"real replicas, embedded model, {result['cpus']} cores shared", ylabel="requests/s")
        right.legend(fontsize=8)
    fig.suptitle(result["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8], help="stand-in replica counts")
    p.add_argument("--service-ms", type=float, default=250.0, help="the stand-in's service time per request")
    p.add_argument("--seconds", type=float, default=10.0, help="load per point")
    p.add_argument("--skip-real", action="store_true", help="only the balancer")
    p.add_argument("--out", default="bench_results/replicas")
    p.add_argument("--plot", default="docs/bench/replicas.png")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "cpus": os.cpu_count(), "service_ms": args.service_ms,
              "balancer": balancer(args.replicas, args.service_ms / 1e3, args.seconds)}
    if not args.skip_real:
        result["real"] = real([1, 2], out)
    (out / "replicas.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.plot))
    print(f"wrote {out / 'replicas.json'} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
