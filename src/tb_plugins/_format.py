"""Text for people: tables, amounts, times, wrapped reasons and ledger URLs without passwords.

Shared by the ``tb`` command and ``tb demo``. Nothing here reads a ledger or a policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from tb_plugins.core.scopes import escape_text
from tb_plugins.core.urls import redact_url

__all__ = [
    "bar",
    "fmt_amount",
    "fmt_clock",
    "fmt_time",
    "hanging",
    "fmt_span",
    "redact_url",
    "table",
    "wrap",
]


def fmt_time(ts: float | None) -> str:
    """An epoch time as ``2026-11-01 08:00 UTC``, or ``never``."""
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def fmt_amount(unit: str, value: float) -> str:
    """An amount of ``unit``: dollars as ``$1.2345``, anything else as ``1,234``."""
    if unit == "usd":
        return f"${value:,.4f}"
    return f"{value:,.0f}"


def fmt_clock(ts: float | None, now: float) -> str:
    """An epoch time, short: ``14:20`` on the UTC day of ``now``, else ``12-09 14:20``;
    ``now`` when it is not after ``now``; ``-`` for None."""
    if ts is None:
        return "-"
    if ts <= now:
        return "now"
    at = datetime.fromtimestamp(ts, tz=timezone.utc)
    today = datetime.fromtimestamp(now, tz=timezone.utc).date()
    return at.strftime("%H:%M" if at.date() == today else "%m-%d %H:%M")


def bar(fraction: float, width: int = 10) -> str:
    """A fraction as an ASCII bar: ``bar(0.3)`` is ``[###-------]`` (full from 1 on)."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def fmt_span(seconds: float) -> str:
    """A time span, short: ``45s``, ``12m``, ``9h40m``, ``23d4h``."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int | None = None
) -> str:
    """A plain text table with aligned columns; control characters in cells are escaped.

    With ``width``, a first-column cell too long for the lines to fit in ``width`` characters
    goes on a line (or lines) of its own above its row, whole; the row starts blank.
    """
    cells = [[escape_text(str(h)) for h in headers]] + [
        [escape_text(str(c)) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    above: dict[int, list[str]] = {}
    if width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        rest = sum(widths[1:]) + 2 * (len(widths) - 1)
        widths[0] = max(width - rest, len(cells[0][0]), 1)
        for n, r in enumerate(cells[1:], 1):
            if len(r[0]) > widths[0]:
                above[n] = [r[0][i : i + width] for i in range(0, len(r[0]), width)]
                r[0] = ""
        widths[0] = max(len(r[0]) for r in cells)
    lines: list[str] = []
    for n, r in enumerate(cells):
        lines.extend(above.get(n, ()))
        lines.append(
            "  ".join(
                c.rjust(w) if n and _numeric(c) else c.ljust(w)
                for c, w in zip(r, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    # an amount or a span ("1,234", "$0.5", "9h40m"), not a time or a limit ("$5/month")
    return bool(text) and (text[0].isdigit() or text[0] == "$") and not any(c in text for c in " /")


# A word, where a quoted name counts as part of the word it stands in, spaces and all.
_WORD = re.compile(r"""(?:'[^']*'|"[^"]*"|\S)+""")


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken only between words.

    A number, a quoted name (``'team:demo 450 tokens/day'``) and any other word stay whole:
    one longer than ``width`` gets a line of its own rather than being cut.

    Example:
        >>> wrap("budget 'team:demo 450 tokens/day' is exhausted: 450 of 450 used", 30)
        ['budget', "'team:demo 450 tokens/day' is", 'exhausted: 450 of 450 used']
    """
    lines: list[str] = []
    line = ""
    for word in _WORD.findall(text):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line or not lines:
        lines.append(line)
    return lines


def hanging(lead: str, text: str, width: int) -> str:
    """``lead`` then ``text`` wrapped (:func:`wrap`) to ``width``, further lines indented by
    as much as ``lead`` (at least 40 columns are left for ``text``).

    Example:
        >>> print(hanging("  deny ", "budget 'team:demo 450 tokens/day' is spent: 450 of 450", 50))
          deny budget 'team:demo 450 tokens/day' is spent:
               450 of 450
    """
    first, *rest = wrap(text, max(width - len(lead), 40))
    return "\n".join([lead + first, *(" " * len(lead) + line for line in rest)])
