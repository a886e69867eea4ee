"""Scope names: ``kind:name`` strings, checked once where they enter.

A scope names who is charged. The kind comes from a fixed list (:data:`KNOWN_KINDS`); the name
is any text the application uses, within :data:`MAX_SCOPE_LENGTH` characters and without
control characters, so a scope is stored, matched and reported exactly and can never be
printed as a terminal escape. Whitespace around the whole scope is dropped (``' team:a'`` is
``team:a``), so padding cannot slip a call past a ``team:*`` budget.

Example:
    >>> normalize_scope(" team:search ")
    'team:search'
"""

from __future__ import annotations

import unicodedata

__all__ = ["KNOWN_KINDS", "MAX_SCOPE_LENGTH", "escape_text", "normalize_scope"]

KNOWN_KINDS = (
    "global",
    "org",
    "team",
    "user",
    "key",
    "end_user",
    "feature",
    "chain",
    "agent",
    "run",
    "session",
)
"""The scope kinds tb_plugins knows; a scope of any other kind is refused."""

MAX_SCOPE_LENGTH = 512
"""Longest scope, in characters."""


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def normalize_scope(scope: object) -> str:
    """``scope`` checked and stripped of surrounding whitespace.

    Args:
        scope: ``global`` or ``kind:name`` (a policy's patterns such as ``user:*`` too).

    Raises:
        ValueError: not a string, not ``kind:name``, an unknown kind, too long, or a control
            character (or a lone surrogate) in it.
    """
    if not isinstance(scope, str):
        raise ValueError(f"a scope is a 'kind:name' string, got {scope!r}")
    s = scope.strip()
    if s == "global":
        return s
    if len(s) > MAX_SCOPE_LENGTH:
        raise ValueError(
            f"scope {s[:40]!r}... is {len(s):,} characters, above the maximum of {MAX_SCOPE_LENGTH}"
        )
    if _has_control(s):
        raise ValueError(
            f"scope {s!r} contains a control character or a lone surrogate; scope names are "
            f"printable text"
        )
    kind, sep, name = s.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"a scope is 'global' or 'kind:name' (e.g. 'user:alice'), got {s!r}")
    if kind not in KNOWN_KINDS:
        raise ValueError(f"unknown scope kind {kind!r} in {s!r}; known: {', '.join(KNOWN_KINDS)}")
    if name != name.strip():
        raise ValueError(f"scope {s!r} has whitespace around its name")
    return s


def escape_text(text: str) -> str:
    """``text`` safe to print on a terminal: control characters and lone surrogates written
    as ``\\xNN`` / ``\\uNNNN`` escapes, everything else unchanged.

    Example:
        >>> escape_text("team:a\\x1b[2Jb")
        'team:a\\\\x1b[2Jb'
    """
    if not _has_control(text):
        return text
    out = []
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cs"):
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)
