"""Tiny random models of every supported family (safetensors + a word-level tokenizer) for fast, exact tests."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

VOCAB = 512


def save_tiny_tokenizer(folder) -> None:
    """A word-level tokenizer over the whole tiny vocab: "w5 w17" -> [5, 17]; 0 unk, 1 bos, 2 eos."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def tiny_config(model_type: str = "llama", *, context: int = 256, **overrides):
    """hidden 64, 2 layers, 4 query heads (2 KV heads where the family has GQA), head_dim 16."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=context,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    if model_type == "opt":
        # init_std: large enough for sharp attention and logits of ~10, so a wrong position or mask shows
        family = dict(ffn_dim=128, init_std=0.3, word_embed_proj_dim=64)
    else:
        family = dict(num_key_value_heads=2, intermediate_size=128, initializer_range=0.3)
    return AutoConfig.for_model(model_type, **(common | family | overrides))


def save_tiny(folder, cfg, *, seed: int = 0, max_shard_size=None) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):  # HF initialises biases to zero, which would hide a dropped one
                p.normal_(0.0, 0.3)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    save_tiny_tokenizer(folder)
    return model


def save_tiny_llama(folder, *, context: int = 256, tie_word_embeddings=False, rope_scaling=None, seed=0, max_shard_size=None) -> PreTrainedModel:
    cfg = tiny_config("llama", context=context, tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling)
    return save_tiny(folder, cfg, seed=seed, max_shard_size=max_shard_size)


@pytest.fixture(scope="module", autouse=True)  # import it into a test module to use it
def one_torch_thread():
    """Tiny matmuls run faster on one thread, above all on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_gguf(path, hf: PreTrainedModel) -> None:
    """`hf`'s weights as an F32 GGUF file laid out as llama.cpp's converter writes them (q/k rows
    interleaved for llama and mistral), with a BPE tokenizer of VOCAB whole-word tokens and no merges."""
    import gguf

    cfg, arch = hf.config, hf.config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, t in hf.state_dict().items():
        w = t.float().numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(name.split(".")[-2])
        if arch in ("llama", "mistral") and heads:  # llama.cpp's rotary layout: each head's two halves interleaved
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
