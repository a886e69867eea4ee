"""The embedded ledger: one SQLite file shared by every process on a host.

Plain :mod:`sqlite3`. Every reserve, settle and release is one ``BEGIN IMMEDIATE``
transaction, so many processes on one file never over-admit: SQLite serializes the writers,
and a writer that finds the file locked waits (busy timeout) and then retries with a bounded
backoff. The async twins run the transaction at once on the event loop's thread when the file
is free (about 0.1 ms, cheaper than a hop to a worker thread), and in a worker when it is not.

Tables (schema version 2)::

    counters(key, bucket, scope, window, <6 units>, expires_at)  PK (key, bucket)
    holds(key, bucket, reservation_id, <6 units>, expires_at)     live reservations,
        PK (key, bucket, reservation_id), and an index by reservation_id
    usage(id, ts, reservation_id, settled_id UNIQUE, scopes, model, ...)  the usage log;
        settled_id is the reservation id of a settle (NULL for refused calls), so the log
        is also the set of settled ids that makes settle idempotent; scopes is a JSON list
    alerts(key, expires_at)                                       alerts already claimed
    meta(key, value)                                              schema_version

``counters`` and ``holds`` are ``WITHOUT ROWID`` tables: reading a line's state is one range
of a primary key that holds the sums itself. A version 1 file (tb-plugins 0.1) is migrated
in place the first time a newer process opens it.

The WAL journal and ``synchronous=NORMAL`` keep a commit cheap (no fsync per call; a power
loss may drop the last few commits, never corrupt the file), and 1 KiB pages keep the WAL
small, since a settle dirties a few pages. Connections are per thread and reopened in a
forked child (by an ``os.register_at_fork`` hook, and a pid check behind it).

**The file itself.** A process that deletes or replaces the ledger file (``rm``, a restored
backup moved over it) leaves this process's connections writing to a file nobody else sees,
whose spend is gone at exit. So the ledger compares the file at its path with the one it
opened (device and inode) at most every :data:`FILE_CHECK_EVERY` seconds, before the next
call, and whenever a thread opens a connection; once they differ every call raises
:class:`~tb_plugins.errors.LedgerUnavailable` naming the file (the guard's fail mode applies)
until :meth:`SQLiteLedger.reopen` is called. It never reopens by itself: a new, empty file
would silently start every budget again from zero.

**Errors.** A locked, busy, missing or unreadable file is ``LedgerUnavailable``; anything the
ledger is given that it cannot store (an amount past ``2**63 - 1``, a sum that would pass it,
a name with a lone surrogate) is a plain :class:`~tb_plugins.errors.LedgerError` raised before
anything is written. Scope and model names are stored exactly, NUL included (SQLite's JSON
functions cut strings at an escaped NUL, so reports split such scope lists in Python).

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("sqlite:///tb_ledger.db")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tb_plugins.core.usage import UNITS, ZERO, Amounts, UsageRecord, UsageRow
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import (
    GroupBy,
    Ledger,
    Line,
    LineState,
    ReserveResult,
    SettleResult,
    _to_thread,
    check_amounts,
    check_record_amounts,
    check_text,
    check_texts,
    distinct_lines,
    distinct_watch,
    json_text,
    spread,
    usage_rows,
)

__all__ = ["SCHEMA_VERSION", "SQLiteLedger"]

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")
logger = logging.getLogger("tb_plugins")


class _Busy:
    """The ledger was locked: nothing was done (see :meth:`SQLiteLedger._run_now`)."""


BUSY = _Busy()

SCHEMA_VERSION = 2
PAGE_SIZE = 1024  # bytes, for new files
PRUNE_EVERY = 600.0  # seconds of ledger time between two prunes of dead counters and alerts
CHECKPOINT_EVERY = 100  # write transactions on an event loop between two checkpoints
PRUNE_GRACE = 86_400.0  # a counter or alert is deleted this long after it stopped being read
FILE_CHECK_EVERY = 0.5  # seconds (monotonic) between two checks that the file is still ours
_clock = time.monotonic  # the clock of those checks (tests replace it)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.0005, 0.05  # seconds, retry of a locked file (with jitter)

_UNIT_COLS = ", ".join(UNITS)

# -- the schema ----------------------------------------------------------------------------------

_UNIT_DEFS = ", ".join(f"{u} INTEGER NOT NULL" for u in UNITS)
_COUNTERS = f"""
CREATE TABLE counters (
  key TEXT NOT NULL, bucket INTEGER NOT NULL, scope TEXT NOT NULL, window TEXT NOT NULL,
  {_UNIT_DEFS}, expires_at REAL,
  PRIMARY KEY (key, bucket)
) WITHOUT ROWID
"""
# Keyed by line first: a state read is a range of the primary key, holding its own sums.
_HOLDS = f"""
CREATE TABLE holds (
  key TEXT NOT NULL, bucket INTEGER NOT NULL, reservation_id TEXT NOT NULL,
  {_UNIT_DEFS}, expires_at REAL NOT NULL,
  PRIMARY KEY (key, bucket, reservation_id)
) WITHOUT ROWID
"""
_HOLDS_INDEX = "CREATE INDEX idx_holds_reservation_id ON holds (reservation_id)"
_SCHEMA = (
    _COUNTERS,
    _HOLDS,
    _HOLDS_INDEX,
    """
CREATE TABLE usage (
  id INTEGER PRIMARY KEY, ts REAL NOT NULL, reservation_id TEXT, settled_id TEXT,
  scopes TEXT, model TEXT, requested_model TEXT, action TEXT NOT NULL,
  input_tokens INTEGER, output_tokens INTEGER, cached_input_tokens INTEGER,
  usd REAL, priced INTEGER, estimated INTEGER, extra TEXT
)
""",
    "CREATE UNIQUE INDEX idx_usage_settled_id ON usage (settled_id)",
    "CREATE INDEX idx_usage_ts ON usage (ts)",
    "CREATE TABLE alerts (key TEXT PRIMARY KEY, expires_at REAL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
)
# Version 1 (tb-plugins 0.1): rowid tables with secondary indexes, and a usage_scopes table.
_MIGRATE_FROM_1 = (
    "ALTER TABLE counters RENAME TO counters_v1",
    _COUNTERS,
    f"INSERT INTO counters SELECT key, bucket, scope, window, {_UNIT_COLS}, expires_at"
    " FROM counters_v1",
    "DROP TABLE counters_v1",
    "ALTER TABLE holds RENAME TO holds_v1",
    _HOLDS,
    f"INSERT OR REPLACE INTO holds SELECT key, bucket, reservation_id, {_UNIT_COLS},"
    " expires_at FROM holds_v1",
    "DROP TABLE holds_v1",
    _HOLDS_INDEX,
    "DROP TABLE IF EXISTS usage_scopes",
)
_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
_SET_VERSION = "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)"

# -- the hot path: constant SQL ----------------------------------------------------------------

_PURGE_HOLDS = "DELETE FROM holds WHERE expires_at <= ?"
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
_ANY_HOLD = "SELECT 1 FROM holds LIMIT 1"
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

    A line sums only the units of its mask (the others read 0): a check needs no more, and a
    rolling window's sixty sub-buckets cost a sixth as much for a budget on tokens alone.
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


_DELETE_HOLDS = "DELETE FROM holds WHERE reservation_id = ?"
_DELETE_LIVE_HOLDS = "DELETE FROM holds WHERE reservation_id = ? AND expires_at > ?"
_INSERT_HOLDS = f"INSERT INTO holds (reservation_id, key, bucket, {_UNIT_COLS}, expires_at) VALUES "
_HOLD_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_COUNTERS = (
    f"INSERT INTO counters (key, bucket, scope, window, {_UNIT_COLS}, expires_at) VALUES "
)
_COUNTER_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# SQLite turns an integer overflow of `+` into a float, silently; abs(-2**63) raises "integer
# overflow" instead, so a sum that would pass 2**63 - 1 fails the transaction (see _wrap).
_CHECKED_ADD = (
    "{u} = CASE WHEN excluded.{u} > 9223372036854775807 - {u}"
    " THEN abs(-9223372036854775807 - 1 - 0 * {u}) ELSE {u} + excluded.{u} END"
)
_ON_COUNTER = f"""
ON CONFLICT (key, bucket) DO UPDATE SET
  {", ".join(_CHECKED_ADD.format(u=u) for u in UNITS)},
  expires_at = CASE WHEN expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL
                    ELSE max(expires_at, excluded.expires_at) END
"""


_ROWS_CHUNK = 500  # rows per statement (SQLite binds at most 32,766 parameters)


@functools.lru_cache(maxsize=64)
def _rows_sql(head: str, row: str, n: int, tail: str) -> str:
    return head + ", ".join([row] * n) + tail


def _write_rows(
    conn: sqlite3.Connection, head: str, row: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    """Write ``rows`` with one statement per 500 (cheaper than ``executemany``)."""
    for start in range(0, len(rows), _ROWS_CHUNK):
        chunk = rows[start : start + _ROWS_CHUNK]
        conn.execute(_rows_sql(head, row, len(chunk), tail), [v for r in chunk for v in r])


_RECORD_COLS = (
    "ts, reservation_id, scopes, model, requested_model, action, input_tokens, output_tokens, "
    "cached_input_tokens, usd, priced, estimated, extra"
)
_INSERT_USAGE = f"""
INSERT INTO usage (settled_id, {_RECORD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (settled_id) DO NOTHING
"""
_PRUNE = (
    "DELETE FROM counters WHERE expires_at < ?",
    "DELETE FROM alerts WHERE expires_at < ?",
)
# Expired holds never count (the state read skips them); dropping them is housekeeping.
_CLAIM_ALERT = "INSERT INTO alerts (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
_SCOPES = "SELECT DISTINCT scope, window FROM counters ORDER BY scope, window"
_RECORDS = f"""
SELECT {_RECORD_COLS} FROM usage
 WHERE (:since IS NULL OR ts >= :since) AND (:until IS NULL OR ts < :until)
 ORDER BY ts, id LIMIT :limit
"""
# SQLite's JSON functions cut a string at an escaped NUL (json_each reads "a\u0000b" as "a"),
# so a record whose scope list holds a NUL is never split by json_each: such records are
# grouped by their whole list in SQL, and the lists split in Python (exactly), then merged.
_NUL = "'\\u0000'"  # JSON's escape of NUL as SQL text; only such lists can hold a NUL
_SUMS = """sum(u.action != 'deny'), sum(u.action = 'deny'),
       sum(CASE WHEN u.action != 'deny' THEN u.input_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.output_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.cached_input_tokens ELSE 0 END),
       sum(CASE WHEN u.action != 'deny' THEN u.usd ELSE 0 END)"""
_PERIOD = "(:since IS NULL OR u.ts >= :since) AND (:until IS NULL OR u.ts < :until)"
_USAGE_TEMPLATE = f"""
SELECT {{key}} AS k, {_SUMS}
  FROM usage u {{join}}
 WHERE {_PERIOD} AND ifnull(instr(u.scopes, {_NUL}), 0) = 0
   AND (:scope IS NULL OR EXISTS (SELECT 1 FROM json_each(u.scopes) f WHERE f.value = :scope))
 GROUP BY k
"""
_USAGE_NUL_TEMPLATE = f"""
SELECT {{key}} AS k, u.scopes, {_SUMS}
  FROM usage u
 WHERE {_PERIOD} AND instr(u.scopes, {_NUL}) > 0
 GROUP BY k, u.scopes
"""
_DAY = "strftime('%Y-%m-%d', u.ts, 'unixepoch')"
_USAGE: dict[str, tuple[str, str]] = {
    "scope": (
        _USAGE_TEMPLATE.format(key="s.value", join="JOIN json_each(u.scopes) s"),
        _USAGE_NUL_TEMPLATE.format(key="NULL"),
    ),
    "model": (
        _USAGE_TEMPLATE.format(key="u.model", join=""),
        _USAGE_NUL_TEMPLATE.format(key="u.model"),
    ),
    "day": (
        _USAGE_TEMPLATE.format(key=_DAY, join=""),
        _USAGE_NUL_TEMPLATE.format(key=_DAY),
    ),
}


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
            total = totals.setdefault(k, [0, 0, 0, 0, 0, 0.0])
            for i, v in enumerate(sums):
                total[i] += v or 0
    return usage_rows((k, *v) for k, v in totals.items())


_INHERITED: list[sqlite3.Connection] = []  # parent connections a forked child must not close
_LEDGERS: weakref.WeakSet[SQLiteLedger] = weakref.WeakSet()


# One writer lock per file and process: threads of a process queue here, in memory, instead of
# starving each other on the file lock with sleep-backoff; only one connection per process
# competes with other processes for the file.
class _FairLock:
    """A first-come, first-served lock with direct hand-off: release wakes only the oldest
    waiter, so a wait is bounded by the queue ahead of it (``threading.Lock`` lets a releasing
    thread take it straight back, and a busy thread can starve the others)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self._guard:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=max(timeout, 0.0)):
            return True  # handed over by release(); the lock stayed held
        with self._guard:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                return False
        waiter.acquire()  # release() handed it over just as the wait timed out
        return True

    def try_acquire(self) -> bool:
        """Take the lock only if it is free and nobody waits for it."""
        with self._guard:
            if self._held:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


_WRITERS: dict[str, _FairLock] = {}
_WRITERS_GUARD = threading.Lock()


def _writer_lock(path: str) -> _FairLock:
    with _WRITERS_GUARD:
        lock = _WRITERS.get(path)
        if lock is None:
            lock = _WRITERS[path] = _FairLock()
        return lock


def _after_fork_in_child() -> None:
    global _WRITERS_GUARD
    _WRITERS.clear()  # a parent's thread may have held one at fork time
    _WRITERS_GUARD = threading.Lock()
    for ledger in list(_LEDGERS):
        ledger._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)

_LOCK_TYPE = type(threading.Lock())
_BUSY_MARKERS = ("database is locked", "database table is locked", "database is busy")
_UNAVAILABLE_MARKERS = ("unable to open", "disk i/o error", "readonly", "read-only")


@functools.lru_cache(maxsize=1024)
def _scopes_json(scopes: tuple[str, ...]) -> str:
    """A record's scopes as a JSON list, each once (a report counts a record once per scope)."""
    return json.dumps(list(dict.fromkeys(scopes)), ensure_ascii=False)


def _fits(line: Line, state: LineState, amounts: Amounts) -> bool:
    # A line already past its limit refuses even a zero amount: the comparison is strict.
    for unit, limit in enumerate(line.limits):
        if limit is not None and state.spent[unit] + state.held[unit] + amounts[unit] > limit:
            return False
    return True


def _is_busy(exc: sqlite3.Error) -> bool:
    return any(marker in str(exc).lower() for marker in _BUSY_MARKERS)


class SQLiteLedger(Ledger):
    """A ledger in one SQLite file, safe for many threads and processes on one host.

    Args:
        path: the database file (created if missing), or ``":memory:"`` for a private
            in-process ledger (see :class:`~tb_plugins.ledger.memory.MemoryLedger`).
        timeout: seconds a writer waits for the file's write lock before the call fails with
            :class:`~tb_plugins.errors.LedgerUnavailable`.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "ledger.db")
        >>> ledger = SQLiteLedger.from_url(f"sqlite:///{path}")
        >>> ledger.scopes()
        []
        >>> ledger.close()
    """

    schemes = ("sqlite",)

    def __init__(self, path: str, *, timeout: float = 5.0, url: str | None = None) -> None:
        self._memory = path == ":memory:"
        self.path = path if self._memory else os.path.abspath(os.path.expanduser(path))
        self.url = url or ("memory://" if self._memory else f"sqlite:///{self.path}")
        self._timeout = float(timeout)
        self._local = threading.local()
        self._conns: list[tuple[int, threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._next_prune = 0.0
        self._inline_commits = 0  # write transactions run on an event loop since a checkpoint
        self._checkpointing: asyncio.Future[None] | None = None
        # An in-memory database exists only in its one connection: share it, under a lock.
        self._single = self._open() if self._memory else None
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._memory else contextlib.nullcontext()
        )
        _LEDGERS.add(self)
        # The file this ledger opened, as (device, inode): see _check_file.
        self._file_id: tuple[int, int] | None = None
        self._next_file_check = 0.0
        self._lost: str | None = None
        self._run(lambda conn: None, write=False, setup=True)
        self._file_id = None if self._memory else self._stat_id()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteLedger:
        """Open ``sqlite:///relative.db`` or ``sqlite:////abs/path.db``.

        Options (keyword or URL query, e.g. ``?timeout=10``): ``timeout`` in seconds.

        Raises:
            ConfigError: the URL names no file, or an unknown option was given.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in cls.schemes:
            raise ConfigError(f"not a SQLite ledger URL: {url!r} (use sqlite:///path.db)")
        # sqlite:///rel.db has path "/rel.db"; sqlite:////abs.db has "//abs.db": drop one "/".
        path = unquote(parts.netloc + parts.path)
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ConfigError(f"the SQLite ledger URL {url!r} names no file (sqlite:///path.db)")
        opts: dict[str, Any] = dict(parse_qsl(parts.query))
        opts.update(options)
        unknown = sorted(set(opts) - {"timeout"})
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for ledger {url!r}; known: timeout")
        return cls(path, timeout=float(opts.get("timeout", 5.0)), url=url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- the file ------------------------------------------------------------------------------

    def _stat_id(self) -> tuple[int, int] | None:
        """(device, inode) of the file at the ledger's path now, or None if there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LedgerUnavailable(
                f"SQLite ledger {self.path}: cannot stat the file: {exc}"
            ) from exc
        return st.st_dev, st.st_ino

    def _check_file(self, *, force: bool = False) -> None:
        """Raise :class:`LedgerUnavailable` once the file at the path is no longer the file
        this ledger opened (deleted, or replaced by another one): its open connections would
        go on writing to a file no other process sees, and whose spend is lost at exit.

        One ``stat`` per :data:`FILE_CHECK_EVERY` seconds at most, before the next operation
        (``force``: now). Once lost, every call fails until :meth:`reopen`.
        """
        if self._lost is not None:
            raise LedgerUnavailable(self._lost)
        if self._file_id is None:  # in-memory, or still opening
            return
        now = _clock()
        if not force and now < self._next_file_check:
            return
        self._next_file_check = now + FILE_CHECK_EVERY
        found = self._stat_id()
        if found == self._file_id:
            return
        what = "deleted" if found is None else "replaced by another file"
        self._lost = (
            f"SQLite ledger {self.path}: the ledger file was {what} while this process had it "
            f"open; its spend is no longer visible to other processes, so nothing more is "
            f"written to it. Call reopen() on the ledger (or restart) to use the file now at "
            f"that path"
        )
        logger.error("tb_plugins: %s", self._lost)
        raise LedgerUnavailable(self._lost)

    def reopen(self) -> None:
        """Use the file now at the ledger's path (created, with the schema, if missing), after
        the file this ledger had open was deleted or replaced.

        Never done by itself: a new, empty file would silently start every budget from zero.
        """
        if self._memory:
            return
        self.close()
        self._lost = None
        self._file_id = None
        self._run(lambda conn: None, write=False, setup=True)
        self._file_id = self._stat_id()
        self._next_file_check = _clock() + FILE_CHECK_EVERY

    # -- connections and transactions --------------------------------------------------------

    def _open(self, timeout: float | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._timeout if timeout is None else timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self, *, fast: bool = False) -> sqlite3.Connection:
        """This thread's connection; ``fast``: a second one that never waits for the file
        lock (busy timeout 0), for operations run at once on an event loop's thread."""
        if self._single is not None:
            return self._single
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "fast" if fast else "conn", None)
        if conn is None or local.pid != os.getpid():
            if getattr(local, "pid", None) != os.getpid():
                local.conn = local.fast = None
            self._check_file(force=True)  # never open (or create) a file that is not ours
            conn = self._open(0.0 if fast else None)
            if fast and not self._memory:
                # A checkpoint flushes the file to disk: never on an event loop (see _arun).
                conn.execute("PRAGMA wal_autocheckpoint=0")
            pid, me = os.getpid(), threading.current_thread()
            local.pid = pid
            if fast:
                local.fast = conn
            else:
                local.conn = conn
            with self._conns_lock:
                keep, dead = [], []
                for entry in self._conns:
                    if entry[0] != pid:  # inherited through fork: never use nor close it
                        _INHERITED.append(entry[2])
                    elif entry[1].is_alive():
                        keep.append(entry)
                    else:  # its thread has finished
                        dead.append(entry[2])
                self._conns = [*keep, (pid, me, conn)]
            for stale in dead:
                stale.close()
        return conn

    def _after_fork(self) -> None:
        # The child must neither use nor close the connections it inherited (SQLite's locks
        # belong to the parent); keep them referenced, unused, and start afresh.
        _INHERITED.extend(conn for _, _, conn in self._conns)
        self._conns = []
        self._inline_commits, self._checkpointing = 0, None  # the parent's loop's, not ours
        self._conns_lock = threading.Lock()
        self._local = threading.local()
        if self._single is not None:  # a memory ledger keeps its copy, private to the child
            self._lock = threading.Lock()

    def _run(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True, setup: bool = False
    ) -> T:
        """Run ``fn`` in one transaction, retrying while another process holds the file."""
        self._check_file()
        deadline = time.monotonic() + self._timeout
        writer = _writer_lock(self.path) if write and not self._memory else None
        if writer is not None and not writer.acquire(timeout=self._timeout):
            raise LedgerUnavailable(
                f"SQLite ledger {self.path}: still locked by another writer of this process "
                f"after {self._timeout:g}s"
            )
        try:
            return self._attempt(fn, deadline, write=write, setup=setup)
        finally:
            if writer is not None:
                writer.release()

    def _attempt(
        self, fn: Callable[[sqlite3.Connection], T], deadline: float, *, write: bool, setup: bool
    ) -> T:
        delay = _BACKOFF_FIRST
        while True:
            try:
                with self._lock:
                    conn = self._conn()
                    if setup:
                        self._create_schema(conn)
                        return fn(conn)
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                    finally:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                return result
            except sqlite3.Error as exc:
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                raise self._wrap(exc) from exc
            except (OverflowError, ValueError, TypeError) as exc:  # binding a parameter
                raise self._wrap_value(exc) from exc

    def _run_now(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T | _Busy:
        """Run ``fn`` in one transaction on the calling thread if the ledger is free at once;
        else change nothing and return ``BUSY`` (never waits: safe on an event loop)."""
        self._check_file()
        writer = _writer_lock(self.path) if write and not self._memory else None
        if writer is not None and not writer.try_acquire():
            return BUSY
        try:
            locked = self._lock if isinstance(self._lock, _LOCK_TYPE) else None
            if locked is not None and not locked.acquire(blocking=False):
                return BUSY
            try:
                conn = self._conn(fast=True)
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                    finally:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    if _is_busy(exc):
                        return BUSY
                    raise self._wrap(exc) from exc
                except (OverflowError, ValueError, TypeError) as exc:  # binding a parameter
                    raise self._wrap_value(exc) from exc
                return result
            finally:
                if locked is not None:
                    locked.release()
        finally:
            if writer is not None:
                writer.release()

    async def _arun(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Async :meth:`_run`: at once when the ledger is free (a transaction takes ~0.1 ms,
        less than a hop to a worker thread and back), else in a worker thread that waits."""
        result = self._run_now(fn, write=write)
        if isinstance(result, _Busy):
            return await _to_thread(self._run, fn, write=write)
        if write and not self._memory:
            self._inline_commits += 1
            if self._inline_commits >= CHECKPOINT_EVERY and self._checkpointing is None:
                # The loop's connection does not checkpoint itself: a worker does it now and
                # then, so the WAL stays short and no fsync ever stalls the loop.
                self._inline_commits = 0
                import asyncio  # running in a loop: already imported

                loop = asyncio.get_running_loop()
                self._checkpointing = loop.run_in_executor(None, self._checkpoint)
                self._checkpointing.add_done_callback(self._checkpoint_done)
        return result

    def _checkpoint(self) -> None:
        self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpoint_done(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not done.cancelled() and done.exception() is not None:
            logger.warning("tb_plugins: SQLite checkpoint failed: %s", done.exception())

    def _wrap(self, exc: sqlite3.Error) -> LedgerError:
        text = str(exc)
        if _is_busy(exc):
            return LedgerUnavailable(
                f"SQLite ledger {self.path}: still locked by another writer after "
                f"{self._timeout:g}s ({text})"
            )
        if any(marker in text.lower() for marker in _UNAVAILABLE_MARKERS):
            return LedgerUnavailable(f"SQLite ledger {self.path}: {text}")
        if "integer overflow" in text.lower():  # a sum past 2**63 - 1 (see _CHECKED_ADD)
            return LedgerError(
                f"SQLite ledger {self.path}: amount out of range: a sum would pass "
                f"2**63 - 1 ({text}); nothing was written"
            )
        return LedgerError(f"SQLite ledger {self.path}: {text}")

    def _wrap_value(self, exc: Exception) -> LedgerError:
        """A value Python could not hand to SQLite: never an outage."""
        if isinstance(exc, OverflowError):
            return LedgerError(f"SQLite ledger {self.path}: amount out of range: {exc}")
        return LedgerError(f"SQLite ledger {self.path}: {type(exc).__name__}: {exc}")

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # no meta table yet
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) >= SCHEMA_VERSION:
                self._check_version(int(row[0]))
                return
        if not self._memory:
            # Small pages: a settle dirties a few pages, and the WAL writes each one whole.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes on a new, empty file
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = None
            with contextlib.suppress(sqlite3.OperationalError):  # no meta table yet
                row = conn.execute(_VERSION).fetchone()
            if row is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(_SET_VERSION, (str(SCHEMA_VERSION),))
            elif int(row[0]) == 1:
                for statement in _MIGRATE_FROM_1:
                    conn.execute(statement)
                conn.execute(_SET_VERSION, (str(SCHEMA_VERSION),))
            row = conn.execute(_VERSION).fetchone()
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        self._check_version(int(row[0]))

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"SQLite ledger {self.path} has schema version {version}, newer than this "
                f"tb_plugins understands ({SCHEMA_VERSION}); upgrade tb-plugins"
            )

    @staticmethod
    def _states(
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
                any_held = conn.execute(_ANY_HOLD).fetchone() is not None
            if any_held:
                params += (now, exclude)
            for row in conn.execute(_line_states_sql(masks, any_held), params):
                sums[start + row[0]][row[1]] = row[2:]  # six integers: coalesce(sum(...), 0)
        return tuple(LineState(spent=spent, held=held) for spent, held in sums)

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

        Reserving an id that already holds replaces its hold (its old hold does not count
        against the new check), so a retried reserve never holds twice.
        """
        return self._run(self._reserve_tx(reservation_id, lines, amounts, now, expires_at))

    async def areserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Async :meth:`reserve` (at once when the file is free: no thread hop)."""
        return await self._arun(self._reserve_tx(reservation_id, lines, amounts, now, expires_at))

    def _reserve_tx(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        now: float,
        expires_at: float,
    ) -> Callable[[sqlite3.Connection], ReserveResult]:
        check_amounts(amounts)
        check_texts(reservation_id, lines)
        unique, index = distinct_lines(lines)  # a line given twice holds once

        def tx(conn: sqlite3.Connection) -> ReserveResult:
            # With no call in flight anywhere there are no holds to read or to replace.
            held = conn.execute(_ANY_HOLD).fetchone() is not None
            states = self._states(
                conn, unique, now, exclude=reservation_id, limited_only=True, held=held
            )
            ok = all(_fits(line, st, amounts) for line, st in zip(unique, states, strict=True))
            if ok:
                if held:
                    conn.execute(_DELETE_HOLDS, (reservation_id,))
                _write_rows(
                    conn,
                    _INSERT_HOLDS,
                    _HOLD_ROW,
                    [(reservation_id, ln.key, ln.bucket, *amounts, expires_at) for ln in unique],
                )
            return ReserveResult(ok=ok, states=spread(states, index))

        return tx

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
        """
        return self._run(self._settle_tx(reservation_id, lines, amounts, record, now, watch))

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
        """Async :meth:`settle` (at once when the file is free: no thread hop)."""
        tx = self._settle_tx(reservation_id, lines, amounts, record, now, watch)
        return await self._arun(tx)

    def _settle_tx(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        now: float,
        watch: Sequence[int] | None,
    ) -> Callable[[sqlite3.Connection], SettleResult]:
        check_amounts(amounts)
        check_record_amounts(record)
        check_texts(reservation_id, lines, record)
        unique, index = distinct_lines(lines)  # a line given twice is charged once
        watch = distinct_watch(watch, index)
        watched = range(len(unique)) if watch is None else sorted(set(watch))

        def after(conn: sqlite3.Connection) -> tuple[LineState | None, ...]:
            # Alerts read settled spend only: the holds are left out (they read 0).
            read = self._states(
                conn, [unique[i] for i in watched], now, limited_only=True, held=False
            )
            states: list[LineState | None] = [None] * len(unique)
            for i, state in zip(watched, read, strict=True):
                states[i] = state
            return spread(states, index)

        def tx(conn: sqlite3.Connection) -> SettleResult:
            cur = conn.execute(_INSERT_USAGE, (reservation_id, *self._record_row(record)))
            if cur.rowcount == 0:
                return SettleResult(applied=False, states=after(conn))
            conn.execute(_DELETE_HOLDS, (reservation_id,))
            _write_rows(
                conn,
                _UPSERT_COUNTERS,
                _COUNTER_ROW,
                [
                    (ln.key, ln.bucket, ln.scope, ln.window, *amounts, ln.expires_at)
                    for ln in unique
                ],
                _ON_COUNTER,
            )
            if now >= self._next_prune:
                for sql in _PRUNE:
                    conn.execute(sql, (now - PRUNE_GRACE,))
                conn.execute(_PURGE_HOLDS, (now,))
                self._next_prune = now + PRUNE_EVERY
            return SettleResult(applied=True, states=after(conn))

        return tx

    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold; True if a live (unexpired) hold was removed."""
        return self._run(self._release_tx(reservation_id, now))

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release` (at once when the file is free)."""
        return await self._arun(self._release_tx(reservation_id, now))

    @staticmethod
    def _release_tx(reservation_id: str, now: float) -> Callable[[sqlite3.Connection], bool]:
        check_text("reservation id", reservation_id)

        def tx(conn: sqlite3.Connection) -> bool:
            live = conn.execute(_DELETE_LIVE_HOLDS, (reservation_id, now)).rowcount
            conn.execute(_DELETE_HOLDS, (reservation_id,))
            return live > 0

        return tx

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line, read in one snapshot (expired holds do not count)."""
        return self._run(lambda conn: self._states(conn, lines, now), write=False)

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status` (at once: a read never waits for writers in WAL mode)."""
        return await self._arun(lambda conn: self._states(conn, lines, now), write=False)

    # -- bookkeeping ---------------------------------------------------------------------------

    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair with a counter, sorted."""
        rows = self._run(lambda conn: conn.execute(_SCOPES).fetchall(), write=False)
        return [(str(scope), str(window)) for scope, window in rows]

    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True for the first claim of ``alert_key``; the row is pruned once long expired."""
        check_text("alert key", alert_key)
        return self._run(lambda c: c.execute(_CLAIM_ALERT, (alert_key, expires_at)).rowcount > 0)

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert` (at once when the file is free)."""
        check_text("alert key", alert_key)
        return await self._arun(
            lambda c: c.execute(_CLAIM_ALERT, (alert_key, expires_at)).rowcount > 0
        )

    def append_usage(self, record: UsageRecord) -> None:
        """Log a record with no spend (a refused call); it is never taken as a settle."""

        self._run(self._append_tx(record))

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage` (at once when the file is free)."""
        await self._arun(self._append_tx(record))

    def _append_tx(self, record: UsageRecord) -> Callable[[sqlite3.Connection], None]:
        check_record_amounts(record)
        check_texts(record=record)

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_USAGE, (None, *self._record_row(record)))

        return tx

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
        queries = _USAGE.get(group_by)
        if queries is None:
            raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
        if scope is not None:
            check_text("scope name", scope)
        params = {"since": since, "until": until, "scope": scope}

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            return (
                conn.execute(queries[0], params).fetchall(),
                conn.execute(queries[1], params).fetchall(),
            )

        rows, nul_rows = self._run(read, write=False)
        return _merge_usage(rows, nul_rows, group_by, scope)

    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """The first ``limit`` records with ``since <= ts < until``, oldest first."""
        params = {"since": since, "until": until, "limit": -1 if limit is None else limit}
        rows = self._run(lambda conn: conn.execute(_RECORDS, params).fetchall(), write=False)
        return [
            UsageRecord(
                ts=r[0],
                reservation_id=r[1],
                scopes=tuple(json.loads(r[2])),
                model=r[3],
                requested_model=r[4],
                action=r[5],
                input_tokens=r[6],
                output_tokens=r[7],
                cached_input_tokens=r[8],
                usd=r[9],
                priced=bool(r[10]),
                estimated=bool(r[11]),
                extra=json.loads(r[12]),
            )
            for r in rows
        ]

    @staticmethod
    def _record_row(r: UsageRecord) -> tuple[Any, ...]:
        return (
            r.ts, r.reservation_id, _scopes_json(r.scopes), r.model,
            r.requested_model, r.action, r.input_tokens, r.output_tokens, r.cached_input_tokens,
            float(r.usd), int(r.priced), int(r.estimated),
            json_text(r.extra) if r.extra else "{}",
        )  # fmt: skip

    def close(self) -> None:
        """Close this process's connections (an in-memory ledger loses its data)."""
        pid = os.getpid()
        with self._conns_lock:
            mine = [c for p, _, c in self._conns if p == pid]
            self._conns = [(p, t, c) for p, t, c in self._conns if p != pid]
        for conn in mine:
            conn.close()
        self._local = threading.local()
        if self._single is not None:
            self._single.close()
