"""An upper bound of a request's input tokens that encodes nothing.

Every OpenAI encoding tiktoken ships (o200k_base, cl100k_base, p50k_base, r50k_base) is a
byte-level BPE: each token covers at least one UTF-8 byte of the text, so a text has at most
as many tokens as bytes. :class:`ByteBound` counts each text that way, and the bound runs
the very chat-format rules of :mod:`~tb_plugins.counting.messages` with it (per-message
overhead, names, tool calls, tool definitions with their constants, media by their rules),
so every part of the exact count is matched by a part that is at least as large. Models
counted approximately (a cl100k_base count times the approximation margin) and the byte
estimate used without a tokenizer (bytes / 3, times the margin) are covered by multiplying
the bound by the margin whenever it is above 1, unless the model's own tiktoken encoding is
already loaded (then its count is exact and carries no margin).

The bound is what the guard estimates with first (``estimate: {input: bound_first}``): far
from every limit it decides the call with no tokenizer pass; wherever the exact count could
change the decision it counts exactly and decides again (:mod:`tb_plugins.engine.flows`).
``tests/test_bound.py`` checks bound >= exact over random unicode, for every family.

Example:
    >>> from tb_plugins.counting import TokenCounter
    >>> counter = TokenCounter()
    >>> messages = [{"role": "user", "content": "Hello, world!"}]
    >>> counter.bound_messages("gpt-4o", messages) >= counter.count_messages("gpt-4o", messages)
    True
"""

from __future__ import annotations

import math

__all__ = ["BYTE_BOUND", "ByteBound", "scaled"]


class ByteBound:
    """Counts a text as its UTF-8 bytes (lone surrogates as the 3 bytes they would take)."""

    __slots__ = ()
    name = "utf8-bytes-bound"

    def count(self, text: str) -> int:
        """The UTF-8 length of ``text``: at least its tokens in any byte-level BPE."""
        if text.isascii():
            return len(text)
        return len(text.encode("utf-8", "surrogatepass"))


BYTE_BOUND = ByteBound()


def scaled(raw: int, factor: float) -> int:
    """``raw`` times ``factor`` (when above 1), rounded up as the counter rounds its margin."""
    if factor <= 1:
        return raw
    return math.ceil(round(raw * factor, 6))
