"""The `fastgen-compile` command: `generate` streams one answer, `demo` shows continuous batching,
`chat` is the interactive console (console.py), `warmup` compiles every bucket into graphs/ so later starts load
instead of compiling, `bench` measures serving."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fastgen_compile.config import EngineConfig, add_engine_flags, engine_overrides
from fastgen_compile.engine import step_costs
from fastgen_compile.engine.engine import Engine
from fastgen_compile.engine.scheduler import StepPlan
from fastgen_compile.entrypoints.console import ChatConsole
from fastgen_compile.entrypoints.llm import LLM
from fastgen_compile.errors import FastGenError
from fastgen_compile.request import SamplingParams

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

DEMO_QUESTION = "In two sentences, why do language model servers batch requests together?"
LONG_TEXT = (
    "DeepSpeed-FastGen serves large language models with Dynamic SplitFuse. Long prompts are split into chunks "
    "that run over several forward passes, and short prompts are fused together with the one-token decode steps "
    "of the requests that are already generating, so that every forward pass carries roughly the same number of "
    "tokens. A steady token count keeps the hardware in its efficient regime, stops long prompts from stalling the "
    "requests that are decoding, and gives steadier latency under load than running each prompt alone."
)
DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for writing clean Python code.",
    "What is 2 plus 2?",
    "Explain what a hash table is to a beginner.",
    "Name four planets of the solar system.",
    "Suggest a name for a friendly robot.",
    f"Summarize this paragraph in one sentence:\n\n{LONG_TEXT}",
]


def stream_answer(llm: LLM, prompt: str, params: SamplingParams) -> tuple[int, float]:
    """Print tokens as they arrive; returns (generated tokens, seconds)."""
    t0, n = time.perf_counter(), 0
    for o in llm.stream(prompt, params):
        sys.stdout.write(o.delta_text)
        sys.stdout.flush()
        n = len(o.token_ids)
    sys.stdout.write("\n")
    return n, time.perf_counter() - t0


def rate_line(tokens: int, seconds: float) -> str:
    return f"{tokens} tokens, {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s"


def chat(llm: LLM, text: str) -> str:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def open_llm(args: argparse.Namespace) -> LLM:
    err.print(f"[dim]loading {escape(args.model or 'the embedded SmolLM2-135M-Instruct')} ({args.dtype})…[/]")
    return LLM(**engine_overrides(args))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    with open_llm(args) as llm:
        prompt = chat(llm, args.prompt) if args.chat else args.prompt
        if not args.chat:
            sys.stdout.write(prompt)
        tokens, seconds = stream_answer(llm, prompt, params)
    err.print(f"[dim]{rate_line(tokens, seconds)}[/]")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0)  # greedy: the same answers every run
    err.rule("[bold]fastgen-compile demo")
    t0 = time.perf_counter()
    with open_llm(args) as llm:
        cfg, name = llm.engine.config, escape(llm.engine.model_name)
        err.print(f"loaded [bold]{name}[/] ({cfg.dtype}: {escape(cfg.dtype_reason)}; {cfg.device}), buckets {cfg.buckets}, "
                  f"ready in {time.perf_counter() - t0:.1f} s")

        err.rule("one request, streamed")
        out.print(f"[bold]> {DEMO_QUESTION}[/]")
        tokens, seconds = stream_answer(llm, chat(llm, DEMO_QUESTION), params)
        err.print(f"[dim]{rate_line(tokens, seconds)}[/]")

        err.rule(f"{len(DEMO_PROMPTS)} requests at once (continuous batching)")
        first_step = llm.engine.num_steps
        t0 = time.perf_counter()
        outputs = llm.generate([chat(llm, p) for p in DEMO_PROMPTS], params)
        seconds = time.perf_counter() - t0
        steps = llm.engine.steps_since(first_step)

    table = Table("prompt", "answer", "tokens", show_lines=False)
    for prompt, o in zip(DEMO_PROMPTS, outputs):
        table.add_row(clip(prompt, 40), clip(o.text, 80), str(len(o.token_ids)))
    out.print(table)
    generated = sum(len(o.token_ids) for o in outputs)
    out.print(f"[bold]{len(outputs)} requests, {generated} output tokens, {seconds:.2f} s, {generated / seconds:.1f} output tok/s[/]")
    if steps:
        carried = sum(s.decode_tokens + s.prompt_tokens for s in steps)
        mixed = sum(1 for s in steps if s.decode_tokens and s.prompt_tokens)
        buckets = ", ".join(f"{b}×{n}" for b, n in sorted(Counter(s.bucket for s in steps).items()))
        out.print(f"{len(steps)} steps, {carried / len(steps):.1f} tokens per step, {mixed / len(steps):.0%} mixed (decode + prompt tokens), buckets {buckets}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # bad values fail before the model loads
    # Ctrl-C stops an answer (KeyboardInterrupt), even where a shell without job control started us
    # in the background and so left SIGINT ignored, which Python then keeps
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with open_llm(args) as llm:
        ChatConsole(llm, out, params, args.system, live=out.is_terminal and not args.plain).run(args.script)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(**engine_overrides(args)))
    engine.close()  # tensor parallelism's workers: what follows only reads what the engine recorded
    seconds = time.perf_counter() - t0
    table = Table("bucket", "seconds", "cache", title=f"{escape(engine.model_name)} ({engine.config.dtype}, {engine.config.device})")
    for w in engine.compiler.warmups:
        table.add_row(str(w.bucket), f"{w.seconds:.1f}", w.cache)
    out.print(table)
    record = engine.runner.kernels.record
    if record.micros:
        kernels = Table("weight", "rows", "kernel", "measured µs per call (fastest first)", title="linear kernels, measured on this machine")
        for shape, rows, kernel, timings in record.table():
            kernels.add_row(shape, str(rows), kernel, timings)
        out.print(kernels)
    if engine.step_costs is not None:
        print_step_costs(engine)
    cache = engine.compiler.graph_cache
    out.print(f"dtype {engine.config.dtype}: {escape(engine.config.dtype_reason)}")
    quantized = ", ".join(f"{part} {method}" for part, method in engine.quantization.items()) or "none"
    out.print(f"quantized: {quantized} (quantization={engine.config.quantization})")
    pages = engine.pages
    # the pool is a graph shape: a start whose free memory suggests another size takes this one if it is near
    out.print(f"KV pool: {pages.num_pages} pages of {pages.page_size} tokens"
              + ("" if engine.config.kv_pages is not None else f" (sized from free memory; --kv-pages {pages.num_pages} pins it)"))
    out.print(f"graphs in {escape(str(cache.folder))}; ready in {seconds:.1f} s" if cache else f"ready in {seconds:.1f} s")
    return 0


def print_step_costs(engine: Engine) -> None:
    """The measured curve, and the step size it gives one running decode beside a new prompt."""
    costs, c, buckets = engine.step_costs, engine.config, engine.scheduler.buckets
    one_decode = StepPlan(num_tokens=1, num_decode_tokens=1, decode_keys=256)
    table = Table("bucket", "empty ms", "+ 1 decode, full prompt chunk: ms", "prompt tok/s", title="step costs, measured on this machine")
    for b in buckets[1:]:
        seconds = costs.with_prompt(buckets, one_decode, b - 1, b - 1)
        table.add_row(str(b), f"{1e3 * costs.bucket_seconds[b]:.1f}", f"{1e3 * seconds:.1f}", f"{(b - 1) / seconds:.0f}")
    out.print(table)
    out.print(f"attention: {1e6 * costs.decode_key_seconds:.2f} µs per decode key, {1e6 * costs.prompt_key_seconds:.2f} µs per prompt token x key")
    if c.policy != "splitfuse" or c.itl_target_ms == 0:
        out.print(f"token budget: fixed, {engine.scheduler.token_budget} rows a step (policy {c.policy}, itl_target_ms={c.itl_target_ms})")
    elif c.itl_target_ms is None:
        k = costs.knee(buckets, one_decode, 0)
        out.print(f"ITL cap: the knee, {k} prompt tokens beside one decode (the fewest with {step_costs.KNEE:.0%} of the best prompt "
                  f"throughput, predicted {1e3 * costs.with_prompt(buckets, one_decode, k, k):.0f} ms); deadlines at {c.prompt_rate:g} prompt tok/s")
    else:
        out.print(f"ITL cap: itl_target_ms={c.itl_target_ms:g}; deadlines at {c.prompt_rate:g} prompt tok/s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgen-compile", description="Dynamic SplitFuse LLM serving as a torch.compile graph engine.")
    sub = p.add_subparsers(dest="command", required=True)

    def sampling_args(sp: argparse.ArgumentParser, max_new_tokens: int) -> None:
        sp.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        sp.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
        sp.add_argument("--top-p", type=float, default=0.9)
        sp.add_argument("--top-k", type=int, default=0, help="0 means off")
        sp.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="stream one completion to the terminal")
    g.add_argument("prompt")
    add_engine_flags(g)
    sampling_args(g, max_new_tokens=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("demo", help="stream one chat answer, then serve a batch of prompts at once")
    add_engine_flags(d)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(run=cmd_demo)

    c = sub.add_parser("chat", help="multi-turn chat with a live panel of the engine; /help lists its commands")
    add_engine_flags(c)
    sampling_args(c, max_new_tokens=256)
    c.add_argument("--system", default=None, metavar="PROMPT", help="system prompt (default: the chat template's own)")
    c.add_argument("--plain", action="store_true", help="plain text, no live panel (the default when stdout is not a terminal)")
    c.add_argument("--script", type=argparse.FileType("r"), metavar="FILE", help="read the user's turns and commands from FILE, one per line")
    c.set_defaults(run=cmd_chat)

    b = sub.add_parser("bench", help="serving benchmark: SplitFuse vs prefill-first vs transformers under load, SLA metrics, plots")
    from fastgen_compile.bench import run as bench_run  # the one product module that reaches into bench/

    bench_run.add_arguments(b)
    b.set_defaults(run=bench_run.main)

    s = sub.add_parser("serve", help="persistent server: OpenAI-compatible HTTP (SSE streaming), gRPC, Prometheus /metrics")
    from fastgen_compile.serving import server

    server.add_arguments(s)
    s.set_defaults(run=server.main)

    w = sub.add_parser("warmup", help="compile every bucket and save the graphs, so later starts load them")
    add_engine_flags(w)
    w.set_defaults(run=cmd_warmup)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except FastGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
