"""The SQLite ledger's speed tricks: how line states are read and rows are written.

Each is justified by ``benchmarks/bench_ledger.py`` (reserve + settle per second on a SQLite
file and on ``memory://``) and the ``sqlite`` rows of ``benchmarks/bench_guard.py``:

* the states of a call's lines are one compound ``SELECT`` (one aggregate per line and table,
  each a range of a primary key), not a statement per line;
* a reserve sums only the units a line limits (:func:`read_states` ``limited_only``): a rolling
  window's sixty sub-buckets cost a sixth as much for a budget on tokens alone;
* with no hold anywhere (no call in flight), the holds are not read at all;
* rows are written with one multi-row ``INSERT`` per 500, not ``executemany``;
* a record's scope list is encoded as JSON once per distinct path (cached).
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from tb_plugins.core.usage import UNITS, ZERO, UsageRecord
from tb_plugins.ledger.base import Line, LineState
from tb_plugins.ledger.checks import json_text

__all__ = ["ANY_HOLD", "read_states", "record_row", "write_rows"]

# One aggregate per line and table, each a range search of the primary key (the holds of a
# line are a prefix of theirs): no join and no temporary b-tree, so the cost is the rows summed.
# Settled spend counts in the buckets lo..hi; a hold counts in bucket hi on a line that sums one
# bucket (calendar, total), and whatever its bucket on a rolling line (lo < hi): a call may run
# longer than the window, and its hold must count until it is settled, released or expired.
_SPENT = "SELECT {i}, 0, {sums} FROM counters WHERE key = ?{k} AND bucket BETWEEN ?{lo} AND ?{hi}"
_HELD = (
    "SELECT {i}, 1, {sums} FROM holds WHERE key = ?{k}"
    " AND (?{lo} < ?{hi} OR bucket BETWEEN ?{lo} AND ?{hi})"
    " AND expires_at > ?{now} AND reservation_id IS NOT ?{exclude}"
)
ANY_HOLD = "SELECT 1 FROM holds LIMIT 1"
_STATES_CHUNK = 100  # lines per statement (SQLite allows 500 terms in one compound SELECT)
_ALL_UNITS = (1 << len(UNITS)) - 1


@functools.lru_cache(maxsize=1024)
def _limited(limits: tuple[int | None, ...]) -> int:
    """The bit mask of the units a line's ``limits`` limit."""
    mask = 0
    for unit, limit in enumerate(limits):
        if limit is not None:
            mask |= 1 << unit
    return mask


@functools.lru_cache(maxsize=256)
def _line_states_sql(masks: tuple[int, ...], held: bool = True) -> str:
    """Spent and held of one line per mask in one statement: parameters are (key, lowest
    bucket, bucket) per line, then now and the reservation id whose holds are left out. A
    rolling line (lowest bucket < bucket) counts every live hold, whatever its bucket.

    A line sums only the units of its mask (the others read 0): a check needs no more.
    ``held=False`` leaves the holds out (the caller saw there are none), and with them the
    last two parameters.
    """
    n = len(masks)
    parts = []
    for i, mask in enumerate(masks):
        sums = ", ".join(
            f"coalesce(sum({u}), 0)" if mask >> bit & 1 else "0" for bit, u in enumerate(UNITS)
        )
        k, lo, hi = 3 * i + 1, 3 * i + 2, 3 * i + 3
        parts.append(_SPENT.format(i=i, sums=sums, k=k, lo=lo, hi=hi))
        if held:
            parts.append(_HELD.format(i=i, sums=sums, k=k, lo=lo, hi=hi, now=3 * n + 1,
                                      exclude=3 * n + 2))  # fmt: skip
    return "\nUNION ALL ".join(parts)


def read_states(
    conn: sqlite3.Connection,
    lines: Sequence[Line],
    now: float,
    exclude: str | None = None,
    *,
    limited_only: bool = False,
    held: bool | None = None,
) -> tuple[LineState, ...]:
    """Spent and held per line; ``limited_only``: units a line does not limit read 0.

    ``held``: whether any hold may exist (False: the holds are not read and read 0;
    None: look first).
    """
    sums = [[ZERO, ZERO] for _ in lines]
    any_held = held
    for start in range(0, len(lines), _STATES_CHUNK):
        chunk = lines[start : start + _STATES_CHUNK]
        params: list[Any] = []
        for line in chunk:
            params += (line.key, line.lowest_bucket, line.bucket)
        if limited_only:
            masks = tuple([_limited(line.limits) for line in chunk])
        else:
            masks = (_ALL_UNITS,) * len(chunk)
        if any_held is None:  # with no call in flight anywhere, holds need no reading
            any_held = conn.execute(ANY_HOLD).fetchone() is not None
        if any_held:
            params += (now, exclude)
        for row in conn.execute(_line_states_sql(masks, any_held), params):
            sums[start + row[0]][row[1]] = row[2:]  # six integers: coalesce(sum(...), 0)
    return tuple(LineState(spent=spent, held=held) for spent, held in sums)


_ROWS_CHUNK = 500  # rows per statement (SQLite binds at most 32,766 parameters)


@functools.lru_cache(maxsize=64)
def _rows_sql(head: str, row: str, n: int, tail: str) -> str:
    return head + ", ".join([row] * n) + tail


def write_rows(
    conn: sqlite3.Connection, head: str, row: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    """Write ``rows`` with one statement per 500 (cheaper than ``executemany``)."""
    for start in range(0, len(rows), _ROWS_CHUNK):
        chunk = rows[start : start + _ROWS_CHUNK]
        conn.execute(_rows_sql(head, row, len(chunk), tail), [v for r in chunk for v in r])


@functools.lru_cache(maxsize=1024)
def _scopes_json(scopes: tuple[str, ...]) -> str:
    """A record's scopes as a JSON list, each once (a report counts a record once per scope)."""
    return json.dumps(list(dict.fromkeys(scopes)), ensure_ascii=False)


def record_row(r: UsageRecord) -> tuple[Any, ...]:
    """The usage log's columns of a record (``RECORD_COLUMNS``, after ``settled_id``)."""
    return (
        r.ts, r.reservation_id, _scopes_json(r.scopes), r.model,
        r.requested_model, r.action, r.input_tokens, r.output_tokens, r.cached_input_tokens,
        float(r.usd), int(r.priced), int(r.estimated),
        json_text(r.extra) if r.extra else "{}",
    )  # fmt: skip
