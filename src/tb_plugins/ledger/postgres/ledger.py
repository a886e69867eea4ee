"""The PostgreSQL ledger class: its URL and options, its connection pools, and how a flow's
statements run on a pooled connection (the schema set up on first use, broken connections
retried, late calls cut by the watchdog, errors wrapped), blocking or awaited."""

from __future__ import annotations

import contextlib
import math
import os
import pkgutil
import re
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tb_plugins._lazy import require
from tb_plugins.core.urls import redact_url
from tb_plugins.core.windows import parse_duration
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import _to_thread
from tb_plugins.ledger.flow import Flow
from tb_plugins.ledger.network import url_options
from tb_plugins.ledger.postgres import codec
from tb_plugins.ledger.postgres.operations import PostgresOperations, call, fetchone
from tb_plugins.ledger.postgres.watchdog import WATCHDOG

if TYPE_CHECKING:
    import asyncio

__all__ = ["SCHEMA_SQL", "SCHEMA_VERSION", "PostgresLedger"]

T = TypeVar("T")

SCHEMA_VERSION = 5
SCHEMA_SQL: str = (pkgutil.get_data("tb_plugins.ledger.postgres", "schema.sql") or b"").decode()
"""Tables and functions of the ledger, run with ``search_path`` set to the ledger's schema."""

BREAKER_SECONDS = 1.0  # after a connection wait timed out, fail at once for this long
WATCHDOG_FACTOR = 1.5  # a call is cut after this many ledger timeouts (see watchdog.py)
_OPTIONS = ("schema", "timeout", "pool_min", "pool_max", "synchronous_commit")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
_HAS_META = "SELECT to_regclass('meta') IS NOT NULL"
_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
_SET_VERSION = "UPDATE meta SET value = %s WHERE key = 'schema_version'"
_SETUP_LOCK = "SELECT pg_advisory_xact_lock(%s)"

POOL = "pool"
"""The step that gives this process's pool: the sync one, or the event loop's async one."""
SETUP_WAIT = "setup wait"
"""The step that waits until another thread or task of this process has set the schema up."""

# Pools a forked child inherited: never used, never closed (that would end the parent's
# sessions), and kept referenced so that garbage collection does not touch them either.
_INHERITED: list[Any] = []


class PostgresLedger(PostgresOperations):
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
        super().__init__()
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
        self.url = display_url or redact_url(conninfo)
        self.schema = schema
        self.timeout = float(timeout)
        self.pool_min, self.pool_max = pool_min, pool_max
        params = self._pg.conninfo.conninfo_to_dict(conninfo)
        self.where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        ms = max(int(self.timeout * 1000), 1)
        # Generic plans: the functions' statements are planned once per session, not per call.
        # No bitmap scans: a generic plan guesses a few rows per key, for which a bitmap scan
        # costs more to set up than the index scan it replaces (every statement here reads a
        # handful of rows by key). Both show in the postgres rows of bench_shared_ledgers.py.
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
        if urlsplit(url).scheme.lower() not in cls.schemes:
            raise ConfigError(
                f"not a PostgreSQL ledger URL: {url!r} (use postgresql://user@host/dbname)"
            )
        shown = redact_url(url)
        ours, rest = url_options(url, options, _OPTIONS, "libpq's URL parameters")
        conninfo = urlunsplit(rest._replace(scheme="postgresql"))
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
            "kwargs": {"autocommit": True, "context": codec.adapters(self._pg)},
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
        import asyncio  # an event loop runs: already imported

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
        import asyncio  # the pool was made on an event loop: already imported

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

    # -- the two executors: a step is POOL, SETUP_WAIT or (target, method, args, kwargs) -----

    def _step(self, step: Any) -> Any:
        if step is POOL:
            return self._sync_pool()
        if step is SETUP_WAIT:
            return self._wait_for_setup()
        target, method, args, kwargs = step
        return getattr(target, method)(*args, **kwargs)

    async def _astep(self, step: Any) -> Any:
        if step is POOL:
            return await self._async_pool()
        if step is SETUP_WAIT:
            return await _to_thread(self._wait_for_setup)
        target, method, args, kwargs = step
        return await getattr(target, method)(*args, **kwargs)

    # -- a session: a flow's statements on one pooled connection ------------------------------

    def _session(self, body: Callable[[Any], Flow[T]], *, cleanup: bool = True) -> Flow[T]:
        """``body(connection)`` on a pooled connection (autocommit: each statement its own
        transaction).

        A broken pooled connection is dropped and the call retried on another one (at most
        ``pool_max`` times, each failing at once); a call that outlives its deadline is not.
        After a success, the holds of orphaned reservations are released (``cleanup``).
        """
        self._check_breaker()
        for attempt in range(self.pool_max + 1):
            conn: Any = None
            late = False
            try:
                pool = yield POOL
                conn = yield from call(pool, "getconn")
                try:
                    token = WATCHDOG.arm(conn.pgconn.socket, self._deadline())
                    try:
                        if not self._ready:
                            yield from self._setup(conn)
                        result = yield from body(conn)
                    finally:
                        late = WATCHDOG.disarm(token)
                finally:
                    yield from call(pool, "putconn", conn)
                self._down_until = 0.0
                if cleanup and self._orphans:
                    yield from self._release_orphans()
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

    def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` on a pooled connection, blocking (for tests and maintenance:
        ``fn`` runs its own statements)."""

        def body(conn: Any) -> Flow[T]:
            yield from ()  # no step: fn does its I/O itself
            return fn(conn)

        return self._drive(self._session(body))

    def _one(self, sql: str, params: Any = ()) -> Any:
        """One statement, blocking: the first column of its first row."""
        return self._drive(self._fetch(sql, params))

    def _deadline(self) -> float:
        """Seconds a call may take before its connection is closed under it: past the
        server's statement_timeout (a live server answers by then), longer for the schema
        setup of the first call."""
        return self.timeout * (WATCHDOG_FACTOR if self._ready else 10.0)

    def _setup(self, conn: Any) -> Flow[None]:
        """Create the schema on first use: once per database and schema (the DDL runs under an
        advisory lock, and only if the version recorded under that lock is older), and once
        per process (its threads and tasks wait for the first; a session that waited for the
        advisory lock may not see a schema created meanwhile)."""
        while not self._setup_lock.acquire(blocking=False):
            yield SETUP_WAIT
        try:
            if self._ready or (yield from self._current(conn)):
                self._ready = True
                return
            yield from call(conn, "execute", "BEGIN")
            try:
                lock_id = int.from_bytes(codec.sha(f"tb_plugins:{self.schema}")[:8], "big",
                                         signed=True)  # fmt: skip
                yield from call(conn, "execute", _SETUP_LOCK, (lock_id,))
                if not (yield from self._current(conn)):
                    sql = self._pg.sql
                    create = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
                    yield from call(conn, "execute", create.format(sql.Identifier(self.schema)))
                    yield from call(conn, "execute", SCHEMA_SQL)
                    yield from call(conn, "execute", _SET_VERSION, (str(SCHEMA_VERSION),))
                yield from call(conn, "execute", "COMMIT")
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(Exception):
                        yield from call(conn, "execute", "ROLLBACK")
                raise
            self._ready = True
        finally:
            self._setup_lock.release()

    def _wait_for_setup(self) -> None:
        with self._setup_lock:
            pass

    def _current(self, conn: Any) -> Flow[bool]:
        """Whether the schema is there at this code's version; raises when it is newer."""
        if not (yield from fetchone(conn, _HAS_META, None))[0]:
            return False
        row = yield from fetchone(conn, _VERSION, None)
        if row is None:
            return False
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"PostgreSQL ledger at {self.where} (schema {self.schema}) has schema version "
                f"{version}, newer than this tb_plugins understands ({SCHEMA_VERSION}); "
                f"upgrade tb-plugins"
            )
        return version == SCHEMA_VERSION

    # -- errors ------------------------------------------------------------------------------

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

    def _reply_lost(self, exc: LedgerUnavailable) -> bool:
        """The statement may have reached the server and committed: the connection broke or
        was cut by the watchdog before the reply came. Not when nothing was sent (no
        connection, the breaker) or the server cancelled it (``statement_timeout`` rolls
        back)."""
        cause = exc.__cause__
        not_sent = self._pg_pool.PoolTimeout | self._pg.errors.QueryCanceled
        return cause is not None and not isinstance(cause, not_sent)

    def close(self) -> None:
        """Close this process's connections (and those of an async pool whose loop ended)."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close(timeout=self.timeout)
        self._drop_async_pool()

    async def aclose(self) -> None:
        """Close the connections of the running event loop, and the sync ones."""
        import asyncio  # an event loop runs: already imported

        if self._apool is not None and self._aloop is asyncio.get_running_loop():
            pool, self._apool, self._aloop = self._apool, None, None
            await pool.close(timeout=self.timeout)
        self.close()
