"""Where one engine step spends its time: torch.profiler over decode-only and mixed steps.

    .venv/bin/python tools/profile_step.py [--seqs 32] [--prompt 256]
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from fastgen_compile.bench.workload import prompts_of_lengths
from fastgen_compile.config import add_engine_flags, engine_overrides
from fastgen_compile.engine.engine import Engine
from fastgen_compile.request import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, default=24, help="running decodes; keep below decode_rows so the long prompt is admitted")
    p.add_argument("--prompt", type=int, default=256)
    add_engine_flags(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    engine = Engine(**engine_overrides(args))
    params = SamplingParams(max_new_tokens=10_000 // 8, temperature=0.0, ignore_eos=True)
    for ids in prompts_of_lengths(engine.tokenizer, [args.prompt] * args.seqs):
        engine.add_requests([ids], params)
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting or not engine.scheduler.running:
        engine.step()
    phases = {"decode": None, "mixed": None}
    for phase in phases:
        if phase == "mixed":
            for ids in prompts_of_lengths(engine.tokenizer, [2000], seed=1):
                engine.add_requests([ids], params)
            engine.step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                engine.step()
        per_step = (time.perf_counter() - t0) / args.steps
        last = engine.step_stats[-1]
        print(f"\n== {phase}: {per_step * 1000:.1f} ms/step, bucket {last.bucket}, {last.decode_tokens} decode + {last.prompt_tokens} prompt tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
