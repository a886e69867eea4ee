"""The PostgreSQL ledger's operations, each one flow: its checks, its statement's parameters,
the reading of the reply.

Each operation is one statement, most of them one call of a PL/pgSQL function of
``schema.sql`` (one round trip, one transaction). A flow yields the statement as steps
``(target, method, args, kwargs)`` (``conn.execute(...)``, then ``cursor.fetchone()``);
:class:`~tb_plugins.ledger.postgres.ledger.PostgresLedger` runs them on a pooled connection,
blocking or awaited.
"""

from __future__ import annotations

import abc
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.errors import LedgerError
from tb_plugins.ledger.base import GroupBy
from tb_plugins.ledger.checks import (
    RECORD_COLUMNS,
    distinct_lines,
    out_of_range,
    record_from_row,
    usage_rows,
)
from tb_plugins.ledger.flow import Flow, Report, Reserve, Settle
from tb_plugins.ledger.network import NetworkLedger, split_line_key
from tb_plugins.ledger.postgres import codec

__all__ = ["PostgresOperations", "call", "fetchall", "fetchone"]

T = TypeVar("T")

PRUNE_EVERY = 600.0  # seconds of ledger time between two prunes (per process)
PRUNE_GRACE = 86_400.0  # a counter, hold or alert is deleted this long after it stopped counting
PRUNE_BATCH = 10_000
_ADD_ATTEMPTS = 4  # calls of a write that finds a line missing (a prune may race the insert)

# -- the statements (most a call of a function of schema.sql) ------------------------------------

# Parameters go in binary (%b), packed by the codec; every parameter has a fixed type, so each
# statement keeps one server-side prepared plan.
_RESERVE = (
    "SELECT array_send(tb_reserve2(%b::bytea, %b::bytea[], %b::int8[], %b::int8[], "
    "%b::int8[], %b::int8[], %b::float8, %b::float8))"
)
_RECORD_ARGS = (
    "%b::float8, %b::text, %b::text, %b::text, %b::text, %b::text, %b::int8, %b::int8, "
    "%b::int8, %b::float8, %b::bool, %b::bool, %b::text, %b::bytea[], %b::text[]"
)
_SETTLE = (
    "SELECT array_send(tb_settle2(%b::bytea, %b::bytea[], %b::int8[], %b::int8[], "
    f"%b::float8[], %b::int8[], %b::float8, %b::int4[], {_RECORD_ARGS}, %b::bytea))"
)
_ADD_LINES = "SELECT tb_add_lines(%b::bytea[], %b::text[])"
_LOG = f"SELECT tb_log(NULL::bytea, {_RECORD_ARGS})"
_RELEASE = "SELECT tb_release2(%b::bytea, %b::float8)"
_FORGET = "SELECT tb_release2(h, %b::float8) FROM unnest(%b::bytea[]) AS t(h)"
_STATUS = (
    "SELECT array_send(tb_states2(%b::bytea[], %b::int8[], %b::int8[], %b::float8, %b::int4[]))"
)
_PRUNE = "SELECT tb_prune(%s::float8, %s::float8, %s::int4)"
_CLAIM_ALERT = (
    "INSERT INTO alerts (key_hash, key, expires_at) VALUES (%s, %s, %s) "
    "ON CONFLICT (key_hash) DO NOTHING RETURNING 1"
)
_SCOPES = (
    "SELECT key FROM lines AS l "
    "WHERE EXISTS (SELECT 1 FROM counters AS c WHERE c.key_hash = l.key_hash)"
)
_APPEND_OVERRIDE = "SELECT tb_append_override(%s)"
_OVERRIDES = "SELECT version, body FROM overrides WHERE version > %s ORDER BY version"
_SERVER_TIME = "SELECT extract(epoch FROM clock_timestamp())::float8"
_PING = "SELECT 1"
_RECORDS = f"""
SELECT {RECORD_COLUMNS} FROM usage
 WHERE (%(since)s::float8 IS NULL OR ts >= %(since)s::float8)
   AND (%(until)s::float8 IS NULL OR ts < %(until)s::float8)
 ORDER BY ts, id LIMIT %(limit)s::int8
"""
_USAGE_TEMPLATE = """
SELECT {key} AS k,
       count(*) FILTER (WHERE u.action <> 'deny'),
       count(*) FILTER (WHERE u.action = 'deny'),
       coalesce(sum(u.input_tokens) FILTER (WHERE u.action <> 'deny'), 0),
       coalesce(sum(u.output_tokens) FILTER (WHERE u.action <> 'deny'), 0),
       coalesce(sum(u.cached_input_tokens) FILTER (WHERE u.action <> 'deny'), 0),
       coalesce(sum(u.usd) FILTER (WHERE u.action <> 'deny'), 0),
       count(*) FILTER (WHERE u.action = 'clamp'),
       count(*) FILTER (WHERE u.action = 'downgrade')
  FROM usage AS u {join}
 WHERE (%(since)s::float8 IS NULL OR u.ts >= %(since)s::float8)
   AND (%(until)s::float8 IS NULL OR u.ts < %(until)s::float8)
   AND (%(scope)s::bytea IS NULL OR EXISTS
        (SELECT 1 FROM usage_scopes AS f WHERE f.usage_id = u.id AND f.scope_hash = %(scope)s))
 GROUP BY k
"""
_USAGE: dict[str, str] = {
    "scope": _USAGE_TEMPLATE.format(
        key="s.scope", join="JOIN usage_scopes AS s ON s.usage_id = u.id"
    ),
    "model": _USAGE_TEMPLATE.format(key="u.model", join=""),
    "day": _USAGE_TEMPLATE.format(
        key="to_char(to_timestamp(u.ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')", join=""
    ),
}

# -- the steps ---------------------------------------------------------------------------------


def call(target: Any, method: str, *args: Any, **kwargs: Any) -> Flow[Any]:
    """One step: ``target.method(*args, **kwargs)``, awaited by the async executor."""
    return (yield (target, method, args, kwargs))


def fetchone(conn: Any, sql: Any, params: Any = (), *, binary: bool = False) -> Flow[Any]:
    """One statement on ``conn``; its first row (None: no row)."""
    cursor = yield from call(conn, "execute", sql, params, binary=binary)
    return (yield from call(cursor, "fetchone"))


def fetchall(conn: Any, sql: Any, params: Any = ()) -> Flow[list[Any]]:
    """One statement on ``conn``; its rows."""
    cursor = yield from call(conn, "execute", sql, params)
    rows: list[Any] = yield from call(cursor, "fetchall")
    return rows


def _picked(index: Sequence[int], watch: Sequence[int] | None) -> list[int]:
    """The distinct lines (indexes among them) whose states a settle reads back: those of the
    ``watch`` lines, or all when ``watch`` is None."""
    if watch is None:
        return sorted(set(index))
    return sorted({index[i] for i in watch})


def _usage_rows(rows: Sequence[Sequence[Any]], group_by: GroupBy) -> list[UsageRow]:
    if group_by == "scope":  # scope names are stored percent-escaped
        return usage_rows((unquote(str(r[0])), *r[1:]) for r in rows)
    if group_by == "model":
        return usage_rows((codec.from_text(r[0]), *r[1:]) for r in rows)
    return usage_rows(rows)


class PostgresOperations(NetworkLedger):
    """The operations of :class:`~tb_plugins.ledger.postgres.ledger.PostgresLedger`, as
    flows."""

    kind = "PostgreSQL"
    _next_prune: float

    @abc.abstractmethod
    def _session(self, body: Callable[[Any], Flow[T]], *, cleanup: bool = True) -> Flow[T]:
        """``body(connection)`` on a pooled connection, errors wrapped; then (``cleanup``)
        the release of orphaned holds."""

    def _fetch(self, sql: str, params: Any = (), *, binary: bool = False) -> Flow[Any]:
        """One statement; the first column of its first row (None: no row)."""
        row = yield from self._session(lambda conn: fetchone(conn, sql, params, binary=binary))
        return None if row is None else row[0]

    def _write(self, sql: str, args: Sequence[Any], lines: Sequence[Line]) -> Flow[tuple[int, ...]]:
        """tb_reserve2 or tb_settle2, and its integers; when it answers that a line is missing
        (-1), the lines are added in a transaction of their own and the call made again."""

        def body(conn: Any) -> Flow[tuple[int, ...]]:
            for _ in range(_ADD_ATTEMPTS):
                row = yield from fetchone(conn, sql, args, binary=True)
                values = codec.int8_values(row[0])
                if values[0] != -1:
                    return values
                yield from call(conn, "execute", _ADD_LINES, (args[1], codec.keys(lines)))
            raise LedgerError(f"PostgreSQL ledger at {self.where}: lines keep vanishing")

        return self._session(body)

    # -- statement parameters ------------------------------------------------------------------

    @staticmethod
    def _reserve_args(
        reservation_id: str, lines: Sequence[Line], amounts: Amounts, now: float, expires: float
    ) -> tuple[Any, ...]:
        limits = [-1 if lim is None else lim for ln in lines for lim in ln.limits]
        int8s = codec.int8s
        try:
            return (codec.sha(reservation_id), codec.hashes(lines),
                    int8s([ln.bucket for ln in lines]), int8s([ln.lowest_bucket for ln in lines]),
                    int8s(limits, (len(lines), 6)), int8s(amounts), float(now),
                    float(expires))  # fmt: skip
        except (struct.error, OverflowError, TypeError) as exc:
            raise out_of_range("a limit or bucket PostgreSQL cannot take", exc) from exc

    @staticmethod
    def _settle_args(
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        now: float,
        pick: Sequence[int],
    ) -> tuple[Any, ...]:
        """The parameters of one settle call; its last, a random token, names the call, so
        that running it again after a lost reply still answers ``applied``."""
        watch = [codec.I32.pack(i + 1) for i in pick]
        int8s = codec.int8s
        try:
            expires = [None if ln.expires_at is None else codec.F64.pack(ln.expires_at)
                       for ln in lines]  # fmt: skip
            return (codec.sha(reservation_id), codec.hashes(lines),
                    int8s([ln.bucket for ln in lines]), int8s([ln.lowest_bucket for ln in lines]),
                    codec.array(codec.Float8Array, 701, expires), int8s(amounts), float(now),
                    codec.array(codec.Int4Array, 23, watch), *codec.record_args(record),
                    os.urandom(16))  # fmt: skip
        except (struct.error, OverflowError, TypeError) as exc:
            raise out_of_range("a bucket or expiry PostgreSQL cannot take", exc) from exc

    @staticmethod
    def _status_args(lines: Sequence[Line], now: float) -> tuple[Any, ...]:
        pick = [codec.I32.pack(i) for i in range(1, len(lines) + 1)]
        int8s = codec.int8s
        try:
            return (codec.hashes(lines), int8s([ln.lowest_bucket for ln in lines]),
                    int8s([ln.bucket for ln in lines]), float(now),
                    codec.array(codec.Int4Array, 23, pick))  # fmt: skip
        except (struct.error, OverflowError, TypeError) as exc:
            raise out_of_range("a bucket PostgreSQL cannot take", exc) from exc

    # -- the atomic operations -----------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        """One transaction that locks the lines in key-hash order and commits without waiting
        for the WAL flush (a hold is transient)."""
        unique, index = distinct_lines(op.lines)
        args = self._reserve_args(op.reservation_id, unique, op.amounts, op.now, op.expires_at)
        write = self._write(_RESERVE, args, unique)
        values = yield from self._unseen(op.reservation_id, write)
        return ReserveResult(ok=bool(values[0]), states=codec.states(values, 12, index))

    def _settle(self, op: Settle) -> Flow[SettleResult]:
        """Commits synchronously unless the ledger was opened with ``synchronous_commit=off``.
        The call carries a random token: run again on a new connection after its reply was
        lost, it finds the id settled with this same token and still answers
        ``applied=True``; a second ``settle`` call of the id answers ``applied=False``."""
        unique, index = distinct_lines(op.lines)
        pick = _picked(index, op.watch)
        args = self._settle_args(op.reservation_id, unique, op.amounts, op.record, op.now, pick)
        self._adopt(op.reservation_id)
        values = yield from self._write(_SETTLE, args, unique)
        if op.now >= self._next_prune:
            self._next_prune = op.now + PRUNE_EVERY
            yield from self._prune(op.now)
        return SettleResult(applied=bool(values[0]), states=codec.watched(values, index, pick))

    def _release(self, reservation_id: str, now: float) -> Flow[bool]:
        release = self._fetch(_RELEASE, (codec.sha(reservation_id), float(now)))
        return bool((yield from self._unseen(reservation_id, release)))

    def _status(self, lines: Sequence[Line], now: float) -> Flow[tuple[LineState, ...]]:
        unique, index = distinct_lines(lines, by_key=False)
        packed = yield from self._fetch(_STATUS, self._status_args(unique, now), binary=True)
        return codec.states(codec.int8_values(packed), 0, index)

    def _forget(self, reservation_ids: Sequence[str]) -> Flow[object]:
        hashed = codec.array(codec.ByteaArray, 17, [codec.sha(rid) for rid in reservation_ids])
        args = (time.time(), hashed)
        return (yield from self._session(lambda conn: fetchall(conn, _FORGET, args), cleanup=False))

    # -- bookkeeping ---------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Delete holds expired at ``now``, and counters, idle lines and alert claims that
        stopped counting more than a day before; never waits for rows in use. Returns how many
        rows went.

        Runs by itself every ten minutes of ledger time, after a settle; failures are ignored
        (the next prune catches up).
        """
        return self._drive(self._prune(now))

    async def aprune(self, now: float) -> int:
        """Async :meth:`prune`."""
        return await self._adrive(self._prune(now))

    def _prune(self, now: float) -> Flow[int]:
        try:
            return int((yield from self._fetch(_PRUNE, (now, now - PRUNE_GRACE, PRUNE_BATCH))))
        except LedgerError:
            return 0

    def _scopes(self) -> Flow[list[tuple[str, str]]]:
        rows = yield from self._session(lambda conn: fetchall(conn, _SCOPES))
        return sorted(split_line_key(row[0]) for row in rows)

    def _claim_alert(self, alert_key: str, expires_at: float | None) -> Flow[bool]:
        args = (codec.sha(alert_key), codec.to_text(alert_key), expires_at)
        return (yield from self._fetch(_CLAIM_ALERT, args)) is not None

    def _append_override(self, body: str) -> Flow[int]:
        return int((yield from self._fetch(_APPEND_OVERRIDE, (body,))))

    def _overrides(self, after: int) -> Flow[list[tuple[int, str]]]:
        rows = yield from self._session(lambda conn: fetchall(conn, _OVERRIDES, (after,)))
        return [(int(v), str(b)) for v, b in rows]

    def _append_usage(self, record: UsageRecord) -> Flow[None]:
        yield from self._fetch(_LOG, codec.record_args(record))

    def _usage(self, report: Report) -> Flow[list[UsageRow]]:
        scope = report.scope
        scope_hash = None if scope is None else codec.sha(quote(scope, safe=""))
        params = {"since": report.since, "until": report.until, "scope": scope_hash}
        sql = _USAGE[report.group_by]
        rows = yield from self._session(lambda conn: fetchall(conn, sql, params))
        return _usage_rows(rows, report.group_by)

    def _records(
        self, since: float | None, until: float | None, limit: int | None
    ) -> Flow[list[UsageRecord]]:
        params = {"since": since, "until": until, "limit": limit}
        rows = yield from self._session(lambda conn: fetchall(conn, _RECORDS, params))
        return [record_from_row(r, codec.from_text) for r in rows]

    def _server_time(self) -> Flow[float]:
        """The database's clock (``clock_timestamp()``)."""
        return float((yield from self._fetch(_SERVER_TIME)))

    def _ping(self) -> Flow[object]:
        """``SELECT 1``."""
        return (yield from self._fetch(_PING))
