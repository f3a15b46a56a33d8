"""The incremental detokenizer gives exactly the text of decoding the whole output, and stop strings
never reach the caller."""

from __future__ import annotations

import random

import pytest

from fastgen_compile.engine.detokenizer import Detokenizer, TextState


def run(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[TextState, list[str], bool]:
    detok, state, deltas, stopped = Detokenizer(tokenizer), TextState(), [], False
    for n in range(1, len(ids) + 1):
        delta, stopped = detok.update(state, ids[:n], stop, final=n == len(ids))
        deltas.append(delta)
        if stopped:
            break
    return state, deltas, stopped


@pytest.mark.parametrize("seed", range(3))
def test_random_tokens_decode_as_a_whole(hf_tokenizer, seed):
    """Random ids include byte tokens that split UTF-8 characters across tokens."""
    rng = random.Random(seed)
    ids = [rng.randrange(hf_tokenizer.vocab_size) for _ in range(300)]
    state, deltas, _ = run(hf_tokenizer, ids)
    assert state.text == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == state.text


def test_multibyte_text_streams_whole_characters(hf_tokenizer):
    text = "Grüße aus Köln: 東京タワー 🚀🚀 naïve café, 1 € and ½."
    ids = hf_tokenizer.encode(text)
    state, deltas, _ = run(hf_tokenizer, ids)
    assert state.text == hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas), "a delta held half a character"


def test_special_tokens_are_skipped(hf_tokenizer):
    ids = hf_tokenizer.encode("Hello there.") + [hf_tokenizer.eos_token_id] + hf_tokenizer.encode(" More.")
    state, _, _ = run(hf_tokenizer, ids)
    assert state.text == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_is_cut_and_never_emitted(hf_tokenizer):
    ids = hf_tokenizer.encode("The answer is forty-two. END of story, and more after it.")
    state, deltas, stopped = run(hf_tokenizer, ids, stop=("END", "zzz"))
    assert stopped and state.text == "The answer is forty-two. "
    assert "".join(deltas) == state.text
    assert all("E" not in d for d in deltas), "the stop string's start was emitted before it was whole"
