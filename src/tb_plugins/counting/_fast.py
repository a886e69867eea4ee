"""The speed tricks of token counting, kept here so the other modules read plainly.

``benchmarks/bench_counting.py`` is what justifies each of them (its figures are in a comment
there and in ``benchmarks/README.md``):

* :func:`buffer_counter` counts with tiktoken's private buffer API, so no Python list of
  token ids is built (the benchmark's "first-seen prompt");
* :func:`freeze` makes a message's cache key without ``json.dumps``, and :func:`copy_json`
  snapshots a history without ``copy.deepcopy`` (the benchmark's "agent loop", where a
  history seen before costs one lookup per message).

None of them changes a count: the buffer counter is checked against ``encode_ordinary`` when
an encoding is loaded (and not used if they disagree), and the frozen key of a value is equal
to another's only if the two render the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

__all__ = ["Unhashable", "buffer_counter", "copy_json", "freeze"]

_NO_SPECIAL: frozenset[str] = frozenset()
_PROBE = "Budget ledger, 1,234 tokens: héllo 世界 <|endoftext|>  \n\tdone."


def buffer_counter(encoding: tiktoken.Encoding) -> Callable[[str], int] | None:
    """A counter that never builds the list of token ids, or None if this tiktoken has none.

    tiktoken's core can encode into a buffer of 32-bit ids; its size is the count, and no
    Python int is made per token. With no special token allowed it is exactly
    ``encode_ordinary``: checked on a probe text here, else the counter is not used.
    """
    core = getattr(encoding, "_core_bpe", None)
    to_buffer = getattr(core, "encode_to_tiktoken_buffer", None)
    if to_buffer is None:
        return None

    def count(text: str) -> int:
        return memoryview(to_buffer(text, _NO_SPECIAL)).nbytes >> 2

    try:
        if count(_PROBE) != len(encoding.encode_ordinary(_PROBE)):
            return None
    except Exception:  # a private API: any surprise means "do not use it"
        return None
    return count


class Unhashable(Exception):
    """Raised by :func:`freeze` for a value that is not JSON-like data."""


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})


def freeze(value: object) -> Hashable:
    """A hashable twin of JSON-like data: exact, and cheaper than ``json.dumps``.

    Raises:
        Unhashable: ``value`` holds something other than strings, numbers, booleans, None,
            mappings, lists and tuples.

    Example:
        >>> freeze({"a": [1, "x"]}) == freeze({"a": [1, "x"]}) != freeze({"a": [1.0, "x"]})
        True
    """
    if type(value) is str:
        return value
    if type(value) is dict:
        return ("{", *[(k, v if type(v) is str else freeze(v)) for k, v in value.items()])
    if type(value) is list or type(value) is tuple:
        return ("[", *[v if type(v) is str else freeze(v) for v in value])
    if type(value) in _SCALAR_TYPES:
        # Tagged: 1, 1.0 and True are equal as keys but render differently.
        return (type(value).__name__, value)
    if isinstance(value, Mapping):
        return ("{", *[(k, freeze(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return ("[", *[freeze(v) for v in value])
    raise Unhashable


_ATOMS = frozenset({str, int, float, bool, type(None)})


def copy_json(value: Any) -> Any:
    """A deep copy of JSON-like data, cheaper than ``copy.deepcopy`` (which it falls back on).

    Example:
        >>> original = {"content": [{"type": "text", "text": "hi"}]}
        >>> twin = copy_json(original)
        >>> twin == original and twin["content"] is not original["content"]
        True
    """
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {k: v if type(v) in _ATOMS else copy_json(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _ATOMS else copy_json(v) for v in value]
    return copy.deepcopy(value)
