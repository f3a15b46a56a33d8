"""A tiny random Llama folder (safetensors + a word-level tokenizer) for fast, exact tests."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 512


def save_tiny_tokenizer(folder) -> None:
    """A word-level tokenizer over the whole tiny vocab: "w5 w17" -> [5, 17]; 0 unk, 1 bos, 2 eos."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def save_tiny_llama(
    folder, *, context: int = 256, tie_word_embeddings=False, rope_scaling=None, seed=0, max_shard_size=None
) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=context,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        initializer_range=0.3,  # large enough for sharp attention and logits of ~10: a wrong position or mask shows
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    save_tiny_tokenizer(folder)
    return model


@pytest.fixture(scope="module", autouse=True)  # import it into a test module to use it
def one_torch_thread():
    """Tiny matmuls run faster on one thread, above all on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
