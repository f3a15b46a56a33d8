"""A request's output text as its tokens arrive: incremental detokenization, stop strings, and
the hold-back that keeps a stop string's first characters from reaching the caller.

Decoding the whole output on every token costs O(length) per token, O(length^2) per request.
Here each token decodes only a short window: the tokens since the last point where the text
was whole (no partial UTF-8 character), with the tokens of the previous emission before them so
that tokenizers that drop a leading space at the start of a decode (SentencePiece) still get
the space right. For byte-level tokenizers the result equals decoding the whole output.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTIAL = "\ufffd"  # what a decode shows for the bytes of an incomplete UTF-8 character


@dataclass
class TextState:
    text: str = ""  # detokenized output, cut before any stop string
    num_emitted: int = 0  # characters of text already handed to the caller
    prefix_offset: int = 0  # the window decoded for the next token starts here
    read_offset: int = 0  # tokens before this are in text


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, state: TextState, token_ids: list[int], stop: tuple[str, ...], final: bool) -> tuple[str, bool]:
        """Bring state.text up to token_ids (the whole output so far). Returns the text to hand
        out now, and whether a stop string ended the text (it and what follows are cut)."""
        prefix = self._decode(token_ids[state.prefix_offset : state.read_offset])
        window = self._decode(token_ids[state.prefix_offset :])
        # a window ending in a partial character waits for the next token, unless this is the end
        if len(window) > len(prefix) and (final or not window.endswith(PARTIAL)):
            state.text += window[len(prefix) :]
            state.prefix_offset, state.read_offset = state.read_offset, len(token_ids)
        stopped = False
        hits = [i for s in stop if (i := state.text.find(s, state.num_emitted)) >= 0]
        if hits:  # the emitted text holds no stop string (see hold)
            state.text, stopped = state.text[: min(hits)], True
        # until the end, hold back what could still become the start of a stop string
        hold = 0 if final or stopped or not stop else max(map(len, stop)) - 1
        emit_to = max(state.num_emitted, len(state.text) - hold)
        delta, state.num_emitted = state.text[state.num_emitted : emit_to], emit_to
        return delta, stopped
