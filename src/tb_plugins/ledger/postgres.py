"""The PostgreSQL ledger: one database shared by every host, with the database's durability.

``postgresql://user:password@host:port/dbname`` (or ``postgres://``). Options, in the URL query
or as keywords: ``schema`` (default ``tb_plugins``), ``timeout`` (seconds, default 2),
``pool_min`` and ``pool_max`` (connections per process, default 1 and 4), and
``synchronous_commit`` (see *Durability*). Other query parameters go to libpq unchanged (e.g.
``?sslmode=require&application_name=proxy-1``).

**Atomicity.** Each operation is one call of a PL/pgSQL function (``postgres_schema.sql``):
one round trip, one transaction, one server-side prepared statement. Only a reservation checks
limits, so only reservations must see each other: a reservation first locks the rows of its
lines in ``lines`` with one ``SELECT … ORDER BY key_hash FOR UPDATE``, always in ascending
order of the key's hash, then reads settled spend plus live holds in one snapshot taken after
the locks, checks every limit and holds on every line or on none. Concurrent reservations of a
line therefore queue, never admit more than a limit allows, and never deadlock. A settle or a
release only removes a hold and adds spend, in one transaction that a reservation sees entirely
or not at all, so it takes no line lock: its commit (a WAL flush, for a settle) never holds up
the reservations of its lines. Settles of one line queue on its counter rows, locked in
key-hash order. A line seen for the first time is added by ``INSERT … ON CONFLICT DO NOTHING``
in a short transaction of its own (holding no other lock), then the call is made again. Settle
is idempotent through a unique index on the settled reservation id in the usage log, and reads
back only the lines it is asked to ``watch``. A hold stops counting the moment its
``expires_at`` passes (every read filters on it), so the hold of a process that died returns
after its TTL; expired holds are deleted by a prune that runs every ten minutes.

**Schema.** Created on first use under an advisory lock, inside the schema ``schema`` (created
too), and versioned in its ``meta`` table: a schema of an older version is upgraded in place
(under the same lock; the functions of the older version stay, so processes still running the
older code keep working until they restart), a newer one is refused. Long scope names are found
by the SHA-256 of their text (a btree entry holds at most ~2.7 kB), so a 10 kB scope name works
like a short one. The usage log is indexed by time for reports.

**Durability.** A settle commits synchronously by default: once ``settle`` returns, the spend
survives anything the database survives (a crash, a restart, a failover to a synchronous
replica). A reservation or release commits with ``synchronous_commit = off`` (set for its own
transaction only), and the holds live in an ``UNLOGGED`` table (not written to the WAL, not
replicated): a hold is transient, so a database crash or failover only forgets the holds of the
calls in flight (the calls they admitted still settle their real spend). The synchronous commit
is most of a settle's latency (one WAL flush). A deployment that prefers speed can open the
ledger with ``synchronous_commit=off`` (``?synchronous_commit=off`` or the keyword; ``on``,
``local``, ``remote_write`` and ``remote_apply`` are PostgreSQL's other values): every write of
its sessions, settles included, then returns before its WAL record is flushed, and a crash of
the *database server* (not of a client) may lose the spend settled in the last fraction of a
second before it (up to three times ``wal_writer_delay``, 600 ms by default), like Redis
without ``appendfsync always``. Without the option the server's own setting applies (``on``
unless the DBA changed it).

**Time.** :meth:`PostgresLedger.server_time` is the database's ``clock_timestamp()``, so guards
on hosts with skewed clocks agree on window boundaries.

**Failures.** ``timeout`` bounds waiting for a pooled connection, connecting (libpq's
``connect_timeout``, at least 2 s) and each statement (``statement_timeout``, lock waits
included). libpq has no read timeout of its own, so a call still unanswered after 1.5 times
``timeout`` (a server that stopped, a network that drops packets) has its connection closed
under it by a watchdog thread. A connection found broken (the server restarted, the session was
terminated) is dropped and the call retried at once on another. After a wait for a connection
timed out, calls fail at once for the next second instead of each waiting again. Unreachable,
late or cancelled calls raise :class:`~tb_plugins.errors.LedgerUnavailable` naming
``host:port`` (never the password); other database errors raise
:class:`~tb_plugins.errors.LedgerError`, and so does anything the ledger cannot store (an
amount or sum past ``2**63 - 1``: ``amount out of range``), refused before anything is
written.

A call whose reply was lost may still have committed. A reserve (or release) whose connection
broke or was cut by the watchdog is remembered, and its hold is released right after the
ledger's next successful call (one more round trip then, and only then), so no phantom hold
outlives an outage by more than a call; settling or releasing that id later is harmless. A
settle retried on a new connection carries the same random token as its first run, kept in the
usage log: if that run committed, the retry still answers ``applied``, while a second
``settle`` call of the id answers ``applied=False`` and charges nothing.

**Names.** Scope names are stored percent-escaped and found by hash, so every character
survives. Text columns cannot hold NUL, so the reservation id, model names and action keep it
as U+FDD0 ``"0"`` (a noncharacter, itself doubled), read back exactly.

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("postgresql://tb@db.internal/app?schema=budgets")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from tb_plugins._lazy import require
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.core.windows import parse_duration
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import (
    GroupBy,
    Ledger,
    Line,
    LineState,
    ReserveResult,
    SettleResult,
    check_amounts,
    check_record_amounts,
    check_text,
    check_texts,
    distinct_lines,
    out_of_range,
    usage_rows,
)

__all__ = ["SCHEMA_SQL", "SCHEMA_VERSION", "PostgresLedger"]

T = TypeVar("T")
logger = logging.getLogger("tb_plugins")

SCHEMA_VERSION = 4
SCHEMA_SQL: str = (
    resources.files("tb_plugins.ledger").joinpath("postgres_schema.sql").read_text("utf-8")
)
"""Tables and functions of the ledger, run with ``search_path`` set to the ledger's schema."""

PRUNE_EVERY = 600.0  # seconds of ledger time between two prunes (per process)
PRUNE_GRACE = 86_400.0  # a counter, hold or alert is deleted this long after it stopped counting
PRUNE_BATCH = 10_000
_ADD_ATTEMPTS = 4  # calls of a write that finds a line missing (a prune may race the insert)
BREAKER_SECONDS = 1.0  # after a connection wait timed out, fail at once for this long
WATCHDOG_FACTOR = 1.5  # a call is cut after this many ledger timeouts (see _Watchdog)
_OPTIONS = ("schema", "timeout", "pool_min", "pool_max", "synchronous_commit")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
ORPHANS_MAX = 10_000  # reservation ids kept for a later release (see PostgresLedger._orphan)
ORPHANS_BATCH = 500  # ids released per round trip

# -- the hot path: constant SQL (each a call of a function of postgres_schema.sql) ---------------

# Parameters go in binary (%b). The arrays are packed here in PostgreSQL's binary array format
# (see _array), so neither side parses text and psycopg adapts nothing element by element; the
# states come back as one bytea (array_send) unpacked with one struct call. Every parameter has
# a fixed type, so each statement keeps one server-side prepared plan.
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
_SERVER_TIME = "SELECT extract(epoch FROM clock_timestamp())::float8"
_PING = "SELECT 1"
_RECORD_COLS = (
    "ts, reservation_id, scopes, model, requested_model, action, input_tokens, output_tokens, "
    "cached_input_tokens, usd, priced, estimated, extra"
)
_RECORDS = f"""
SELECT {_RECORD_COLS} FROM usage
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
       coalesce(sum(u.usd) FILTER (WHERE u.action <> 'deny'), 0)
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
_HAS_META = "SELECT to_regclass('meta') IS NOT NULL"
_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
_SET_VERSION = "UPDATE meta SET value = %s WHERE key = 'schema_version'"
_SETUP_LOCK = "SELECT pg_advisory_xact_lock(%s)"

# Pools a forked child inherited: never used, never closed (that would end the parent's
# sessions), and kept referenced so that garbage collection does not touch them either.
_INHERITED: list[Any] = []


class _Watchdog:
    """Closes the socket of a call that outlives its deadline.

    libpq has no read timeout: a server that stops answering (stopped, or behind a network that
    drops packets) would block a call forever. ``statement_timeout`` bounds a live server; for
    the rest, one daemon thread per process checks the calls in flight every ``tick`` seconds
    and shuts down the socket of a late one, so the call fails at once with a broken
    connection (which the pool then discards).
    """

    tick = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, int]] = {}
        self._late: set[int] = set()
        self._next = 0
        self._pid = 0

    def reset(self) -> None:
        """Forget everything (in a forked child: the parent's calls and thread are not ours)."""
        self._lock = threading.Lock()
        self._due, self._late, self._pid = {}, set(), 0

    def arm(self, fd: int, seconds: float) -> int:
        """Watch socket ``fd`` for ``seconds``; returns a token for :meth:`disarm`."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="tb_plugins-pg-watchdog",
                                 daemon=True).start()  # fmt: skip
            self._next += 1
            self._due[self._next] = (time.monotonic() + seconds, fd)
            return self._next

    def disarm(self, token: int) -> bool:
        """Stop watching; True if the call was cut for being late."""
        with self._lock:
            self._due.pop(token, None)
            if token in self._late:
                self._late.discard(token)
                return True
            return False

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                late = [(t, fd) for t, (due, fd) in self._due.items() if due <= now]
                for token, _ in late:
                    del self._due[token]
                    self._late.add(token)
            for _, fd in late:
                with contextlib.suppress(OSError):
                    sock = socket.socket(fileno=os.dup(fd))
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)


class _PgArray(bytes):
    """An array parameter already in PostgreSQL's binary format; ``oid`` is its array type."""

    __slots__ = ()
    oid = 0


class _Int8Array(_PgArray):
    __slots__ = ()
    oid = 1016


class _Int4Array(_PgArray):
    __slots__ = ()
    oid = 1007


class _Float8Array(_PgArray):
    __slots__ = ()
    oid = 1022


class _ByteaArray(_PgArray):
    __slots__ = ()
    oid = 1001


class _TextArray(_PgArray):
    __slots__ = ()
    oid = 1009


_A = TypeVar("_A", bound=_PgArray)
_I32 = struct.Struct(">i")
_F64 = struct.Struct(">d")
_NULL = b"\xff\xff\xff\xff"  # the length of a NULL element


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> struct.Struct:
    """n (length, int8) pairs: the elements of an int8 array."""
    return struct.Struct(">" + "iq" * n)


def _head(elem_oid: int, dims: Sequence[int], nulls: bool = False) -> bytes:
    """The header of a binary array: dimensions, null flag, element type, sizes and bounds."""
    bounds = [x for d in dims for x in (d, 1)]
    return struct.pack(f">iii{len(bounds)}i", len(dims), nulls, elem_oid, *bounds)


def _int8s(values: Sequence[int], dims: Sequence[int] | None = None) -> _Int8Array:
    """An int8[] parameter (``dims``: its shape, default 1-D)."""
    n = len(values)
    if not n:
        return _Int8Array(_head(20, ()))
    body = _pairs(n).pack(*[x for v in values for x in (8, v)])
    return _Int8Array(_head(20, dims or (n,)) + body)


def _array(cls: type[_A], elem_oid: int, items: Sequence[bytes | None]) -> _A:
    """A 1-D array parameter of already encoded elements (None: NULL)."""
    if not items:
        return cls(_head(elem_oid, ()))
    parts = [_head(elem_oid, (len(items),), any(x is None for x in items))]
    parts += [_NULL if x is None else _I32.pack(len(x)) + x for x in items]
    return cls(b"".join(parts))


def _int8_values(packed: bytes | None) -> tuple[int, ...]:
    """The elements of an int8 array as array_send gives it (any shape), in order."""
    if not packed:
        return ()
    ndim = _I32.unpack_from(packed)[0]
    start = 12 + 8 * ndim
    values: tuple[int, ...] = _pairs((len(packed) - start) // 12).unpack_from(packed, start)
    return values[1::2]


_ADAPTERS: list[Any] = []


def _adapters(pg: Any) -> Any:
    """psycopg's adapters, plus: the packed arrays above go as they are, and every Python int
    is dumped as an int8 (text and binary), so the statements always send the same parameter
    types (one prepared plan each) and the server casts nothing."""
    if not _ADAPTERS:
        from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

        class PackedDumper(pg.adapt.Dumper):  # type: ignore[misc]
            format = pg.pq.Format.BINARY

            def dump(self, obj: bytes) -> bytes:
                return obj

        adapters = pg.adapt.AdaptersMap(pg.adapters)
        adapters.register_dumper(int, Int8Dumper)
        adapters.register_dumper(int, Int8BinaryDumper)
        for cls in (_Int8Array, _Int4Array, _Float8Array, _ByteaArray, _TextArray):
            dumper = type(f"{cls.__name__}Dumper", (PackedDumper,), {"oid": cls.oid})
            adapters.register_dumper(cls, dumper)
        _ADAPTERS.append(adapters)
    return _ADAPTERS[0]


# PostgreSQL text cannot hold NUL. The names the usage log keeps as text (reservation id,
# models, action; alert keys) escape it with U+FDD0, a noncharacter (reserved for internal use):
# NUL -> U+FDD0 "0", U+FDD0 -> U+FDD0 U+FDD0. Names without either are stored as they are.
_ESC = "\ufdd0"
_UNESCAPE = re.compile(_ESC + "(.)", re.DOTALL)


def _to_text(value: str | None) -> str | None:
    """``value`` as PostgreSQL text can hold it (see ``_ESC``)."""
    if value is None or ("\x00" not in value and _ESC not in value):
        return value
    return value.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def _from_text(value: Any) -> Any:
    """The name :func:`_to_text` stored (a column's value: text or NULL)."""
    if value is None or _ESC not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\x00" if m[1] == "0" else _ESC if m[1] == _ESC else m[0], value)


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


_short_sha = functools.lru_cache(maxsize=4096)(_sha)


def _key_sha(text: str) -> bytes:
    """:func:`_sha` of a line key or scope: cached, as they recur from call to call (unless
    long, to bound the cache's memory)."""
    return _short_sha(text) if len(text) <= 256 else _sha(text)


def _state(v: Sequence[int], at: int) -> LineState:
    """The line state of the 12 integers from ``v[at]``: 6 spent, then 6 held."""
    return LineState(spent=(v[at], v[at + 1], v[at + 2], v[at + 3], v[at + 4], v[at + 5]),
                     held=(v[at + 6], v[at + 7], v[at + 8], v[at + 9], v[at + 10],
                           v[at + 11]))  # fmt: skip


def _states(v: Sequence[int], at: int, index: Sequence[int]) -> tuple[LineState, ...]:
    """Line states from 12 integers per distinct line from ``v[at]``, in the order ``index``
    gives."""
    states = [_state(v, i) for i in range(at, len(v), 12)]
    return tuple(states[i] for i in index)


def _keys(lines: Sequence[Line]) -> _TextArray:
    return _array(_TextArray, 25, [ln.key.encode() for ln in lines])


def _hashes(lines: Sequence[Line]) -> _ByteaArray:
    return _array(_ByteaArray, 17, [_key_sha(ln.key) for ln in lines])


@functools.lru_cache(maxsize=1024)
def _scope_args(scopes: tuple[str, ...]) -> tuple[str, _ByteaArray, _TextArray]:
    """The usage log's columns for a record's scopes: the JSON list, and the hash and escaped
    name of each distinct scope (the same scope paths recur from call to call)."""
    escaped = [quote(s, safe="") for s in dict.fromkeys(scopes)]
    hashes = _array(_ByteaArray, 17, [_key_sha(s) for s in escaped])
    return json.dumps(list(scopes)), hashes, _array(_TextArray, 25, [s.encode() for s in escaped])


def _record_args(r: UsageRecord) -> tuple[Any, ...]:
    check_record_amounts(r)
    check_texts(record=r)
    path = tuple(r.scopes)
    short = sum(map(len, path)) <= 1024  # cache only what bounds the cache's memory
    scopes, hashes, escaped = (_scope_args if short else _scope_args.__wrapped__)(path)
    extra = json.dumps(r.extra, default=str) if r.extra else "{}"
    return (
        float(r.ts), _to_text(r.reservation_id), scopes, _to_text(r.model),
        _to_text(r.requested_model), _to_text(r.action),
        int(r.input_tokens), int(r.output_tokens), int(r.cached_input_tokens), float(r.usd),
        bool(r.priced), bool(r.estimated), extra, hashes, escaped,
    )  # fmt: skip


def _picked(index: Sequence[int], watch: Sequence[int] | None) -> list[int]:
    """The distinct lines (indexes among them) whose states a settle reads back: those of the
    ``watch`` lines, or all when ``watch`` is None."""
    if watch is None:
        return sorted(set(index))
    return sorted({index[i] for i in watch})


def _watched(
    v: Sequence[int], index: Sequence[int], pick: Sequence[int]
) -> tuple[LineState | None, ...]:
    """Per given line, the state read back for its distinct line (12 integers each from
    ``v[12]``, in the order of ``pick``), or None when it was not read."""
    read = {u: _state(v, 12 * (k + 1)) for k, u in enumerate(pick)}
    return tuple(read.get(u) for u in index)


def _record(row: Sequence[Any]) -> UsageRecord:
    return UsageRecord(
        ts=float(row[0]),
        reservation_id=_from_text(row[1]),
        scopes=tuple(json.loads(row[2])),
        model=_from_text(row[3]),
        requested_model=_from_text(row[4]),
        action=_from_text(row[5]),
        input_tokens=int(row[6]),
        output_tokens=int(row[7]),
        cached_input_tokens=int(row[8]),
        usd=float(row[9]),
        priced=bool(row[10]),
        estimated=bool(row[11]),
        extra=json.loads(row[12]),
    )


def _usage_rows(rows: Sequence[Sequence[Any]], group_by: GroupBy) -> list[UsageRow]:
    if group_by == "scope":  # scope names are stored percent-escaped
        return usage_rows((unquote(str(r[0])), *r[1:]) for r in rows)
    if group_by == "model":
        return usage_rows((_from_text(r[0]), *r[1:]) for r in rows)
    return usage_rows(rows)


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class PostgresLedger(Ledger):
    """A ledger in PostgreSQL, shared by every process and host that opens the same database
    and schema.

    Args:
        conninfo: a libpq connection string or URL, without this ledger's own options.
        schema: the schema holding the ledger's tables (lowercase letters, digits, ``_``).
        timeout: seconds to wait for a connection, to connect, and for each statement.
        pool_min: connections each process keeps open.
        pool_max: connections each process may open.
        synchronous_commit: PostgreSQL's ``synchronous_commit`` for this ledger's sessions
            (``on``, ``off``, ``local``, ``remote_write`` or ``remote_apply``); None keeps the
            server's setting. ``off`` makes settles asynchronous too: faster, but a crash of
            the database server may lose the spend settled in the last fraction of a second.
            Reservations and releases commit asynchronously whatever this says.
        display_url: the URL shown in messages (the password is never shown).

    Example:
        >>> url = "postgresql://postgres@127.0.0.1/test?schema=demo"
        >>> ledger = PostgresLedger.from_url(url)  # doctest: +SKIP
        >>> ledger.server_time() > 0  # doctest: +SKIP
        True
    """

    schemes = ("postgresql", "postgres")

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "tb_plugins",
        timeout: float = 2.0,
        pool_min: int = 1,
        pool_max: int = 4,
        synchronous_commit: str | None = None,
        display_url: str | None = None,
    ) -> None:
        self._pg: Any = require("psycopg", "postgres")
        self._pg_pool: Any = require("psycopg_pool", "postgres")
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"ledger schema {schema!r} must be a lowercase name: a-z, 0-9 and _ "
                f"(not starting with a digit), at most 63 characters"
            )
        if timeout <= 0:
            raise ConfigError(f"ledger timeout must be positive, got {timeout!r}")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ConfigError(f"need 0 <= pool_min <= pool_max and pool_max >= 1, got "
                              f"{pool_min}, {pool_max}")  # fmt: skip
        commit = None if synchronous_commit is None else str(synchronous_commit).lower()
        if commit is not None and commit not in _SYNCHRONOUS_COMMIT:
            raise ConfigError(
                f"ledger option synchronous_commit must be one of "
                f"{', '.join(_SYNCHRONOUS_COMMIT)}, got {synchronous_commit!r}"
            )
        self.synchronous_commit = commit
        self.url = display_url or _hide_password(conninfo)
        self.schema = schema
        self.timeout = float(timeout)
        self.pool_min, self.pool_max = pool_min, pool_max
        params = self._pg.conninfo.conninfo_to_dict(conninfo)
        self.where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        ms = max(int(self.timeout * 1000), 1)
        # Generic plans: the functions' statements are planned once per session, not per call.
        # No bitmap scans: a generic plan guesses a few rows per key, for which a bitmap scan
        # costs more to set up than the index scan it replaces (every statement here reads a
        # handful of rows by key).
        options = (
            f"-c search_path={schema} -c statement_timeout={ms} "
            f"-c plan_cache_mode=force_generic_plan -c enable_bitmapscan=off"
        )
        if commit is not None:
            options += f" -c synchronous_commit={commit}"
        if params.get("options"):
            options = f"{params['options']} {options}"
        params.update(
            options=options,
            connect_timeout=str(max(2, math.ceil(self.timeout))),
            application_name=params.get("application_name") or "tb_plugins",
        )
        self._conninfo = self._pg.conninfo.make_conninfo(**params)
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._pool: Any = None
        self._pid = 0
        self._apool: Any = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._next_prune = 0.0
        self._down_until = 0.0
        # Reservation ids whose reserve (or release) got no reply: it may have committed all
        # the same, so their holds are released at the next successful call (see _orphan).
        self._orphans: dict[str, None] = {}
        self._orphans_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresLedger:
        """Open ``postgresql://user:password@host:port/dbname?schema=…&timeout=…``.

        Keyword options override the URL's: ``schema``, ``timeout`` (seconds or a duration such
        as ``"500ms"``), ``pool_min``, ``pool_max``, ``synchronous_commit`` (``off`` lets settles
        commit without waiting for the WAL flush: a database server crash may then lose the
        last fraction of a second of settled spend; see the module's *Durability*).

        Raises:
            ConfigError: the URL is not a PostgreSQL URL, or an option is unknown or malformed.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in cls.schemes:
            raise ConfigError(
                f"not a PostgreSQL ledger URL: {url!r} (use postgresql://user@host/dbname)"
            )
        shown = _hide_password(url)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for ledger {shown}; known: {', '.join(_OPTIONS)} "
                f"(and libpq's URL parameters)"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours: dict[str, Any] = {k: v for k, v in query if k in _OPTIONS}
        ours.update({k: v for k, v in options.items() if v is not None})
        rest = [(k, v) for k, v in query if k not in _OPTIONS]
        conninfo = urlunsplit(
            parts._replace(scheme="postgresql", query=urlencode(rest, quote_via=quote))
        )
        try:
            timeout = parse_duration(ours.get("timeout", 2.0))
            pool_min = int(ours.get("pool_min", 1))
            pool_max = int(ours.get("pool_max", max(4, pool_min)))
            commit = ours.get("synchronous_commit")
        except ValueError as exc:
            raise ConfigError(f"ledger {shown}: {exc}") from None
        try:
            return cls(
                conninfo,
                schema=str(ours.get("schema", "tb_plugins")),
                timeout=timeout,
                pool_min=pool_min,
                pool_max=pool_max,
                synchronous_commit=None if commit is None else str(commit),
                display_url=shown,
            )
        except Exception as exc:
            if isinstance(exc, ConfigError | ImportError):
                raise
            raise ConfigError(f"ledger {shown}: {exc}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, schema={self.schema!r})"

    # -- connections ---------------------------------------------------------------------------

    def _pool_options(self) -> dict[str, Any]:
        return {
            "kwargs": {"autocommit": True, "context": _adapters(self._pg)},
            "min_size": self.pool_min,
            "max_size": self.pool_max,
            "open": False,
            "timeout": self.timeout,
            # Give up a failing reconnection loop soon: the next call then tries again at once
            # instead of after a long backoff once the server is back.
            "reconnect_timeout": max(2.0 * self.timeout, 5.0),
            "name": f"tb_plugins:{self.schema}",
        }

    def _sync_pool(self) -> Any:
        pid = os.getpid()
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    if self._pool is not None:
                        _INHERITED.append(self._pool)
                    pool = self._pg_pool.ConnectionPool(self._conninfo, **self._pool_options())
                    pool.open(wait=False)
                    self._pool, self._pid = pool, pid
        return self._pool

    async def _async_pool(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._apool is None or self._aloop is not loop:
            self._drop_async_pool()
            pool = self._pg_pool.AsyncConnectionPool(self._conninfo, **self._pool_options())
            await pool.open(wait=False)
            self._apool, self._aloop = pool, loop
        return self._apool

    def _drop_async_pool(self) -> None:
        """Forget the async pool, closing its connections: through its own event loop when
        that loop is idle, else (the loop ended, or another one runs here) session by session."""
        pool, loop = self._apool, self._aloop
        self._apool = self._aloop = None
        if pool is None or loop is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(pool.close(timeout=self.timeout))
                return
        for conn in list(getattr(pool, "_pool", ())):
            conn.pgconn.finish()

    def _check_breaker(self) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            raise LedgerUnavailable(
                f"PostgreSQL ledger at {self.where} is unreachable (no connection within "
                f"{self.timeout:g}s; retrying shortly)"
            )

    def _wrap(self, exc: BaseException) -> LedgerError:
        pg = self._pg
        if isinstance(exc, self._pg_pool.PoolTimeout):
            self._down_until = time.monotonic() + BREAKER_SECONDS
            return LedgerUnavailable(
                f"PostgreSQL ledger at {self.where} is unreachable: no connection within "
                f"{self.timeout:g}s"
            )
        if isinstance(exc, pg.errors.QueryCanceled):
            return LedgerUnavailable(
                f"PostgreSQL ledger at {self.where} did not answer within {self.timeout:g}s ({exc})"
            )
        if isinstance(exc, pg.OperationalError | OSError):
            return LedgerUnavailable(f"PostgreSQL ledger at {self.where} is unreachable: {exc}")
        if isinstance(exc, pg.errors.NumericValueOutOfRange | OverflowError | struct.error):
            # A sum past 2**63 - 1 (int8pl), or a value no int8 holds: refused, never an outage.
            return LedgerError(
                f"PostgreSQL ledger at {self.where}: amount out of range: {exc}; "
                f"nothing was written"
            )
        return LedgerError(f"PostgreSQL ledger at {self.where}: {type(exc).__name__}: {exc}")

    def _retryable(self, exc: BaseException, conn: Any) -> bool:
        """A broken pooled connection (the server restarted, the session was terminated) or a
        transient conflict: worth another try, at once."""
        pg = self._pg
        if isinstance(exc, pg.errors.DeadlockDetected | pg.errors.SerializationFailure):
            return True
        return conn is not None and bool(conn.broken or conn.closed)

    def _late(self, exc: BaseException) -> LedgerUnavailable:
        return LedgerUnavailable(
            f"PostgreSQL ledger at {self.where} did not answer within "
            f"{self.timeout * WATCHDOG_FACTOR:g}s; the connection was closed ({exc})"
        )

    def _run(self, fn: Callable[[Any], T], *, cleanup: bool = True) -> T:
        """Run ``fn(connection)`` (autocommit: each statement its own transaction).

        A broken pooled connection is dropped and the call retried on another one (at most
        ``pool_max`` times, each failing at once); a call that outlives its deadline is not.
        After a success, the holds of orphaned reservations are released (``cleanup``).
        """
        self._check_breaker()
        for attempt in range(self.pool_max + 1):
            pool = self._sync_pool()
            conn: Any = None
            late = False
            try:
                with pool.connection() as conn:
                    token = _WATCHDOG.arm(conn.pgconn.socket, self._deadline())
                    try:
                        if not self._ready:
                            self._setup(conn)
                        result = fn(conn)
                    finally:
                        late = _WATCHDOG.disarm(token)
                self._down_until = 0.0
                if cleanup and self._orphans:
                    self._release_orphans()
                return result
            except self._pg.Error as exc:
                if late:
                    raise self._late(exc) from exc
                if attempt < self.pool_max and self._retryable(exc, conn):
                    continue
                raise self._wrap(exc) from exc
            except (OSError, OverflowError, struct.error) as exc:
                raise self._wrap(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arun(self, fn: Callable[[Any], Awaitable[T]], *, cleanup: bool = True) -> T:
        """Async :meth:`_run`."""
        self._check_breaker()
        for attempt in range(self.pool_max + 1):
            pool = await self._async_pool()
            conn: Any = None
            late = False
            try:
                async with pool.connection() as conn:
                    token = _WATCHDOG.arm(conn.pgconn.socket, self._deadline())
                    try:
                        if not self._ready:
                            await self._asetup(conn)
                        result = await fn(conn)
                    finally:
                        late = _WATCHDOG.disarm(token)
                self._down_until = 0.0
                if cleanup and self._orphans:
                    await self._arelease_orphans()
                return result
            except self._pg.Error as exc:
                if late:
                    raise self._late(exc) from exc
                if attempt < self.pool_max and self._retryable(exc, conn):
                    continue
                raise self._wrap(exc) from exc
            except (OSError, OverflowError, struct.error) as exc:
                raise self._wrap(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reservations whose reply was lost ---------------------------------------------------

    def _orphan(self, reservation_id: str, exc: LedgerUnavailable) -> None:
        """Remember ``reservation_id`` when its reserve (or release) failed after the statement
        may have reached the server and committed (the connection broke or was cut by the
        watchdog before the reply came). Not when nothing was sent (no connection, the
        breaker) or the server cancelled it (``statement_timeout`` rolls back). A reserve that
        commits unseen would hold until its TTL; the next successful call releases it instead
        (:meth:`_release_orphans`)."""
        cause = exc.__cause__
        not_sent = self._pg_pool.PoolTimeout | self._pg.errors.QueryCanceled
        if cause is None or isinstance(cause, not_sent):
            return
        with self._orphans_lock:
            self._orphans[reservation_id] = None
            while len(self._orphans) > ORPHANS_MAX:  # the oldest expire by their TTL anyway
                del self._orphans[next(iter(self._orphans))]

    def _adopt(self, reservation_id: str) -> None:
        """Forget ``reservation_id`` as an orphan: it is being reserved, settled or released
        again, which replaces or drops its hold by itself."""
        if self._orphans:
            with self._orphans_lock:
                self._orphans.pop(reservation_id, None)

    def _orphan_batch(self) -> list[str]:
        with self._orphans_lock:
            batch = list(self._orphans)[:ORPHANS_BATCH]
            for rid in batch:
                del self._orphans[rid]
        return batch

    def _orphans_back(self, batch: Sequence[str], exc: BaseException) -> None:
        with self._orphans_lock:
            for rid in batch:
                self._orphans.setdefault(rid, None)
        logger.warning("tb_plugins: PostgreSQL ledger at %s: releasing %d reservation(s) that "
                       "may have landed unseen failed (retried later): %s",
                       self.where, len(batch), exc)  # fmt: skip

    def _forget_args(self, batch: Sequence[str]) -> tuple[Any, ...]:
        return time.time(), _array(_ByteaArray, 17, [_sha(rid) for rid in batch])

    def _release_orphans(self) -> None:
        """Release (best effort, one round trip) the holds of up to ``ORPHANS_BATCH`` orphans;
        runs after a successful call, so no phantom hold outlives an outage by more than one
        call. A later settle or release of such an id still works (it finds no hold)."""
        batch = self._orphan_batch()
        if batch:
            args = self._forget_args(batch)
            try:
                self._run(lambda conn: conn.execute(_FORGET, args).fetchall(), cleanup=False)
            except LedgerError as exc:
                self._orphans_back(batch, exc)

    async def _arelease_orphans(self) -> None:
        """Async :meth:`_release_orphans`."""
        batch = self._orphan_batch()
        if batch:
            args = self._forget_args(batch)

            async def run(conn: Any) -> None:
                await (await conn.execute(_FORGET, args)).fetchall()

            try:
                await self._arun(run, cleanup=False)
            except LedgerError as exc:
                self._orphans_back(batch, exc)

    def _deadline(self) -> float:
        """Seconds a call may take before its connection is closed under it: past the
        server's statement_timeout (a live server answers by then), longer for the schema
        setup of the first call."""
        return self.timeout * (WATCHDOG_FACTOR if self._ready else 10.0)

    def _lock_id(self) -> int:
        return int.from_bytes(_sha(f"tb_plugins:{self.schema}")[:8], "big", signed=True)

    def _setup(self, conn: Any) -> None:
        """Create the schema on first use: once per database and schema (the DDL runs under an
        advisory lock, and only if the version recorded under that lock is older)."""
        with self._setup_lock:
            if self._ready:
                return
            if conn.execute(_HAS_META).fetchone()[0]:
                row = conn.execute(_VERSION).fetchone()
                if row is not None and self._check_version(int(row[0])):
                    self._ready = True
                    return
            sql = self._pg.sql
            with conn.transaction():
                conn.execute(_SETUP_LOCK, (self._lock_id(),))
                current = False
                if conn.execute(_HAS_META).fetchone()[0]:
                    row = conn.execute(_VERSION).fetchone()
                    current = row is not None and self._check_version(int(row[0]))
                if not current:
                    create = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                    conn.execute(create.format(sql.Identifier(self.schema)))
                    conn.execute(SCHEMA_SQL)
                    conn.execute(_SET_VERSION, (str(SCHEMA_VERSION),))
            self._ready = True

    async def _asetup(self, conn: Any) -> None:
        """Async :meth:`_setup`."""
        if (await (await conn.execute(_HAS_META)).fetchone())[0]:
            row = await (await conn.execute(_VERSION)).fetchone()
            if row is not None and self._check_version(int(row[0])):
                self._ready = True
                return
        sql = self._pg.sql
        async with conn.transaction():
            await conn.execute(_SETUP_LOCK, (self._lock_id(),))
            current = False
            if (await (await conn.execute(_HAS_META)).fetchone())[0]:
                row = await (await conn.execute(_VERSION)).fetchone()
                current = row is not None and self._check_version(int(row[0]))
            if not current:
                create = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                await conn.execute(create.format(sql.Identifier(self.schema)))
                await conn.execute(SCHEMA_SQL)
                await conn.execute(_SET_VERSION, (str(SCHEMA_VERSION),))
        self._ready = True

    def _check_version(self, version: int) -> bool:
        """True when the schema is current; raises when it is newer than this code."""
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"PostgreSQL ledger at {self.where} (schema {self.schema}) has schema version "
                f"{version}, newer than this tb_plugins understands ({SCHEMA_VERSION}); "
                f"upgrade tb-plugins"
            )
        return version == SCHEMA_VERSION

    def _one(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, binary: bool = False
    ) -> Any:
        """Run one statement and return the first column of its first row."""

        def run(conn: Any) -> Any:
            row = conn.execute(sql, params, binary=binary).fetchone()
            return None if row is None else row[0]

        return self._run(run)

    async def _aone(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, binary: bool = False
    ) -> Any:
        async def run(conn: Any) -> Any:
            row = await (await conn.execute(sql, params, binary=binary)).fetchone()
            return None if row is None else row[0]

        return await self._arun(run)

    def _all(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    async def _aall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async def run(conn: Any) -> list[Any]:
            rows: list[Any] = await (await conn.execute(sql, params)).fetchall()
            return rows

        return await self._arun(run)

    # -- statement arguments -------------------------------------------------------------------

    @staticmethod
    def _reserve_args(
        reservation_id: str, lines: Sequence[Line], amounts: Amounts, now: float, expires: float
    ) -> tuple[Any, ...]:
        check_amounts(amounts)
        check_texts(reservation_id, lines)
        limits = [-1 if lim is None else lim for ln in lines for lim in ln.limits]
        try:
            return (_sha(reservation_id), _hashes(lines), _int8s([ln.bucket for ln in lines]),
                    _int8s([ln.lowest_bucket for ln in lines]), _int8s(limits, (len(lines), 6)),
                    _int8s(amounts), float(now), float(expires))  # fmt: skip
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
        token: bytes | None = None,
    ) -> tuple[Any, ...]:
        """The parameters of one settle call; ``token`` (random by default) names the call, so
        that running it again after a lost reply still answers ``applied``."""
        check_amounts(amounts)
        check_texts(reservation_id, lines)
        watch = [_I32.pack(i + 1) for i in pick]
        try:
            expires = [None if ln.expires_at is None else _F64.pack(ln.expires_at)
                       for ln in lines]  # fmt: skip
            return (_sha(reservation_id), _hashes(lines), _int8s([ln.bucket for ln in lines]),
                    _int8s([ln.lowest_bucket for ln in lines]), _array(_Float8Array, 701, expires),
                    _int8s(amounts), float(now), _array(_Int4Array, 23, watch),
                    *_record_args(record), token or os.urandom(16))  # fmt: skip
        except (struct.error, OverflowError, TypeError) as exc:
            raise out_of_range("a bucket or expiry PostgreSQL cannot take", exc) from exc

    @staticmethod
    def _status_args(lines: Sequence[Line], now: float) -> tuple[Any, ...]:
        check_texts(lines=lines)
        pick = [_I32.pack(i) for i in range(1, len(lines) + 1)]
        try:
            return (_hashes(lines), _int8s([ln.lowest_bucket for ln in lines]),
                    _int8s([ln.bucket for ln in lines]), float(now),
                    _array(_Int4Array, 23, pick))  # fmt: skip
        except (struct.error, OverflowError, TypeError) as exc:
            raise out_of_range("a bucket PostgreSQL cannot take", exc) from exc

    def _write(self, sql: str, args: Sequence[Any], lines: Sequence[Line]) -> tuple[int, ...]:
        """Run tb_reserve2 or tb_settle2 and return its integers; when it answers that a line is
        missing (-1), add the lines in a transaction of their own and call again."""

        def run(conn: Any) -> tuple[int, ...]:
            for _ in range(_ADD_ATTEMPTS):
                values = _int8_values(conn.execute(sql, args, binary=True).fetchone()[0])
                if values[0] != -1:
                    return values
                conn.execute(_ADD_LINES, (args[1], _keys(lines)))
            raise LedgerError(f"PostgreSQL ledger at {self.where}: lines keep vanishing")

        return self._run(run)

    async def _awrite(
        self, sql: str, args: Sequence[Any], lines: Sequence[Line]
    ) -> tuple[int, ...]:
        """Async :meth:`_write`."""

        async def run(conn: Any) -> tuple[int, ...]:
            for _ in range(_ADD_ATTEMPTS):
                cur = await conn.execute(sql, args, binary=True)
                values = _int8_values((await cur.fetchone())[0])
                if values[0] != -1:
                    return values
                await conn.execute(_ADD_LINES, (args[1], _keys(lines)))
            raise LedgerError(f"PostgreSQL ledger at {self.where}: lines keep vanishing")

        return await self._arun(run)

    def _prune_due(self, now: float) -> bool:
        if now < self._next_prune:
            return False
        self._next_prune = now + PRUNE_EVERY
        return True

    # -- the atomic operations -----------------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Hold ``amounts`` on every line if every limit allows it, else change nothing.

        One transaction that locks the lines in key-hash order and commits without waiting
        for the WAL flush (a hold is transient); a reservation id that already holds is
        replaced (its old hold does not count against the new check).
        """
        unique, index = distinct_lines(lines)
        args = self._reserve_args(reservation_id, unique, amounts, now, expires_at)
        self._adopt(reservation_id)
        try:
            values = self._write(_RESERVE, args, unique)
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise
        return ReserveResult(ok=bool(values[0]), states=_states(values, 12, index))

    async def areserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Async :meth:`reserve`."""
        unique, index = distinct_lines(lines)
        args = self._reserve_args(reservation_id, unique, amounts, now, expires_at)
        self._adopt(reservation_id)
        try:
            values = await self._awrite(_RESERVE, args, unique)
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise
        return ReserveResult(ok=bool(values[0]), states=_states(values, 12, index))

    def settle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Replace the hold by ``amounts`` on each line and log ``record``; idempotent by id.

        Only the ``watch`` lines (all when None) are read back; the others' states are None.
        Commits synchronously unless the ledger was opened with ``synchronous_commit=off``.
        The call carries a random token: run again on a new connection after its reply was
        lost, it finds the id settled with this same token and still answers
        ``applied=True``; a second ``settle`` call of the id answers ``applied=False``.
        """
        unique, index = distinct_lines(lines)
        pick = _picked(index, watch)
        args = self._settle_args(reservation_id, unique, amounts, record, now, pick)
        self._adopt(reservation_id)
        values = self._write(_SETTLE, args, unique)
        if self._prune_due(now):
            self.prune(now)
        return SettleResult(applied=bool(values[0]), states=_watched(values, index, pick))

    async def asettle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Async :meth:`settle`."""
        unique, index = distinct_lines(lines)
        pick = _picked(index, watch)
        args = self._settle_args(reservation_id, unique, amounts, record, now, pick)
        self._adopt(reservation_id)
        values = await self._awrite(_SETTLE, args, unique)
        if self._prune_due(now):
            await self.aprune(now)
        return SettleResult(applied=bool(values[0]), states=_watched(values, index, pick))

    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold; True if a live (unexpired) hold was removed."""
        check_text("reservation id", reservation_id)
        self._adopt(reservation_id)
        try:
            return bool(self._one(_RELEASE, (_sha(reservation_id), float(now))))
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release`."""
        check_text("reservation id", reservation_id)
        self._adopt(reservation_id)
        try:
            return bool(await self._aone(_RELEASE, (_sha(reservation_id), float(now))))
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line, read in one snapshot (expired holds do not count)."""
        unique, index = distinct_lines(lines, by_key=False)
        packed = self._one(_STATUS, self._status_args(unique, now), binary=True)
        return _states(_int8_values(packed), 0, index)

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status`."""
        unique, index = distinct_lines(lines, by_key=False)
        packed = await self._aone(_STATUS, self._status_args(unique, now), binary=True)
        return _states(_int8_values(packed), 0, index)

    # -- bookkeeping ---------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Delete holds expired at ``now``, and counters, idle lines and alert claims that
        stopped counting more than a day before; never waits for rows in use. Returns how many
        rows went.

        Runs by itself every ten minutes of ledger time, after a settle; failures are ignored
        (the next prune catches up).
        """
        try:
            return int(self._one(_PRUNE, (now, now - PRUNE_GRACE, PRUNE_BATCH)))
        except LedgerError:
            return 0

    async def aprune(self, now: float) -> int:
        """Async :meth:`prune`."""
        try:
            return int(await self._aone(_PRUNE, (now, now - PRUNE_GRACE, PRUNE_BATCH)))
        except LedgerError:
            return 0

    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair with a counter, sorted."""
        return sorted(_split_line_key(row[0]) for row in self._all(_SCOPES))

    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True for the first claim of ``alert_key``; the claim is pruned once long expired."""
        check_text("alert key", alert_key)
        args = (_sha(alert_key), _to_text(alert_key), expires_at)
        return self._one(_CLAIM_ALERT, args) is not None

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert`."""
        check_text("alert key", alert_key)
        args = (_sha(alert_key), _to_text(alert_key), expires_at)
        return await self._aone(_CLAIM_ALERT, args) is not None

    def append_usage(self, record: UsageRecord) -> None:
        """Log a record with no spend (a refused call); it is never taken as a settle."""
        self._one(_LOG, _record_args(record))

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage`."""
        await self._aone(_LOG, _record_args(record))

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals of records with ``since <= ts < until``, grouped by scope, model or UTC day.

        ``requests`` counts settled records and ``denied`` refused ones; tokens and usd sum
        the settled records only.
        """
        sql = _USAGE.get(group_by)
        if sql is None:
            raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
        return _usage_rows(self._all(sql, self._usage_params(since, until, scope)), group_by)

    async def ausage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        sql = _USAGE.get(group_by)
        if sql is None:
            raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
        rows = await self._aall(sql, self._usage_params(since, until, scope))
        return _usage_rows(rows, group_by)

    @staticmethod
    def _usage_params(
        since: float | None, until: float | None, scope: str | None
    ) -> dict[str, Any]:
        if scope is not None:
            check_text("scope name", scope)
        scope_hash = None if scope is None else _sha(quote(scope, safe=""))
        return {"since": since, "until": until, "scope": scope_hash}

    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """The first ``limit`` records with ``since <= ts < until``, oldest first."""
        params = {"since": since, "until": until, "limit": limit}
        return [_record(r) for r in self._all(_RECORDS, params)]

    async def arecords(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Async :meth:`records`."""
        params = {"since": since, "until": until, "limit": limit}
        return [_record(r) for r in await self._aall(_RECORDS, params)]

    def server_time(self) -> float:
        """The database's clock (``clock_timestamp()``), in epoch seconds."""
        return float(self._one(_SERVER_TIME))

    async def aserver_time(self) -> float:
        """Async :meth:`server_time`."""
        return float(await self._aone(_SERVER_TIME))

    def ping(self) -> None:
        """One bare round trip (``SELECT 1``), e.g. to measure the network floor."""
        self._one(_PING)

    def close(self) -> None:
        """Close this process's connections (and those of an async pool whose loop ended)."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close(timeout=self.timeout)
        self._drop_async_pool()

    async def aclose(self) -> None:
        """Close the connections of the running event loop, and the sync ones."""
        if self._apool is not None and self._aloop is asyncio.get_running_loop():
            pool, self._apool, self._aloop = self._apool, None, None
            await pool.close(timeout=self.timeout)
        self.close()


def _split_line_key(key: str) -> tuple[str, str]:
    scope, _, window = key.partition("|")
    return unquote(scope), window
