"""Reading the usage log of a ledger, oldest first, a page at a time (``tb replay``,
``tb report --shadow``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tb_plugins.core.usage import UsageRecord
    from tb_plugins.ledger import Ledger

__all__ = ["PAGE", "iter_records"]

PAGE = 20_000
"""Records read from the ledger per query."""


def iter_records(
    ledger: Ledger,
    *,
    since: float | None = None,
    until: float | None = None,
    page: int = PAGE,
) -> Iterator[UsageRecord]:
    """Every usage record of ``ledger`` from ``since`` (inclusive) to ``until`` (exclusive),
    oldest first, read ``page`` at a time: each query starts at the last ``ts`` read and skips
    the records of that ``ts`` already given (a page full of one instant is read again,
    twice as large)."""
    cursor, skip, size = since, 0, page
    while True:
        rows = ledger.records(since=cursor, until=until, limit=size)
        if len(rows) <= skip:
            if len(rows) < size:
                return
            size *= 2  # more records of one instant than a page holds
            continue
        yield from rows[skip:]
        if len(rows) < size:
            return
        last = rows[-1].ts
        same = 0
        for r in reversed(rows):
            if r.ts != last:
                break
            same += 1
        cursor, skip, size = last, same, page
