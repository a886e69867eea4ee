"""The SQLite ledger class: its file, its connections, and how a transaction runs.

A transaction runs on this thread's connection, after the in-process writer lock of its file
(:class:`~tb_plugins.ledger.sqlite.locks.FairLock`), and is retried with a bounded backoff
while another process holds the file. From an event loop it runs at once on the loop's thread
when the file is free, and in a worker thread when it is not: a transaction is shorter than a
hop to a worker and back (``benchmarks/bench_litellm_proxy.py``, a SQLite ledger behind the
LiteLLM proxy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import _to_thread
from tb_plugins.ledger.sqlite import schema
from tb_plugins.ledger.sqlite.locks import FairLock
from tb_plugins.ledger.sqlite.operations import SQLiteOperations, Step

if TYPE_CHECKING:
    import asyncio

__all__ = ["SQLiteLedger"]

T = TypeVar("T")
logger = logging.getLogger("tb_plugins")


class _Busy:
    """The ledger was locked: nothing was done (see :meth:`SQLiteLedger._run_now`)."""


BUSY = _Busy()

CHECKPOINT_EVERY = 100  # write transactions on an event loop between two checkpoints
FILE_CHECK_EVERY = 0.5  # seconds (monotonic) between two checks that the file is still ours
_clock = time.monotonic  # the clock of those checks (tests replace it)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.0005, 0.05  # seconds, retry of a locked file (with jitter)
_LOCK_TYPE = type(threading.Lock())
_BUSY_MARKERS = ("database is locked", "database table is locked", "database is busy")
_UNAVAILABLE_MARKERS = ("unable to open", "disk i/o error", "readonly", "read-only")

_INHERITED: list[sqlite3.Connection] = []  # parent connections a forked child must not close
_LEDGERS: weakref.WeakSet[SQLiteLedger] = weakref.WeakSet()
_WRITERS: dict[str, FairLock] = {}  # one writer lock per file (see FairLock)
_WRITERS_GUARD = threading.Lock()


def _writer_lock(path: str) -> FairLock:
    with _WRITERS_GUARD:
        lock = _WRITERS.get(path)
        if lock is None:
            lock = _WRITERS[path] = FairLock()
        return lock


def _after_fork_in_child() -> None:
    global _WRITERS_GUARD
    _WRITERS.clear()  # a parent's thread may have held one at fork time
    _WRITERS_GUARD = threading.Lock()
    for ledger in list(_LEDGERS):
        ledger._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_busy(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.Error) and any(m in str(exc).lower() for m in _BUSY_MARKERS)


def _transact(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
    """``fn(conn)`` in one transaction, rolled back if it fails."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return result


class SQLiteLedger(SQLiteOperations):
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

    # -- connections ---------------------------------------------------------------------------

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
                # A checkpoint flushes the file to disk: never on an event loop (see _astep).
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

    # -- transactions --------------------------------------------------------------------------

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
                    return _transact(conn, fn, write)
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                raise self._wrap(exc) from exc

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
                    return _transact(conn, fn, write)
                except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                    if _is_busy(exc):
                        return BUSY
                    raise self._wrap(exc) from exc
            finally:
                if locked is not None:
                    locked.release()
        finally:
            if writer is not None:
                writer.release()

    # -- the two executors: a step is (mode, fn) ----------------------------------------------

    def _step(self, step: Step) -> Any:
        mode, fn = step
        return self._run(fn, write=mode.write)

    async def _astep(self, step: Step) -> Any:
        """At once when the ledger is free (and the transaction short), else in a worker
        thread that waits."""
        mode, fn = step
        result = self._run_now(fn, write=mode.write) if mode.inline else BUSY
        if isinstance(result, _Busy):
            return await _to_thread(self._run, fn, write=mode.write)
        if mode.write and not self._memory:
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

    def _wrap(self, exc: Exception) -> LedgerError:
        text = str(exc)
        if not isinstance(exc, sqlite3.Error):  # a value Python could not hand to SQLite
            if isinstance(exc, OverflowError):
                return LedgerError(f"SQLite ledger {self.path}: amount out of range: {exc}")
            return LedgerError(f"SQLite ledger {self.path}: {type(exc).__name__}: {exc}")
        if _is_busy(exc):
            return LedgerUnavailable(
                f"SQLite ledger {self.path}: still locked by another writer after "
                f"{self._timeout:g}s ({text})"
            )
        if any(marker in text.lower() for marker in _UNAVAILABLE_MARKERS):
            return LedgerUnavailable(f"SQLite ledger {self.path}: {text}")
        if "integer overflow" in text.lower():  # a sum past 2**63 - 1 (see schema.ON_COUNTER)
            return LedgerError(
                f"SQLite ledger {self.path}: amount out of range: a sum would pass "
                f"2**63 - 1 ({text}); nothing was written"
            )
        return LedgerError(f"SQLite ledger {self.path}: {text}")

    # -- the schema ----------------------------------------------------------------------------

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # no meta table yet
            row = conn.execute(schema.VERSION).fetchone()
            if row is not None and int(row[0]) >= schema.SCHEMA_VERSION:
                self._check_version(int(row[0]))
                if conn.execute(schema.HAS_OVERRIDES).fetchone() is None:
                    _transact(conn, schema.create_always, write=True)
                return
        if not self._memory:
            conn.execute(f"PRAGMA page_size={schema.PAGE_SIZE}")  # takes on a new file only
            conn.execute("PRAGMA journal_mode=WAL")
        self._check_version(_transact(conn, schema.create_or_migrate, write=True))

    def _check_version(self, version: int) -> None:
        if version > schema.SCHEMA_VERSION:
            raise LedgerError(
                f"SQLite ledger {self.path} has schema version {version}, newer than this "
                f"tb_plugins understands ({schema.SCHEMA_VERSION}); upgrade tb-plugins"
            )

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
