"""How each linear is computed on this machine: the candidate kernels, and the one measured
fastest for each weight shape and bucket at warmup.

The fastest kernel depends on the CPU and on the row count: on a CPU with avx512_bf16, oneDNN on
packed bf16 weights beats ATen's bf16 linear at every row count, the int4 kernel beats both below
~8 rows (it reads a quarter of the bytes) and loses above; on a CPU without bf16 instructions a
bf16 linear is several times slower than fp32 (docs/architecture.md has the figures). So nothing
is hard-wired: at warmup every candidate is timed on the model's own weights at each bucket's row
count, cycling through all layers' weights as a forward does (a weight timed alone stays in cache
and looks up to 2.5x faster than it runs), and the fastest is kept. The record is kept beside the
compiled graphs under the same key, which names the CPU's flags: a warm start reads it, another
kind of CPU measures its own.

A bucket's graph is traced at a fixed row count, so `LinearKernels.__call__` resolves the choice
while tracing and each bucket's graph calls its chosen kernels directly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen_compile.models import packed
from fastgen_compile.models.decoder import LINEARS, Decoder
from fastgen_compile.models.quantize import GROUP, QuantizedWeight
from fastgen_compile.progress import progress_bar

Weight = torch.Tensor | QuantizedWeight
RECORD = "kernels.json"  # the measured choices, in the graph folder
PASSES = 3  # timed passes over a shape's weights; the fastest counts (the machine is shared)
# a candidate this many times slower than the best at some row count, and on one weight at the
# largest, is not timed at larger ones (int4 with fp32 activations, 6-17x behind, would take minutes
# at 288 rows). Gaps reverse between the ends: fp32 ATen 4.6x behind int4-bf16 at 2 rows wins at 288
# on an AVX2-only EPYC, oneDNN 2.5x behind int4 at 1 row wins from 8 on an avx512_bf16 one.
DROP_BEHIND = 4.0


def dense(weight: Weight) -> torch.Tensor:
    return weight.dense if isinstance(weight, QuantizedWeight) else weight


def _biased(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


def aten(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dense(weight), bias)


def onednn(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return packed.packed_linear(x, dense(weight), bias)


def weight_only(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, bf16_activations: bool = False) -> torch.Tensor:
    """PyTorch's weight-only kernel for the weight's bits; bf16_activations: computed in bf16, returned in x's dtype."""
    a, scales = (x.to(torch.bfloat16), weight.scales_bf16) if bf16_activations else (x, weight.scales)
    if weight.bits == 4:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(a, weight.codes, GROUP, scales)
    else:
        out = torch.ops.aten._weight_int8pack_mm(a, weight.codes, scales)
    return _biased(out.to(x.dtype), bias)


def weight_only_bf16(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight_only(x, weight, bias, bf16_activations=True)


@dataclass(frozen=True)
class Kernel:
    fn: Callable[[torch.Tensor, Weight, torch.Tensor | None], torch.Tensor]
    bits: int | None = None  # the quantized weights it reads; None: the dense weight
    bf16_activations: bool = False  # casts activations to bf16: offered in models computing in another dtype


KERNELS = {
    "aten": Kernel(aten),
    "onednn": Kernel(onednn),  # CPU bf16, weights packed once (models/packed.py)
    "int4": Kernel(weight_only, bits=4),
    "int4-bf16": Kernel(weight_only_bf16, bits=4, bf16_activations=True),
    "int8": Kernel(weight_only, bits=8),
    "int8-bf16": Kernel(weight_only_bf16, bits=8, bf16_activations=True),
}


def candidates(weight: Weight, device: torch.device, dtype: torch.dtype, bf16_activations: bool) -> list[str]:
    """The kernels that can compute this weight here; bf16_activations: in a model of another
    dtype, kernels that compute in bf16 may be chosen (not when that dtype was asked for)."""
    bits = weight.bits if isinstance(weight, QuantizedWeight) else None
    return [
        name for name, k in KERNELS.items()
        if (k.bits is None or k.bits == bits)
        and (name != "onednn" or packed.available(device, dtype))
        and not (k.bf16_activations and (dtype == torch.bfloat16 or not bf16_activations))
    ]


def shape_key(weight: Weight) -> str:
    out, k = dense(weight).shape
    return f"{out}x{k}"


@dataclass
class KernelRecord:
    """Per weight shape ("out x in"), per row count: the kernel to use, and the timings (µs per call) it came from."""

    choices: dict[str, dict[int, str]]
    micros: dict[str, dict[int, dict[str, float]]]

    def kernel(self, weight: Weight, rows: int) -> str:
        """The choice measured at the smallest row count holding rows (the lm_head's row count is
        the number of sampled rows, not a bucket)."""
        by_rows = self.choices.get(shape_key(weight))
        if not by_rows:
            return "aten"
        fits = [r for r in by_rows if r >= rows]
        return by_rows[min(fits) if fits else max(by_rows)]

    def to_json(self) -> dict:
        return {"choices": self.choices, "micros": self.micros}

    @classmethod
    def from_json(cls, data: dict) -> KernelRecord:
        def rows(d: dict) -> dict:
            return {int(r): v for r, v in d.items()}

        return cls({s: rows(c) for s, c in data["choices"].items()}, {s: rows(m) for s, m in data.get("micros", {}).items()})

    def table(self) -> list[tuple[str, int, str, str]]:
        """(shape, rows, chosen, every candidate's µs) rows, for warmup's printout."""
        def timings(shape: str, r: int) -> str:
            found = self.micros.get(shape, {}).get(r, {})
            return "  ".join(f"{name} {found[name]:.0f}" for name in sorted(found, key=found.get))

        return [(shape, r, self.choices[shape][r], timings(shape, r)) for shape in self.choices for r in sorted(self.choices[shape])]


def weight_groups(model: Decoder) -> dict[str, list[Weight]]:
    """Every linear weight the kernels compute (all layers' and the lm_head), grouped by shape."""
    groups: dict[str, list[Weight]] = defaultdict(list)
    for layer in model.layers:
        weights = layer.weights()
        for name in LINEARS:
            if weights[name] is not None and dense(weights[name]).dim() == 2:
                groups[shape_key(weights[name])].append(weights[name])
    head = model.quantized.get("lm_head", model.lm_head)
    groups[shape_key(head)].append(head)
    return dict(groups)


def forced(model: Decoder, rows: list[int], name: str, device: torch.device, dtype: torch.dtype) -> KernelRecord:
    """The named kernel wherever it can compute the weight, else ATen's linear."""
    groups = weight_groups(model)
    return KernelRecord({s: {r: name if name in candidates(ws[0], device, dtype, True) else "aten" for r in rows} for s, ws in groups.items()}, {})


@torch.inference_mode()
def measure(model: Decoder, rows: list[int], device: torch.device, dtype: torch.dtype, bf16_activations: bool) -> KernelRecord:
    """Time every candidate on every weight shape at each row count; keep the fastest."""
    groups = weight_groups(model)
    timed = {s: candidates(ws[0], device, dtype, bf16_activations) for s, ws in groups.items()}
    choices: dict[str, dict[int, str]] = {s: {r: "aten" for r in rows} for s in groups}
    micros: dict[str, dict[int, dict[str, float]]] = {s: {} for s in groups}
    work = [(s, r) for s in groups if len(timed[s]) > 1 for r in sorted(rows)]
    if not work:
        return KernelRecord(choices, micros)

    def far_behind(found: dict[str, float]) -> set[str]:
        return {name for name, t in found.items() if t >= DROP_BEHIND * min(found.values())}

    with progress_bar("measuring linear kernels") as bar:
        task = bar.add_task("", total=len(work))
        behind_at_most: dict[str, set[str]] = {}
        for shape, r in work:
            weights = groups[shape]
            if shape not in behind_at_most:
                bar.update(task, description=f"{shape} at {max(rows)} rows, one weight")
                x = torch.randn(max(rows), dense(weights[0]).shape[1], dtype=dtype, device=device)
                behind_at_most[shape] = far_behind(_time(timed[shape], x, weights[:1]))
            bar.update(task, description=f"{shape} at {r} rows")
            x = torch.randn(r, dense(weights[0]).shape[1], dtype=dtype, device=device)
            micros[shape][r] = found = _time(timed[shape], x, weights)
            choices[shape][r] = min(found, key=found.get)
            dropped = far_behind(found) & behind_at_most[shape]
            timed[shape] = [name for name in timed[shape] if name not in dropped]
            bar.advance(task)
    return KernelRecord(choices, micros)


def _time(names: list[str], x: torch.Tensor, weights: list[Weight]) -> dict[str, float]:
    """µs per call of each kernel, over every weight of the shape in turn (as a forward reads them:
    from memory, not cache). The kernels take turns pass by pass and each keeps its fastest pass,
    so a burst of other work on the machine slows them alike: timed one after another, a record
    measured under load kept a kernel 4x slower at one row (it is kept with the graphs for good)."""
    fns = {name: KERNELS[name].fn for name in names}
    for fn in fns.values():
        for w in weights:
            fn(x, w, None)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(PASSES):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for w in weights:
                fn(x, w, None)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(weights))
    return {name: t * 1e6 for name, t in best.items()}


class LinearKernels:
    """The `linear` of the decoder: the recorded kernel for the weight's shape and the row count."""

    def __init__(self, record: KernelRecord):
        self.record = record

    def __call__(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
        return KERNELS[self.record.kernel(weight, x.shape[0])].fn(x, weight, bias)
