"""What is particular to the PostgreSQL ledger: URL options, the versioned schema created on
first use, lock order under concurrency, timeouts, reconnection, fork, pruning and asyncio.

The ledger contract itself is proved by the conformance suite; the cross-process and failure
behaviours by ``test_shared_ledgers.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tb_plugins.core.usage import REQUESTS, TOKENS, ZERO, add, amounts
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger import LineState, ledger_from_url
from tb_plugins.ledger.postgres import SCHEMA_VERSION, PostgresLedger
from test_shared_ledgers import (
    PG_DSN,
    PG_PORT,
    T0,
    TTL,
    Proxy,
    drop_pg_schema,
    fresh_pg_schema,
    make_line,
    pg_url,
    usage_record,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name on the shared PostgreSQL, dropped afterwards."""
    yield from fresh_pg_schema()


@pytest.fixture
def ledger(pg_schema: str) -> Iterator[PostgresLedger]:
    led = ledger_from_url(pg_url(pg_schema, timeout=1))
    assert isinstance(led, PostgresLedger)
    yield led
    led.close()


def sql(query: str, *params: Any, schema: str | None = None) -> list[Any]:
    """Run one statement on a connection of its own (a second session)."""
    import psycopg

    options = f"-c search_path={schema}" if schema else ""
    with psycopg.connect(PG_DSN, autocommit=True, options=options) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


# -- URL and options -----------------------------------------------------------------------------


def test_url_options_and_keywords_configure_the_ledger() -> None:
    """schema, timeout and pool sizes come from the URL query, keywords win, libpq parameters
    pass through, and the password never shows."""
    led = ledger_from_url(
        "postgres://tb:pw@db.example:6543/app?schema=budgets&timeout=3&sslmode=disable"
        "&application_name=proxy 1",
        pool_max=8,
    )
    assert isinstance(led, PostgresLedger)
    assert (led.schema, led.timeout, led.pool_min, led.pool_max) == ("budgets", 3.0, 1, 8)
    assert led.where == "db.example:6543"
    assert "pw" not in led.url and "pw" not in repr(led)
    assert "sslmode=disable" in led._conninfo and "application_name='proxy 1'" in led._conninfo
    assert "statement_timeout=3000" in led._conninfo and "connect_timeout=3" in led._conninfo
    led.close()


def test_synchronous_commit_comes_from_the_url_or_a_keyword() -> None:
    """``synchronous_commit`` (URL query or keyword, which wins) becomes a setting of the
    ledger's sessions; without it the server's own setting applies."""
    led = ledger_from_url("postgresql://h/db?synchronous_commit=off")
    assert isinstance(led, PostgresLedger)
    assert led.synchronous_commit == "off"
    assert "-c synchronous_commit=off" in led._conninfo
    led.close()
    led = ledger_from_url("postgresql://h/db?synchronous_commit=off", synchronous_commit="ON")
    assert isinstance(led, PostgresLedger)
    assert led.synchronous_commit == "on" and "-c synchronous_commit=on" in led._conninfo
    led.close()
    led = ledger_from_url("postgresql://h/db")
    assert isinstance(led, PostgresLedger)
    assert led.synchronous_commit is None and "synchronous_commit" not in led._conninfo
    led.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("postgresql://h/db", {"pool": 3}, "unknown option"),
        ("postgresql://h/db?schema=Budgets", {}, "lowercase"),
        ("postgresql://h/db?schema=a;drop", {}, "lowercase"),
        ("postgresql://h/db?timeout=soon", {}, "not a duration"),
        ("postgresql://h/db?pool_min=5&pool_max=2", {}, "pool_min"),
        ("postgresql://h/db?synchronous_commit=sometimes", {}, "synchronous_commit"),
        ("postgresql://h/db", {"synchronous_commit": "no"}, "synchronous_commit must be one"),
    ],
)
def test_bad_options_are_refused_with_a_config_error(
    url: str, options: dict[str, Any], message: str
) -> None:
    """An unknown option, a schema name that is not a plain lowercase identifier, a bad duration
    or impossible pool sizes is a ConfigError that says which."""
    with pytest.raises(ConfigError, match=message):
        ledger_from_url(url, **options)


# -- schema --------------------------------------------------------------------------------------


def test_the_schema_is_created_on_first_use_and_versioned(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """Opening the ledger creates nothing; the first call creates the schema, its tables and
    functions, and records the schema version."""
    assert sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", pg_schema) == []
    ledger.status([make_line("user:a")], now=T0)
    assert sql("SELECT value FROM meta", schema=pg_schema) == [(str(SCHEMA_VERSION),)]
    tables = {r[0] for r in sql(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s", pg_schema)}  # fmt: skip
    assert tables == {
        "meta", "lines", "counters", "holds", "usage", "usage_scopes", "alerts", "overrides"
    }  # fmt: skip
    persistence = dict(sql("SELECT relname, relpersistence FROM pg_class c JOIN pg_namespace n "
                           "ON n.oid = c.relnamespace WHERE nspname = %s AND relkind = 'r'",
                           pg_schema))  # fmt: skip
    assert persistence.pop("holds") == "u"  # transient: not WAL-logged
    assert set(persistence.values()) == {"p"}


def test_an_older_schema_is_upgraded_in_place_keeping_its_data(pg_schema: str) -> None:
    """A schema at version 1 (holds WAL-logged and indexed by expiry, no version-2 functions)
    is upgraded by the first call of a newer ledger, under the setup lock: the version is
    recorded, the holds table becomes unlogged, the spend and the live holds are kept, and the
    upgraded ledger reserves and settles on them."""
    first = ledger_from_url(pg_url(pg_schema))
    ln = make_line("user:a", tokens=100)
    amt = amounts(30, 0, 0)
    first.settle("old", [ln], amt, usage_record("old", [ln], amt), now=T0)
    assert first.reserve("held", [ln], amt, now=T0, expires_at=T0 + TTL).ok
    first.close()
    for statement in (
        "ALTER TABLE holds SET LOGGED",
        "CREATE INDEX holds_expires_at ON holds (expires_at)",
        "ALTER TABLE counters RESET (fillfactor)",
        "DROP FUNCTION tb_reserve2, tb_settle2, tb_release2, tb_states2",
        "DROP AGGREGATE tb_sum(bigint)",
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
    ):
        sql(statement, schema=pg_schema)
    upgraded = ledger_from_url(pg_url(pg_schema))
    try:
        (state,) = upgraded.status([ln], now=T0)
        assert (state.spent[TOKENS], state.held[TOKENS]) == (30, 30)
        assert sql("SELECT value FROM meta", schema=pg_schema) == [(str(SCHEMA_VERSION),)]
        assert sql("SELECT relpersistence FROM pg_class c JOIN pg_namespace n ON "
                   "n.oid = c.relnamespace WHERE nspname = %s AND relname = 'holds'",
                   pg_schema) == [("u",)]  # fmt: skip
        assert sql("SELECT to_regclass('holds_expires_at')", schema=pg_schema) == [(None,)]
        assert not upgraded.reserve("r2", [ln], amounts(41, 0, 0), now=T0,
                                    expires_at=T0 + TTL).ok  # fmt: skip
        rec = usage_record("held", [ln], amt)
        assert upgraded.settle("held", [ln], amt, rec, now=T0).states == (
            LineState(spent=add(amt, amt), held=ZERO),
        )
    finally:
        upgraded.close()


def test_many_processes_opening_a_new_schema_at_once_create_it_once(
    pg_schema: str,
) -> None:
    """Eight ledgers making their first call on a new schema at the same moment all succeed
    (the setup runs under an advisory lock)."""
    ledgers = [ledger_from_url(pg_url(pg_schema)) for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def first_call(led: Any) -> None:
        start.wait()
        try:
            led.status([make_line("user:a")], now=T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(led,)) for led in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for led in ledgers:
        led.close()
    assert errors == []


def test_a_schema_newer_than_the_code_is_refused(ledger: PostgresLedger, pg_schema: str) -> None:
    """A ledger whose schema version is newer than this tb_plugins refuses to run on it."""
    ledger.status([make_line("user:a")], now=T0)
    sql("UPDATE meta SET value = '99'", schema=pg_schema)
    newer = ledger_from_url(pg_url(pg_schema))
    with pytest.raises(LedgerError, match="schema version 99, newer"):
        newer.status([make_line("user:a")], now=T0)
    newer.close()


def test_two_schemas_in_one_database_are_two_separate_ledgers(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """Ledgers in different schemas share nothing, even for the same scope."""
    other = ledger_from_url(pg_url(pg_schema + "_b"))
    ln = make_line("user:a", tokens=100)
    try:
        assert ledger.reserve("r", [ln], amounts(100, 0, 0), now=T0, expires_at=T0 + TTL).ok
        assert other.reserve("r", [ln], amounts(100, 0, 0), now=T0, expires_at=T0 + TTL).ok
    finally:
        other.close()
        drop_pg_schema(pg_schema + "_b")


# -- locking -------------------------------------------------------------------------------------


def test_reservations_in_opposite_line_orders_never_deadlock(ledger: PostgresLedger) -> None:
    """Threads reserving the same lines listed in opposite orders all finish, admit exactly
    the limit and never hit a deadlock (lines are locked in one global order)."""
    a = make_line("team:a", requests=120)
    b = make_line("team:b")
    c = make_line("team:c", "rolling:1m")
    orders = [[a, b, c], [c, b, a], [b, a, c], [c, a, b]]
    admitted: list[int] = []
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        lines = orders[worker % len(orders)]
        n = 0
        try:
            for i in range(40):
                rid = f"w{worker}-{i}"
                amt = amounts(1, 0, 0)
                if ledger.reserve(rid, lines, amt, now=T0, expires_at=T0 + TTL).ok:
                    n += 1
                    ledger.settle(rid, lines[::-1], amt, usage_record(rid, lines, amt), now=T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        admitted.append(n)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(admitted) == 120
    states = ledger.status([a, b, c], now=T0)
    assert [s.spent[REQUESTS] for s in states] == [120, 120, 120]
    assert all(s.held == ZERO for s in states)


def test_a_lock_held_past_the_timeout_is_ledger_unavailable_not_a_hang(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """A reservation waiting on a line another session keeps locked gives up after the
    statement timeout with LedgerUnavailable."""
    import psycopg

    ln = make_line("user:a", tokens=100)
    ledger.status([ln], now=T0)
    ledger.reserve("first", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
    with psycopg.connect(PG_DSN, options=f"-c search_path={pg_schema}") as blocker:
        blocker.execute("SELECT 1 FROM lines FOR UPDATE")
        start = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="did not answer within 1s"):
            ledger.reserve("second", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
        assert time.monotonic() - start < 2 * ledger.timeout
        blocker.rollback()
    assert ledger.reserve("third", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL).ok


# -- durability and the hot path --------------------------------------------------------------


def _commit_mode(ledger: PostgresLedger, statement: str, args: tuple[Any, ...]) -> str:
    """The synchronous_commit in force at the end of ``statement``'s transaction (run in an
    explicit transaction on one of the ledger's own sessions, then rolled back)."""

    def run(conn: Any) -> str:
        conn.execute("BEGIN")
        try:
            conn.execute(statement, args, binary=True)
            mode: str = conn.execute("SHOW synchronous_commit").fetchone()[0]
        finally:
            conn.execute("ROLLBACK")
        return mode

    return ledger._run(run)


def test_reserve_and_release_commit_asynchronously_and_settle_durably(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """A reservation and a release switch synchronous_commit off for their own transaction
    only; a settle keeps the session's setting (durable by default), unless the ledger was
    opened with synchronous_commit=off."""
    from tb_plugins.ledger.postgres import codec
    from tb_plugins.ledger.postgres import operations as pg

    ln = make_line("user:a", tokens=100)
    amt = amounts(5, 0, 0)
    ledger.status([ln], now=T0)
    ledger.reserve("seed", [ln], amt, now=T0, expires_at=T0 + TTL)  # the line exists
    reserve = ledger._reserve_args("r", [ln], amt, T0, T0 + TTL)
    settle = ledger._settle_args("r", [ln], amt, usage_record("r", [ln], amt), T0, [0])
    assert _commit_mode(ledger, pg._RESERVE, reserve) == "off"
    assert _commit_mode(ledger, pg._RELEASE, (codec.sha("seed"), T0)) == "off"
    assert _commit_mode(ledger, pg._SETTLE, settle) == "on"
    assert ledger._one("SHOW synchronous_commit") == "on"  # nothing leaked into the session
    fast = ledger_from_url(pg_url(pg_schema, synchronous_commit="off"))
    assert isinstance(fast, PostgresLedger)
    try:
        assert _commit_mode(fast, pg._SETTLE, settle) == "off"
        assert fast.settle("r", [ln], amt, usage_record("r", [ln], amt), now=T0).applied
        assert fast.status([ln], now=T0)[0].spent[TOKENS] == 5
    finally:
        fast.close()


def test_settle_reads_back_exactly_the_watched_lines(ledger: PostgresLedger) -> None:
    """settle(watch=...) returns the state of each watched line (a line listed twice
    included) and None for every other line; watch=None reads them all."""
    a, b, c = make_line("team:a", tokens=100), make_line("user:b"), make_line("user:c", "hour")
    amt = amounts(7, 0, 0)
    lines = [a, b, c, a]
    assert ledger.reserve("r1", lines, amt, now=T0, expires_at=T0 + TTL).ok
    res = ledger.settle("r1", lines, amt, usage_record("r1", lines, amt), now=T0, watch=[1])
    spent = LineState(spent=amt, held=ZERO)
    assert res.applied and res.states == (None, spent, None, None)
    again = ledger.settle("r1", lines, amt, usage_record("r1", lines, amt), now=T0, watch=[3])
    assert not again.applied and again.states == (spent, None, None, spent)
    none = ledger.settle("r2", lines, amt, usage_record("r2", lines, amt), now=T0, watch=[])
    assert none.applied and none.states == (None, None, None, None)
    every = ledger.settle("r3", lines, amt, usage_record("r3", lines, amt), now=T0)
    three = LineState(spent=add(add(amt, amt), amt), held=ZERO)
    assert every.applied and every.states == (three, three, three, three)


def test_a_retried_reservation_on_other_lines_leaves_no_hold_behind(
    ledger: PostgresLedger,
) -> None:
    """Reserving an id again on other lines moves its hold there; refused, it keeps the old."""
    a, b = make_line("user:a", tokens=100), make_line("user:b", tokens=100)
    assert ledger.reserve("r", [a], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert ledger.reserve("r", [b], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert [s.held[TOKENS] for s in ledger.status([a, b], now=T0)] == [0, 60]
    assert not ledger.reserve("r", [a], amounts(101, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert [s.held[TOKENS] for s in ledger.status([a, b], now=T0)] == [0, 60]


# -- connections ---------------------------------------------------------------------------------


def test_a_terminated_session_is_replaced_without_failing_the_call(
    pg_schema: str,
) -> None:
    """pg_terminate_backend of every ledger session (a restart, a failover) costs no call: the
    broken connection is dropped and the call retried on a new one."""
    name = f"tb-victim-{pg_schema}"
    led = ledger_from_url(pg_url(pg_schema, application_name=name, pool_min=2))
    ln = make_line("user:a")
    amt = amounts(3, 0, 0)
    led.settle("a", [ln], amt, usage_record("a", [ln], amt), now=T0)
    killed = sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE application_name = %s", name)  # fmt: skip
    assert killed and all(ok for (ok,) in killed)
    led.settle("b", [ln], amt, usage_record("b", [ln], amt), now=T0)
    assert led.status([ln], now=T0)[0].spent[TOKENS] == 6
    led.close()


def test_a_forked_child_opens_its_own_pool(ledger: PostgresLedger) -> None:
    """After os.fork() the child's calls use a pool of its own and land in the same ledger,
    and the parent's connections keep working."""
    ln = make_line("user:a")
    amt = amounts(5, 0, 0)
    ledger.settle("parent", [ln], amt, usage_record("parent", [ln], amt), now=T0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            res = ledger.settle("child", [ln], amt, usage_record("child", [ln], amt), now=T0)
            code = 0 if res.applied else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ledger.status([ln], now=T0)[0].spent[TOKENS] == 10


def test_the_async_pool_follows_the_running_event_loop(ledger: PostgresLedger) -> None:
    """Async twins work from one event loop and then from another (a pool per loop), and the
    old loop's connections are closed."""
    ln = make_line("user:a", tokens=100)

    async def reserve(rid: str) -> bool:
        ok = (await ledger.areserve(rid, [ln], amounts(40, 0, 0), now=T0,
                                    expires_at=T0 + TTL)).ok  # fmt: skip
        assert await ledger.aserver_time() > 0
        return ok

    assert asyncio.run(reserve("a")) is True
    assert asyncio.run(reserve("b")) is True
    assert asyncio.run(reserve("c")) is False
    assert ledger.status([ln], now=T0)[0].held[TOKENS] == 80

    async def close() -> None:
        await ledger.aclose()

    asyncio.run(close())


def test_server_time_is_the_database_clock(ledger: PostgresLedger) -> None:
    """server_time() reads the database's clock."""
    (db_now,) = sql("SELECT extract(epoch FROM clock_timestamp())::float8")[0]
    assert abs(ledger.server_time() - db_now) < 1.0


# -- housekeeping --------------------------------------------------------------------------------


def test_prune_deletes_what_stopped_counting_a_day_ago_and_keeps_the_rest(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """prune() deletes expired holds, counters of windows that ended over a day ago, the lines
    left with neither and old alert claims; current ones stay."""
    old, cur, forever = make_line("user:old", "minute"), make_line("user:cur"), make_line(
        "user:x", "total")  # fmt: skip
    amt = amounts(1, 0, 0)
    for rid, ln in (("o", old), ("c", cur), ("f", forever)):
        ledger.settle(rid, [ln], amt, usage_record(rid, [ln], amt), now=T0)
    ledger.reserve("dead", [cur], amt, now=T0, expires_at=T0 + 60)
    ledger.claim_alert("old-alert", expires_at=T0)
    assert old.expires_at is not None
    removed = ledger.prune(old.expires_at + 86_400 + 61)
    assert removed == 4  # the hold, the old counter, its line, the alert
    assert sorted(ledger.scopes()) == [("user:cur", "day"), ("user:x", "total")]
    assert sql("SELECT count(*) FROM holds", schema=pg_schema) == [(0,)]
    assert ledger.claim_alert("old-alert", expires_at=None) is True
    assert ledger.status([cur, forever], now=T0)[0].spent[TOKENS] == 1


# -- replies lost: reserve, settle ---------------------------------------------------------------

_SETTLE_SIGNATURE = (
    "bytea, bytea[], bigint[], bigint[], double precision[], bigint[], double precision, int[], "
    "double precision, text, text, text, text, text, bigint, bigint, bigint, double precision, "
    "boolean, boolean, text, bytea[], text[], bytea"
)
_LOG_SIGNATURE = (
    "bytea, double precision, text, text, text, text, text, bigint, bigint, bigint, "
    "double precision, boolean, boolean, text, bytea[], text[], bytea"
)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """A TCP proxy in front of the shared PostgreSQL that a test can make lose replies."""
    p = Proxy(PG_PORT)
    yield p
    p.close()


def _held(schema: str) -> int:
    return int(sql("SELECT count(*) FROM holds", schema=schema)[0][0])


def test_a_reserve_whose_reply_was_lost_is_released_at_the_next_call(
    pg_schema: str, proxy: Proxy
) -> None:
    """A reservation that committed on the server while its reply was lost (the watchdog cut
    the connection) holds anyway; the ledger remembers its id and releases that phantom hold
    right after its next successful call; a later settle or release of the id is harmless."""
    led = ledger_from_url(pg_url(pg_schema, port=proxy.port, timeout=0.5))
    ln = make_line("user:a", tokens=100)
    try:
        led.reserve("seed", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)  # the line
        led.release("seed", now=T0)
        proxy.mode = "drop_replies"
        with pytest.raises(LedgerUnavailable):
            led.reserve("lost", [ln], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL)
        proxy.mode = "pass"
        assert _held(pg_schema) == 1  # it committed
        deadline = time.monotonic() + 15
        while True:  # the next call that gets through (the pool reconnects)
            try:
                led.status([ln], now=T0)
                break
            except LedgerUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert _held(pg_schema) == 0
        assert led.release("lost", now=T0) is False
        rec = usage_record("lost", [ln], amounts(5, 0, 0))
        assert led.settle("lost", [ln], amounts(5, 0, 0), rec, now=T0).applied
        assert led.status([ln], now=T0)[0] == LineState(spent=amounts(5, 0, 0), held=ZERO)
    finally:
        led.close()


def test_a_statement_cancelled_by_its_timeout_leaves_no_orphan(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """A reserve cancelled by statement_timeout rolled back: nothing to release later."""
    import psycopg

    ln = make_line("user:a", tokens=100)
    ledger.reserve("first", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
    with psycopg.connect(PG_DSN, options=f"-c search_path={pg_schema}") as blocker:
        blocker.execute("SELECT 1 FROM lines FOR UPDATE")
        with pytest.raises(LedgerUnavailable, match="did not answer"):
            ledger.reserve("second", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
        blocker.rollback()
    assert ledger._orphans == {}


async def test_an_async_reserve_whose_reply_was_lost_is_released_at_the_next_call(
    ledger: PostgresLedger, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twins do the same: an areserve that committed but whose reply was lost is
    released right after the next successful async call."""
    import psycopg

    ln = make_line("user:a", tokens=100)
    await ledger.areserve("seed", [ln], amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
    await ledger.arelease("seed", now=T0)  # the line exists: the next reserve writes at once
    real = psycopg.AsyncConnection.execute
    lost: list[str] = []

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        cur = await real(self, query, *args, **kwargs)
        if "tb_reserve2" in str(query) and not lost:
            await cur.fetchone()  # it ran and committed (autocommit)
            lost.append(str(query))
            raise psycopg.OperationalError("consuming input failed (simulated lost reply)")
        return cur

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", execute)
    with pytest.raises(LedgerUnavailable):
        await ledger.areserve("lost", [ln], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL)
    assert lost and _held(pg_schema) == 1
    await ledger.astatus([ln], now=T0)
    assert _held(pg_schema) == 0
    await ledger.aclose()


def test_a_settle_retried_after_a_broken_connection_says_applied_and_counts_once(
    ledger: PostgresLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a settle committed but its connection broke before the reply, the ledger runs it
    again on another connection; the retry recognizes its own earlier run (its token):
    applied=True, spend counted and logged once. A second settle call still says False."""
    import psycopg

    ln = make_line("user:a", tokens=100)
    amt = amounts(30, 0, 0)
    assert ledger.reserve("r", [ln], amt, now=T0, expires_at=T0 + TTL).ok
    real = psycopg.Connection.execute
    runs: list[str] = []

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        cur = real(self, query, *args, **kwargs)
        if "tb_settle2" in str(query):
            runs.append(str(query))
            if len(runs) == 1:
                cur.fetchone()  # it ran and committed (autocommit)
                self.close()  # ... and the connection died before the reply was read
                raise psycopg.OperationalError("server closed the connection (simulated)")
        return cur

    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    result = ledger.settle("r", [ln], amt, usage_record("r", [ln], amt), now=T0)
    assert len(runs) == 2  # ran twice: the first reply was lost
    assert result.applied is True
    assert result.states == (LineState(spent=amt, held=ZERO),)
    again = ledger.settle("r", [ln], amt, usage_record("r", [ln], amt), now=T0)
    assert again.applied is False
    assert ledger.status([ln], now=T0) == (LineState(spent=amt, held=ZERO),)
    assert len(ledger.records()) == 1


def test_a_version_2_schema_is_upgraded_to_3_keeping_its_data(pg_schema: str) -> None:
    """A schema at version 2 (no settle tokens) is upgraded in place by the first call of a
    newer ledger: spend, holds and log are kept, records of version 2 (no token) still count
    as settled by another call, and new settles carry their token."""
    first = ledger_from_url(pg_url(pg_schema))
    ln = make_line("user:a", tokens=100)
    amt = amounts(30, 0, 0)
    first.settle("old", [ln], amt, usage_record("old", [ln], amt), now=T0)
    assert first.reserve("held", [ln], amt, now=T0, expires_at=T0 + TTL).ok
    first.close()
    for statement in (
        f"DROP FUNCTION tb_settle2({_SETTLE_SIGNATURE})",
        f"DROP FUNCTION tb_log({_LOG_SIGNATURE})",
        "ALTER TABLE usage DROP COLUMN settle_token",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    ):
        sql(statement, schema=pg_schema)
    upgraded = ledger_from_url(pg_url(pg_schema))
    try:
        (state,) = upgraded.status([ln], now=T0)
        assert (state.spent[TOKENS], state.held[TOKENS]) == (30, 30)
        assert sql("SELECT value FROM meta", schema=pg_schema) == [(str(SCHEMA_VERSION),)]
        assert not upgraded.settle("old", [ln], amt, usage_record("old", [ln], amt), now=T0).applied
        assert upgraded.settle("held", [ln], amt, usage_record("held", [ln], amt), now=T0).applied
        tokens = sql("SELECT reservation_id, settle_token IS NOT NULL FROM usage ORDER BY id",
                     schema=pg_schema)  # fmt: skip
        assert tokens == [("old", False), ("held", True)]
    finally:
        upgraded.close()


# The hold filters of tb_states2 and tb_reserve2 at version 3 (a hold counted only while its
# bucket was in the window, on every line), and what version 4 has in their place.
_V3_HOLD_FILTERS = (
    (
        "(p_lows[t.i] < p_buckets[t.i]\n"
        "                       OR bucket BETWEEN p_lows[t.i] AND p_buckets[t.i])",
        "bucket BETWEEN p_lows[t.i] AND p_buckets[t.i]",
    ),
    ("(t.lo < t.b OR bucket BETWEEN t.lo AND t.b)", "bucket BETWEEN t.lo AND t.b"),
)


def test_a_version_3_schema_gets_the_functions_that_count_rolling_holds_in_full(
    pg_schema: str,
) -> None:
    """A schema at version 3, whose functions dropped a live hold on a rolling line once its
    bucket left the window, is upgraded by the first call of a newer ledger: the functions
    are replaced (same signatures, so a process already running sees the fix too), and the
    hold counts in status and reserve again."""
    from tb_plugins.ledger.postgres import SCHEMA_SQL

    v3_sql = SCHEMA_SQL
    for v4_filter, v3_filter in _V3_HOLD_FILTERS:
        assert v3_sql.count(v4_filter) == 1
        v3_sql = v3_sql.replace(v4_filter, v3_filter)
    running = ledger_from_url(pg_url(pg_schema))
    amt = amounts(908, 0, 0)
    ln = make_line("team:a", "rolling:1m", tokens=1_000)
    assert running.reserve("held", [ln], amt, now=T0, expires_at=T0 + 86_400).ok
    sql(v3_sql, schema=pg_schema)
    sql("UPDATE meta SET value = '3' WHERE key = 'schema_version'", schema=pg_schema)
    later = make_line("team:a", "rolling:1m", now=T0 + 61, tokens=1_000)
    (state,) = running.status([later], now=T0 + 61)
    assert state.held[TOKENS] == 0  # version 3's functions: the bug this upgrade fixes
    upgraded = ledger_from_url(pg_url(pg_schema))
    try:
        (state,) = upgraded.status([later], now=T0 + 61)
        assert state.held[TOKENS] == 908
        assert sql("SELECT value FROM meta", schema=pg_schema) == [(str(SCHEMA_VERSION),)]
        assert SCHEMA_VERSION == 5  # version 4 counted rolling holds; 5 added overrides
        assert not upgraded.reserve("r2", [later], amt, now=T0 + 61, expires_at=T0 + TTL).ok
        assert running.status([later], now=T0 + 61)[0].held[TOKENS] == 908
    finally:
        upgraded.close()
        running.close()


def test_a_sum_past_64_bits_in_the_database_is_a_ledger_error_not_unavailable(
    ledger: PostgresLedger,
) -> None:
    """PostgreSQL's "bigint out of range" (a counter that would pass 2**63 - 1) is a
    LedgerError saying "amount out of range", and the transaction wrote nothing."""
    ln = make_line("user:a", "total")
    top = (2**63 - 1, 0, 0, 0, 1, 1)
    ledger.settle("s1", [ln], top, usage_record("s1", [ln], top), now=T0)
    one = amounts(1, 0, 0)
    with pytest.raises(LedgerError, match="amount out of range: bigint out of range") as info:
        ledger.settle("s2", [ln], one, usage_record("s2", [ln], one), now=T0)
    assert not isinstance(info.value, LedgerUnavailable)
    assert ledger.status([ln], now=T0)[0].spent[TOKENS] == 2**63 - 1
    assert [r.reservation_id for r in ledger.records()] == ["s1"]


def test_nul_in_names_is_escaped_in_text_columns_and_read_back_exactly(
    ledger: PostgresLedger, pg_schema: str
) -> None:
    """PostgreSQL text cannot hold NUL: the log stores it as U+FDD0 "0" (and U+FDD0 itself
    doubled), so names read back exactly and no two names collide."""
    ln = make_line("user:a")
    names = ["m\x00", "m\ufdd00", "m\ufdd0", "m\ufdd0\ufdd0", "\x00\x00"]
    for i, name in enumerate(names):
        rec = dataclasses.replace(usage_record(f"r{i}\x00", [ln], ZERO), model=name)
        ledger.settle(f"r{i}\x00", [ln], amounts(1, 0, 0), rec, now=T0)
    assert [r.model for r in ledger.records()] == names
    assert [r.reservation_id for r in ledger.records()] == [f"r{i}\x00" for i in range(5)]
    assert sorted(r.key for r in ledger.usage(group_by="model")) == sorted(names)
    stored = [row[0] for row in sql("SELECT model FROM usage ORDER BY id", schema=pg_schema)]
    assert stored[0] == "m\ufdd00" and len(set(stored)) == len(names)
