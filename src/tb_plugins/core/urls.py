"""Ledger and webhook URLs as they may be shown: never with a password."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password, if any, written as ``***``: the one in the user info and a
    ``password=`` query parameter.

    Example:
        >>> redact_url("postgresql://u:secret@h/db")
        'postgresql://u:***@h/db'
        >>> redact_url("redis://:secret@h:6379/0?password=secret")
        'redis://:***@h:6379/0?password=***'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The user info ends at the last "@" before the query: a password may hold an unescaped
    # "/" or "@", and over-hiding beats printing part of a password.
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at > 0 and not rest.startswith("/") and ":" in rest[:at]:
        user = rest[:at].partition(":")[0]
        rest = f"{user}:***{rest[at:]}"
    return f"{scheme}://" + _QUERY_PASSWORD.sub(r"\1***", rest)
