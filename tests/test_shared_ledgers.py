"""The shared ledgers (Redis, PostgreSQL) across processes, skewed clocks and failures.

Every test runs against the real servers on 127.0.0.1, each in its own Redis key prefix or
PostgreSQL schema (dropped afterwards). Failures are made without touching the shared servers:
a Redis server this module starts on a free port, and a TCP proxy in front of either server that
a test can cut, hang or make lose replies.

The helpers here (server URLs, the proxy, a private Redis) are shared with
``test_redis_ledger.py`` and ``test_postgres_ledger.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_server
from tb_plugins import BudgetGuard, LedgerUnavailable, Usage
from tb_plugins.core.usage import REQUESTS, TOKENS, ZERO, Amounts, UsageRecord, amounts
from tb_plugins.core.windows import parse_window
from tb_plugins.ledger import Ledger, Line, ledger_from_url, line_key
from tb_plugins.warnings import FailOpenWarning

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 15
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
T0 = 1_700_000_000.0
TTL = 600.0
TIMEOUT = 0.5  # the ledger timeout of the failure tests, seconds
MODEL = "tb-test-model"
PRICES = {MODEL: {"input": "$1/1M", "output": "$2/1M"}}

# -- servers and URLs ----------------------------------------------------------------------------


def redis_url(prefix: str, *, port: int = REDIS_PORT, **query: Any) -> str:
    """A Redis ledger URL in the test database with its own key prefix."""
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"redis://{REDIS_HOST}:{port}/{REDIS_DB}?prefix={prefix}{extra}"


def pg_url(schema: str, *, port: int = PG_PORT, **query: Any) -> str:
    """A PostgreSQL ledger URL in its own schema."""
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"postgresql://postgres@{PG_HOST}:{port}/test?schema={schema}{extra}"


def drop_redis_prefix(prefix: str, *, port: int = REDIS_PORT) -> None:
    """Delete every key of the ledger with this prefix."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=port, db=REDIS_DB)
    try:
        keys = list(client.scan_iter(match=f"{{tb:{prefix}}}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def drop_pg_schema(schema: str) -> None:
    """Drop the ledger's schema and everything in it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def fresh_redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the shared Redis, deleted afterwards (the body of a fixture)."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"tbshared-{uuid.uuid4().hex[:12]}"
    yield prefix
    drop_redis_prefix(prefix)


def fresh_pg_schema() -> Iterator[str]:
    """A fresh schema name on the shared PostgreSQL, dropped afterwards (a fixture's body)."""
    require_server("PostgreSQL", PG_HOST, PG_PORT)
    schema = f"tbshared_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_pg_schema(schema)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the shared Redis, deleted afterwards."""
    yield from fresh_redis_prefix()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name on the shared PostgreSQL, dropped afterwards."""
    yield from fresh_pg_schema()


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def shared(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(backend, URL) of a fresh ledger on each shared server in turn."""
    name = request.param
    if name == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        yield name, redis_url(prefix)
    else:
        schema = request.getfixturevalue("pg_schema")
        yield name, pg_url(schema)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on a free port, with an append-only file fsynced on every write
    (so a restart keeps the ledger), that a test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server (its append-only file keeps what it acknowledged)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent Redis that the test can stop and restart (a fixture's body)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not on the PATH; under CI=true it must be")
        pytest.skip("redis-server is not on the PATH")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent Redis that the test can stop and restart."""
    yield from private_redis(tmp_path)


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of a server. ``cut()`` closes every connection and
    refuses new ones until ``restore()``; ``mode`` ``"hang"`` swallows traffic both ways (a
    server that stops answering) and ``"drop_replies"`` delivers requests but loses replies."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.mode = "pass"
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        """Accept connections again and pass traffic."""
        self.mode = "pass"
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close every connection and stop listening: new connections are refused."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.mode == "hang" or (reply and self.mode == "drop_replies"):
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy_to() -> Iterator[Any]:
    """Make proxies (``proxy_to(port)``) that are closed after the test."""
    made: list[Proxy] = []

    def make(port: int) -> Proxy:
        proxy = Proxy(port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


# -- lines and guards ----------------------------------------------------------------------------


def make_line(scope: str, window: str = "day", *, now: float = T0, **units: int) -> Line:
    """The line of ``scope`` in ``window`` at ``now`` with limits ``units`` (e.g. tokens=10)."""
    from zoneinfo import ZoneInfo

    from tb_plugins.core.usage import UNITS

    w = parse_window(window)
    slot = w.slot(now, ZoneInfo("UTC"))
    lim = tuple(units.get(u) for u in UNITS)
    return Line(
        key=line_key(scope, w.spec),
        scope=scope,
        window=w.spec,
        bucket=slot.bucket,
        span=slot.span,
        width=slot.width,
        limits=(lim[0], lim[1], lim[2], lim[3], lim[4], lim[5]),
        expires_at=slot.expires_at,
    )


def usage_record(rid: str, lines: list[Line], amt: Amounts, ts: float = T0) -> UsageRecord:
    return UsageRecord(
        ts=ts,
        reservation_id=rid,
        scopes=tuple(ln.scope for ln in lines),
        model=MODEL,
        requested_model=MODEL,
        action="allow",
        input_tokens=amt[1],
        output_tokens=amt[2],
    )


def make_guard(
    url: str,
    *,
    on_error: str = "fail_closed",
    clock: Any = None,
    ledger: Ledger | None = None,
    **policy: Any,
) -> BudgetGuard:
    """A guard on ``url`` (or on ``ledger``, opened by the caller) with the failure tests'
    short timeout and a priced test model."""
    data: dict[str, Any] = {
        "ledger": url,
        "on_ledger_error": on_error,
        "ledger_timeout": TIMEOUT,
        "prices": PRICES,
        "alerts": [],
        "budgets": [{"scope": "team:t", "tokens": 10_000_000, "window": "day"}],
    }
    data.update(policy)
    return BudgetGuard.from_dict(data, clock=clock, ledger=ledger)


def call(guard: BudgetGuard, i: int, scope: str = "team:t") -> int:
    """One whole call through the guard (check, then settle); returns the tokens it used."""
    d = guard.check(model=MODEL, input_tokens=100 + i, max_tokens=50, scopes=[scope])
    used = Usage(input_tokens=100 + i, output_tokens=10 + i % 7, model=MODEL)
    guard.settle(d, used)
    return used.total_tokens


def spent_tokens(ledger: Ledger, scope: str = "team:t", window: str = "day") -> int:
    """Settled tokens of ``scope`` in today's bucket (by the ledger's own clock)."""
    now = ledger.server_time() or time.time()
    (state,) = ledger.status([make_line(scope, window, now=now)], now=now)
    assert state.held == ZERO
    return state.spent[TOKENS]


# -- processes -----------------------------------------------------------------------------------

WORKERS, ATTEMPTS, ADMIT = 8, 250, 600  # 2,000 attempts for 600 places


def _path(worker: int) -> list[Line]:
    """A scope path of 4 lines (one of them rolling); only ``global`` limits ``requests``."""
    return [
        make_line("global", "total", requests=ADMIT),
        make_line("team:t", "day"),
        make_line(f"user:{worker}", "day"),
        make_line("agent:a", "rolling:1m"),
    ]


def _hammer(url: str, worker: int, start: Any, out: Any) -> None:
    """Child: ATTEMPTS reserve(+settle) cycles; reports (admitted, tokens settled)."""
    ledger = ledger_from_url(url)
    lines = _path(worker)
    start.wait()
    admitted = settled = 0
    for i in range(ATTEMPTS):
        rid = f"w{worker}-{i}"
        if ledger.reserve(rid, lines, amounts(50, 0, 0), now=T0, expires_at=T0 + TTL).ok:
            admitted += 1
            actual = amounts(1 + (worker * 31 + i * 7) % 97, 0, 0)  # differs from the estimate
            ledger.settle(rid, lines, actual, usage_record(rid, lines, actual), now=T0)
            settled += actual[TOKENS]
    ledger.close()
    out.put((admitted, settled))


@pytest.mark.slow
def test_processes_admit_exactly_k_and_spent_equals_settled_usage(
    shared: tuple[str, str],
) -> None:
    """8 processes x 250 reserve+settle on one ledger admit exactly K, leave no hold, and the
    counters hold exactly the usage they settled."""
    _, url = shared
    ledger_from_url(url).status(_path(0), now=T0)  # create the schema before the race
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, w, start, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(admitted for admitted, _ in results) == ADMIT
    settled = sum(tokens for _, tokens in results)
    with ledger_from_url(url) as ledger:
        lines = [*_path(0), *(_path(w)[2] for w in range(1, WORKERS))]
        states = ledger.status(lines, now=T0)
        assert all(s.held == ZERO for s in states)
        assert states[0].spent[REQUESTS] == ADMIT
        assert states[0].spent[TOKENS] == states[1].spent[TOKENS] == settled
        assert sum(s.spent[TOKENS] for s in states[2:3] + states[4:]) == settled  # users
        records = ledger.records()
        assert len(records) == ADMIT
        assert sum(r.input_tokens for r in records) == settled


# -- clocks --------------------------------------------------------------------------------------


class SkewedClock:
    """The wall clock off by ``offset`` seconds (a host whose clock is wrong)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def _skewed_host(url: str, offset: float, scope: str, out: Any) -> None:
    """Child: one call through a guard whose clock is off by ``offset``; reports the bucket it
    charged and the one its own clock alone would have picked."""
    guard = make_guard(
        url,
        clock=SkewedClock(offset),
        budgets=[{"scope": scope, "tokens": 1_000_000, "window": "minute"}],
    )
    d = guard.check(model=MODEL, input_tokens=10, max_tokens=5, scopes=[scope])
    guard.settle(d, Usage(10, 5, model=MODEL))
    (charged,) = [lp.line.bucket for lp in d.lines if lp.line.scope == scope]
    local = int(SkewedClock(offset)() // 60) * 60
    out.put((offset, charged, local, guard.now()))
    guard.close()


def test_two_hosts_with_clocks_minutes_apart_charge_the_same_window(
    shared: tuple[str, str],
) -> None:
    """Two guards in two processes, clocks 2.5 min ahead and 3.3 min behind, both follow the
    server's clock and charge the same minute bucket."""
    _, url = shared
    ctx = mp.get_context("spawn")
    with ledger_from_url(url) as ledger:
        for attempt in range(3):
            scope = f"team:skew{attempt}"
            before = ledger.server_time()
            assert before is not None
            out = ctx.Queue()
            procs = [
                ctx.Process(target=_skewed_host, args=(url, offset, scope, out))
                for offset in (150.0, -200.0)
            ]
            for p in procs:
                p.start()
            reports = [out.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(timeout=30)
            after = ledger.server_time()
            assert after is not None
            if before // 60 != after // 60:
                continue  # the calls straddled a minute boundary: try again in the next minute
            bucket = int(before // 60) * 60
            for _offset, charged, local, host_now in reports:
                assert charged == bucket != local  # its own clock would have chosen another
                assert before - 1 <= host_now <= after + 1
            spent = ledger.status([make_line(scope, "minute", now=before)], now=before)
            assert spent[0].spent[TOKENS] == 2 * 15
            return
    pytest.fail("three attempts in a row straddled a minute boundary")


# -- failures ------------------------------------------------------------------------------------


def wait_until_reachable(ledger: Ledger, seconds: float = 15.0) -> None:
    """Poll the ledger until it answers (a connection pool reconnects in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            ledger.server_time()
            return
        except LedgerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _timed_denial(guard: BudgetGuard) -> float:
    start = time.monotonic()
    with pytest.raises(LedgerUnavailable):
        guard.check(model=MODEL, input_tokens=10, max_tokens=5, scopes=["team:t"])
    return time.monotonic() - start


@pytest.mark.parametrize(
    "scheme", [pytest.param("redis", marks=pytest.mark.redis),
               pytest.param("postgres", marks=pytest.mark.postgres)],
)  # fmt: skip
def test_fail_closed_denies_within_the_timeout_when_nothing_listens(scheme: str) -> None:
    """With no server at the ledger's address, fail_closed refuses to build the guard, and
    denies the calls of a guard given that ledger, with LedgerUnavailable within the timeout;
    the message names host:port but not the password."""
    port = free_port()
    url = (
        f"redis://:s3cret@127.0.0.1:{port}/0?prefix=down"
        if scheme == "redis"
        else f"postgresql://postgres:s3cret@127.0.0.1:{port}/test?schema=down"
    )
    start = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="cannot be opened") as built:
        make_guard(url)
    assert time.monotonic() - start < 2 * TIMEOUT + 0.25
    assert f"127.0.0.1:{port}" in str(built.value) and "s3cret" not in str(built.value)
    guard = make_guard(url, ledger=ledger_from_url(url, timeout=TIMEOUT))
    elapsed = _timed_denial(guard)
    assert elapsed < 2 * TIMEOUT + 0.25
    with pytest.raises(LedgerUnavailable) as err:
        guard.check(model=MODEL, input_tokens=10, max_tokens=5, scopes=["team:t"])
    assert f"127.0.0.1:{port}" in str(err.value) and "s3cret" not in str(err.value)
    guard.ledger.close()


@pytest.mark.parametrize(
    "scheme", [pytest.param("redis", marks=pytest.mark.redis),
               pytest.param("postgres", marks=pytest.mark.postgres)],
)  # fmt: skip
def test_fail_closed_denies_within_the_timeout_when_the_server_stops_answering(
    scheme: str, request: pytest.FixtureRequest, proxy_to: Any
) -> None:
    """A server that accepts but never answers makes fail_closed deny within twice the
    timeout, not hang; once it answers again, calls are served."""
    if scheme == "redis":
        proxy = proxy_to(REDIS_PORT)
        url = redis_url(request.getfixturevalue("redis_prefix"), port=proxy.port)
    else:
        proxy = proxy_to(PG_PORT)
        url = pg_url(request.getfixturevalue("pg_schema"), port=proxy.port)
    guard = make_guard(url)
    call(guard, 0)
    proxy.mode = "hang"
    elapsed = _timed_denial(guard)
    assert TIMEOUT * 0.8 <= elapsed < 2 * TIMEOUT
    proxy.mode = "pass"
    wait_until_reachable(guard.ledger)
    call(guard, 1)
    guard.close()


@pytest.mark.redis
def test_fail_open_serves_through_a_redis_restart_and_the_ledger_ends_with_the_exact_spend(
    own_redis: RedisServer,
) -> None:
    """Redis stopped mid-run and restarted: fail_closed denies fast meanwhile, fail_open keeps
    serving (warning once per call), and after flush() the ledger holds exactly the spend."""
    url = redis_url("restart", port=own_redis.port)
    guard = make_guard(url, on_error="fail_open")
    closed = make_guard(url)
    total = sum(call(guard, i) for i in range(10))
    total += call(closed, 0)

    own_redis.stop()
    assert _timed_denial(closed) < 2 * TIMEOUT
    with pytest.warns(FailOpenWarning):
        total += sum(call(guard, i) for i in range(10, 20))
    assert guard.pending == 10  # settled locally, waiting for the ledger

    own_redis.start()
    total += sum(call(guard, i) for i in range(20, 30))  # may flush by itself (every 5 s)
    guard.flush()
    assert guard.pending == 0 and guard.flush() == 0
    with ledger_from_url(url) as ledger:
        assert spent_tokens(ledger) == total
        assert len(ledger.records()) == 31
    guard.close()
    closed.close()


@pytest.mark.parametrize(
    "scheme", [pytest.param("redis", marks=pytest.mark.redis),
               pytest.param("postgres", marks=pytest.mark.postgres)],
)  # fmt: skip
def test_fail_open_serves_while_the_connection_is_cut_and_flush_counts_each_call_once(
    scheme: str, request: pytest.FixtureRequest, proxy_to: Any
) -> None:
    """Connections cut and refused mid-run: fail_open serves every call, and once the server is
    reachable again flush() writes exactly the spend made while it was not."""
    if scheme == "redis":
        proxy = proxy_to(REDIS_PORT)
        url = redis_url(request.getfixturevalue("redis_prefix"), port=proxy.port)
    else:
        proxy = proxy_to(PG_PORT)
        url = pg_url(request.getfixturevalue("pg_schema"), port=proxy.port)
    guard = make_guard(url, on_error="fail_open")
    total = sum(call(guard, i) for i in range(5))
    proxy.cut()
    with pytest.warns(FailOpenWarning):
        total += sum(call(guard, i) for i in range(5, 15))
    assert guard.pending == 10
    proxy.restore()
    wait_until_reachable(guard.ledger)
    total += sum(call(guard, i) for i in range(15, 20))
    guard.flush()
    assert guard.pending == 0
    with ledger_from_url(url) as ledger:
        assert spent_tokens(ledger) == total
        assert len(ledger.records()) == 20
    guard.close()


@pytest.mark.redis
def test_a_settle_whose_reply_was_lost_is_written_once(redis_prefix: str, proxy_to: Any) -> None:
    """A settle that reached Redis but whose reply was lost is kept as pending; writing it
    again when the link is back changes nothing (settle is idempotent by id)."""
    proxy = proxy_to(REDIS_PORT)
    url = redis_url(redis_prefix, port=proxy.port)
    guard = make_guard(url)
    d = guard.check(model=MODEL, input_tokens=100, max_tokens=50, scopes=["team:t"])
    proxy.mode = "drop_replies"
    guard.settle(d, Usage(100, 20, model=MODEL))
    assert guard.pending == 1
    proxy.mode = "pass"
    assert guard.flush() == 1
    with ledger_from_url(url) as ledger:
        assert spent_tokens(ledger) == 120
        assert len(ledger.records()) == 1
    guard.close()


@pytest.mark.redis
def test_client_kill_of_the_ledger_connections_costs_no_call(own_redis: RedisServer) -> None:
    """CLIENT KILL of every ledger connection is absorbed by one immediate reconnect: the next
    fail_closed call is served, not denied."""
    import redis

    url = redis_url("killed", port=own_redis.port, client_name="tb-victim")
    guard = make_guard(url)
    total = call(guard, 0)
    admin = redis.Redis(host="127.0.0.1", port=own_redis.port)
    victims = [c["id"] for c in admin.client_list() if c.get("name") == "tb-victim"]
    assert victims
    for cid in victims:
        admin.client_kill_filter(_id=cid)
    total += call(guard, 1)
    with ledger_from_url(url) as ledger:
        assert spent_tokens(ledger) == total
    admin.close()
    guard.close()


# -- a reservation whose owner died --------------------------------------------------------------


def _hold_and_wait(url: str, scope: str, out: Any) -> None:
    """Child: reserve through a guard, report the hold, then wait to be killed."""
    guard = make_guard(url, budgets=[{"scope": scope, "tokens": 1_000, "window": "day"}],
                       reservation_ttl="2m")  # fmt: skip
    d = guard.check(model=MODEL, input_tokens=600, max_tokens=100, scopes=[scope])
    (line,) = [lp.line for lp in d.lines if lp.line.scope == scope]
    out.put((line, d.created_at, d.expires_at, d.estimate.tokens))
    threading.Event().wait()


def test_a_sigkilled_owner_s_hold_returns_after_its_ttl(shared: tuple[str, str]) -> None:
    """A process SIGKILLed while holding 700 of 1,000 tokens blocks the room until the hold's
    TTL passes (injected now), then the room is back."""
    _, url = shared
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_hold_and_wait, args=(url, "user:doomed", out))
    child.start()
    try:
        line, created, expires, held = out.get(timeout=60)
    finally:
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL and held == 700
    with ledger_from_url(url) as ledger:
        before = expires - 0.001
        assert ledger.status([line], now=before)[0].held[TOKENS] == 700
        assert not ledger.reserve("early", [line], amounts(301, 0, 0), now=before,
                                  expires_at=before + TTL).ok  # fmt: skip
        assert ledger.status([line], now=expires)[0].held == ZERO
        assert ledger.reserve("after", [line], amounts(1_000, 0, 0), now=expires,
                              expires_at=expires + TTL).ok  # fmt: skip
        assert expires - created == 120


# -- scope names ---------------------------------------------------------------------------------

NASTY = [
    "user:a",
    "user:a|day",
    "user:a}:l:user%3Aa|day",  # looks like the key of another line once inside a key
    "team:{search}",
    "team:{tb:tb}",
    "user:\"double\" and 'single'",
    "user:with space\tand\nnewline",
    "user:nul\x00byte",
    "user:ünïcødé-名前-🚀",
    "user:" + "名" * 10_000,  # 30 kB of UTF-8, 90 kB once percent-escaped
    "user:" + "x" * 10_000,
]


def test_nasty_scope_names_round_trip_and_stay_apart(shared: tuple[str, str]) -> None:
    """Scope names with key syntax, braces, quotes, whitespace, NUL, unicode and 10 kB keep
    their own counters, holds and usage, and read back intact."""
    _, url = shared
    lines = [make_line(name, tokens=1_000) for name in NASTY]
    with ledger_from_url(url) as ledger:
        for i, ln in enumerate(lines):
            assert ledger.reserve(f"h{i}", [ln], amounts(i + 1, 0, 0), now=T0,
                                  expires_at=T0 + TTL).ok  # fmt: skip
        for i, ln in enumerate(lines[::2]):
            rid = f"h{2 * i}"
            amt = amounts(10 * (2 * i + 1), 0, 0)
            ledger.settle(rid, [ln], amt, usage_record(rid, [ln], amt), now=T0)
        states = ledger.status(lines, now=T0)
        for i, st in enumerate(states):
            if i % 2 == 0:
                assert st.spent[TOKENS] == 10 * (i + 1) and st.held == ZERO
            else:
                assert st.spent == ZERO and st.held[TOKENS] == i + 1
        assert sorted(ledger.scopes()) == sorted((n, "day") for n in NASTY[::2])
        assert [r.scopes for r in ledger.records()] == [(n,) for n in NASTY[::2]]
        for name in NASTY[::2]:
            assert [r.key for r in ledger.usage(scope=name)] == [name]
        assert ledger.release("h1", now=T0) is True
        assert ledger.status(lines[1:2], now=T0)[0].held == ZERO
        assert ledger.status(lines[3:4], now=T0)[0].held[TOKENS] == 4
