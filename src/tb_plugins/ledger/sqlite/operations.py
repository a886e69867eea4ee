"""The SQLite ledger's operations, each one flow of one transaction.

A flow yields one :data:`Step`, ``(mode, fn)``: a function of a connection that
:class:`~tb_plugins.ledger.sqlite.ledger.SQLiteLedger` runs in one transaction, blocking or
from an event loop, and sends back what it returned.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.ledger.base import GroupBy
from tb_plugins.ledger.checks import (
    distinct_lines,
    distinct_watch,
    record_from_row,
    spread,
    usage_rows,
)
from tb_plugins.ledger.flow import Flow, FlowLedger, Report, Reserve, Settle
from tb_plugins.ledger.sqlite import schema as sql
from tb_plugins.ledger.sqlite.codec import ANY_HOLD, read_states, record_row, write_rows

__all__ = ["READ", "REPORT", "WRITE", "Mode", "SQLiteOperations", "Step"]

PRUNE_EVERY = 600.0  # seconds of ledger time between two prunes of dead counters and alerts
PRUNE_GRACE = 86_400.0  # a counter or alert is deleted this long after it stopped being read


class Mode(NamedTuple):
    """How the transaction of a step runs."""

    write: bool
    """``BEGIN IMMEDIATE`` (a writer) or ``BEGIN`` (a reader, which never waits in WAL mode)."""
    inline: bool
    """Called from an event loop: at once on the loop's thread when the file is free (a short
    transaction), or else always in a worker thread (a report, which may read much)."""


WRITE = Mode(write=True, inline=True)
READ = Mode(write=False, inline=True)
REPORT = Mode(write=False, inline=False)

Step = tuple[Mode, Callable[[sqlite3.Connection], Any]]
"""The one step of a SQLite flow: ``fn(connection)`` in one transaction run in ``mode``."""


def _fits(line: Line, state: LineState, amounts: Amounts) -> bool:
    # A line already past its limit refuses even a zero amount: the comparison is strict.
    for unit, limit in enumerate(line.limits):
        if limit is not None and state.spent[unit] + state.held[unit] + amounts[unit] > limit:
            return False
    return True


def _merge_usage(
    rows: list[Any], nul_rows: list[Any], group_by: GroupBy, scope: str | None
) -> list[UsageRow]:
    """Report rows from the two usage queries: ``rows`` (key, sums) as they are, plus
    ``nul_rows`` (key, scope list as JSON, sums) split and filtered here."""
    if not nul_rows:
        return usage_rows(rows)
    totals: dict[str, list[Any]] = {str(r[0]): list(r[1:]) for r in rows}
    for key, scopes, *sums in nul_rows:
        path = json.loads(scopes)
        if scope is not None and scope not in path:
            continue
        for k in dict.fromkeys(path) if group_by == "scope" else (key,):
            total = totals.setdefault(k, [0, 0, 0, 0, 0, 0.0, 0, 0])
            for i, v in enumerate(sums):
                total[i] += v or 0
    return usage_rows((k, *v) for k, v in totals.items())


class SQLiteOperations(FlowLedger):
    """The operations of :class:`~tb_plugins.ledger.sqlite.ledger.SQLiteLedger`, as flows."""

    _next_prune: float

    # -- the atomic operations -----------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        unique, index = distinct_lines(op.lines)  # a line given twice holds once
        reservation_id, amounts = op.reservation_id, op.amounts

        def tx(conn: sqlite3.Connection) -> ReserveResult:
            # With no call in flight anywhere there are no holds to read or to replace.
            held = conn.execute(ANY_HOLD).fetchone() is not None
            states = read_states(
                conn, unique, op.now, exclude=reservation_id, limited_only=True, held=held
            )
            ok = all(_fits(line, st, amounts) for line, st in zip(unique, states, strict=True))
            if ok:
                if held:
                    conn.execute(sql.DELETE_HOLDS, (reservation_id,))
                rows = [(reservation_id, ln.key, ln.bucket, *amounts, op.expires_at)
                        for ln in unique]  # fmt: skip
                write_rows(conn, sql.INSERT_HOLDS, sql.HOLD_ROW, rows)
            return ReserveResult(ok=ok, states=spread(states, index))

        result: ReserveResult = yield WRITE, tx
        return result

    def _settle(self, op: Settle) -> Flow[SettleResult]:
        unique, index = distinct_lines(op.lines)  # a line given twice is charged once
        watch = distinct_watch(op.watch, index)
        watched = range(len(unique)) if watch is None else sorted(set(watch))
        reservation_id, now = op.reservation_id, op.now

        def after(conn: sqlite3.Connection) -> tuple[LineState | None, ...]:
            # Alerts read settled spend only: the holds are left out (they read 0).
            read = read_states(
                conn, [unique[i] for i in watched], now, limited_only=True, held=False
            )
            states: list[LineState | None] = [None] * len(unique)
            for i, state in zip(watched, read, strict=True):
                states[i] = state
            return spread(states, index)

        def tx(conn: sqlite3.Connection) -> SettleResult:
            cur = conn.execute(sql.INSERT_USAGE, (reservation_id, *record_row(op.record)))
            if cur.rowcount == 0:
                return SettleResult(applied=False, states=after(conn))
            conn.execute(sql.DELETE_HOLDS, (reservation_id,))
            rows = [(ln.key, ln.bucket, ln.scope, ln.window, *op.amounts, ln.expires_at)
                    for ln in unique]  # fmt: skip
            write_rows(conn, sql.UPSERT_COUNTERS, sql.COUNTER_ROW, rows, sql.ON_COUNTER)
            if now >= self._next_prune:
                for statement in sql.PRUNE:
                    conn.execute(statement, (now - PRUNE_GRACE,))
                conn.execute(sql.PURGE_HOLDS, (now,))
                self._next_prune = now + PRUNE_EVERY
            return SettleResult(applied=True, states=after(conn))

        result: SettleResult = yield WRITE, tx
        return result

    def _release(self, reservation_id: str, now: float) -> Flow[bool]:

        def tx(conn: sqlite3.Connection) -> bool:
            live = conn.execute(sql.DELETE_LIVE_HOLDS, (reservation_id, now)).rowcount
            conn.execute(sql.DELETE_HOLDS, (reservation_id,))
            return live > 0

        released: bool = yield WRITE, tx
        return released

    def _status(self, lines: Sequence[Line], now: float) -> Flow[tuple[LineState, ...]]:
        """One snapshot (a read never waits for writers in WAL mode)."""
        states: tuple[LineState, ...] = yield READ, lambda conn: read_states(conn, lines, now)
        return states

    # -- bookkeeping ---------------------------------------------------------------------------

    def _scopes(self) -> Flow[list[tuple[str, str]]]:
        rows = yield REPORT, lambda conn: conn.execute(sql.SCOPES).fetchall()
        return [(str(scope), str(window)) for scope, window in rows]

    def _claim_alert(self, alert_key: str, expires_at: float | None) -> Flow[bool]:
        """The row is pruned once long expired."""
        claimed: bool = yield (
            WRITE,
            lambda conn: conn.execute(sql.CLAIM_ALERT, (alert_key, expires_at)).rowcount > 0,
        )
        return claimed

    def _append_override(self, body: str) -> Flow[int]:
        version: int = yield (
            WRITE,
            lambda conn: conn.execute(sql.APPEND_OVERRIDE, (body,)).fetchone()[0],
        )
        return version

    def _overrides(self, after: int) -> Flow[list[tuple[int, str]]]:
        rows = yield READ, lambda conn: conn.execute(sql.OVERRIDES, (after,)).fetchall()
        return [(int(v), str(b)) for v, b in rows]

    def _append_usage(self, record: UsageRecord) -> Flow[None]:
        yield WRITE, lambda conn: conn.execute(sql.INSERT_USAGE, (None, *record_row(record)))

    def _usage(self, report: Report) -> Flow[list[UsageRow]]:
        queries = sql.USAGE[report.group_by]
        params = {"since": report.since, "until": report.until, "scope": report.scope}

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            return (
                conn.execute(queries[0], params).fetchall(),
                conn.execute(queries[1], params).fetchall(),
            )

        rows, nul_rows = yield REPORT, read
        return _merge_usage(rows, nul_rows, report.group_by, report.scope)

    def _records(
        self, since: float | None, until: float | None, limit: int | None
    ) -> Flow[list[UsageRecord]]:
        params = {"since": since, "until": until, "limit": -1 if limit is None else limit}
        rows = yield REPORT, lambda conn: conn.execute(sql.RECORDS, params).fetchall()
        return [record_from_row(r) for r in rows]
