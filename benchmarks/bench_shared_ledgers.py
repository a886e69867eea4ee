"""Reserve + settle on the shared ledgers (Redis, PostgreSQL) from 1, 4 and 8 processes, beside
the network floor measured in the same run.

For each backend and process count, every process first times ``--floor`` pairs of bare round
trips (``PING`` for Redis, ``SELECT 1`` for PostgreSQL),
all processes at once, then runs ``--cycles`` reserve (+ settle when admitted) cycles on a scope
path of 4 lines (``global`` per month, ``team`` and ``user`` per day, ``agent`` rolling:1m), all
at once. The ``global`` line's ``requests`` limit admits exactly K = 3/4 of the attempts, so the
table also shows the overshoot (admitted - K), which must be 0.

Columns: cycles/s (attempts per second, all processes), p50/p99 of one admitted reserve+settle
cycle, the floor (p50 of two bare round trips), and p50/floor (the target is <= 2.5). For
PostgreSQL, ``commit`` is a second reference measured in the same run, right after the floor and
also from every process at once: the p50 of one durable commit of a 1-row INSERT (its own
connection, ``synchronous_commit=on``), i.e. the WAL flush (fsync) a durable settle waits for on
this machine. Redis rows show ``-`` there.

``server µs`` (PostgreSQL, when the user may set ``track_functions``, e.g. a superuser) is the
time the server itself spent per call in the ledger's reserve function plus its settle
function, averaged over the row's calls (``pg_stat_user_functions``; the sessions run with
``track_functions = pl``): the part of a cycle that is neither the round trips, nor the
commit's WAL flush, nor the client.

The settle reads back the states of the lines named by ``--watch``, as the guard does (it passes
only the lines that have alert thresholds, often none or one of the 4): by default line 0
(``global``); ``--watch all`` reads back every line, ``--watch none`` none.

``postgres`` is the PostgreSQL ledger as shipped: a reservation commits without waiting for the
WAL flush (a hold is transient), a settle commits durably. ``pg-async`` is the same ledger opened
with the URL option ``?synchronous_commit=off``: settles too return before their WAL record is
flushed to disk, so a crash of the database server may lose the last fraction of a second of
settled spend. Together they show how much of a PostgreSQL settle is the fsync of its commit.

``pg-bound`` and ``redis-bound`` are no ledger: they are the least work any reserve + settle
with the same guarantees needs, timed the same way beside their own floor, to show what the
target asks of the server. ``pg-bound`` reserves with one statement that locks the call's 4
lines (in one order, as a reservation must, so admissions of a line queue) and inserts 4 holds
into an UNLOGGED table, committed without waiting for the WAL flush; it settles with one
statement that deletes the holds, logs one usage row and adds to 4 counters, committed
durably. ``redis-bound`` is one script each: the reserve reads and bumps 4 held counters and
names the reservation's lines; the settle marks the id settled, moves 4 holds to spend and
appends one log entry. Neither checks a limit, sums a window, expires a hold or reads a state
back (so K, admitted and overshoot do not apply): a real ledger can only be slower.

Usage::

    python benchmarks/bench_shared_ledgers.py
    python benchmarks/bench_shared_ledgers.py --procs 1,8 --cycles 500 --backend redis
    python benchmarks/bench_shared_ledgers.py --redis redis://10.0.0.5:6379/0 \\
        --postgres postgresql://tb@10.0.0.6/bench

Every run uses its own Redis key prefix and PostgreSQL schema, deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

from tb_plugins.core.usage import REQUESTS, UsageRecord, amounts
from tb_plugins.core.windows import parse_window
from tb_plugins.ledger import Line, ledger_from_url, line_key

UTC = ZoneInfo("UTC")
TTL = 600.0
TARGET = 2.5


def make_lines(run: str, worker: int, limit: int, now: float) -> list[Line]:
    """The 4 lines one call charges; only ``global`` limits ``requests`` (to ``limit``)."""
    path = [
        (f"global:{run}", "month", (None, None, None, None, limit, None)),
        (f"team:{run}", "day", (10**12, None, None, None, None, None)),
        (f"user:{run}:{worker}", "day", (10**12, None, None, None, None, None)),
        (f"agent:{run}", "rolling:1m", (10**12, None, None, None, None, None)),
    ]
    lines = []
    for scope, spec, limits in path:
        slot = parse_window(spec).slot(now, UTC)
        lines.append(
            Line(
                key=line_key(scope, spec),
                scope=scope,
                window=spec,
                bucket=slot.bucket,
                span=slot.span,
                width=slot.width,
                limits=limits,
                expires_at=slot.expires_at,
            )
        )
    return lines


def _admin(url: str) -> str:
    """The URL without the ledger's options, for a plain client connection."""
    return url.split("?", 1)[0]


def url_option(url: str, name: str) -> str:
    """An option of a ledger URL's query, e.g. its ``schema`` or ``prefix``."""
    return dict(parse_qsl(urlsplit(url).query))[name]


def floor_once(ledger: Any) -> float:
    """Two bare round trips, in seconds."""
    start = time.perf_counter()
    ledger.ping()
    ledger.ping()
    return time.perf_counter() - start


def commit_once(conn: Any, table: str) -> float:
    """One durable commit of a 1-row INSERT (autocommit, synchronous_commit=on), in seconds."""
    start = time.perf_counter()
    conn.execute(f"INSERT INTO {table} VALUES (1)")  # type: ignore[arg-type]
    return time.perf_counter() - start


_PG_BOUND_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.b_lines (k bigint PRIMARY KEY);
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.b_holds (rid text, k bigint, tokens bigint,
                                                 PRIMARY KEY (rid, k));
CREATE TABLE IF NOT EXISTS {s}.b_counters (k bigint PRIMARY KEY, tokens bigint)
    WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS {s}.b_usage (id bigserial PRIMARY KEY, rid text UNIQUE,
                                        ts double precision, tokens bigint);
"""
_PG_BOUND_RESERVE = """
WITH l AS (SELECT k FROM {s}.b_lines WHERE k = ANY(%(ks)s) ORDER BY k FOR UPDATE)
INSERT INTO {s}.b_holds SELECT %(rid)s, k, %(tokens)s FROM l"""
_PG_BOUND_SETTLE = """
WITH d AS (DELETE FROM {s}.b_holds WHERE rid = %(rid)s),
     u AS (INSERT INTO {s}.b_usage (rid, ts, tokens) VALUES (%(rid)s, %(ts)s, %(tokens)s)
           ON CONFLICT (rid) DO NOTHING RETURNING id)
INSERT INTO {s}.b_counters AS c
SELECT k, %(tokens)s FROM unnest(%(ks)s::bigint[]) AS t(k) WHERE EXISTS (SELECT 1 FROM u)
 ORDER BY k  -- one lock order for every settle
    ON CONFLICT (k) DO UPDATE SET tokens = c.tokens + excluded.tokens"""


class _Admitted:
    ok = True


class PgBound:
    """The least a PostgreSQL reserve + durable settle can do (see the module docstring): one
    statement each, on two plain connections (the reserve's commits asynchronously)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.schema = url_option(url, "schema")
        dsn = _admin(url)
        self._settle = psycopg.connect(dsn, autocommit=True)
        self._reserve = psycopg.connect(dsn, autocommit=True)
        self._reserve.execute("SET synchronous_commit = off")
        for stmt in _PG_BOUND_SCHEMA.format(s=self.schema).split(";")[:-1]:
            self._settle.execute(stmt)
        self._r = _PG_BOUND_RESERVE.format(s=self.schema)
        self._s = _PG_BOUND_SETTLE.format(s=self.schema)
        self._keys: dict[str, int] = {}

    def _ks(self, lines: list[Line]) -> list[int]:
        out = []
        for ln in lines:
            k = self._keys.get(ln.key)
            if k is None:
                digest = hashlib.blake2b(ln.key.encode(), digest_size=8).digest()
                k = self._keys[ln.key] = int.from_bytes(digest, "big") >> 1
                for table, row in (("b_lines", "(%s)"), ("b_counters", "(%s, 0)")):
                    self._settle.execute(
                        f"INSERT INTO {self.schema}.{table} VALUES {row} ON CONFLICT DO NOTHING",
                        (k,),
                    )
            out.append(k)
        return out

    def ping(self) -> None:
        self._settle.execute("SELECT 1")

    def server_time(self) -> float:
        return time.time()

    def reserve(self, rid: str, lines: list[Line], cost: Any, **_: Any) -> _Admitted:
        self._reserve.execute(self._r, {"ks": self._ks(lines), "rid": rid, "tokens": cost[0]})
        return _Admitted()

    def release(self, rid: str, **_: Any) -> None:
        self._reserve.execute(f"DELETE FROM {self.schema}.b_holds WHERE rid = %s", (rid,))

    def settle(self, rid: str, lines: list[Line], cost: Any, record: UsageRecord,
               **_: Any) -> None:  # fmt: skip
        params = {"ks": self._ks(lines), "rid": rid, "ts": record.ts, "tokens": cost[0]}
        self._settle.execute(self._s, params)

    def close(self) -> None:
        self._settle.close()
        self._reserve.close()


_REDIS_BOUND_RESERVE = """
local n = #ARGV - 2
local amount = tonumber(ARGV[2])
for i = 1, n do
  local key = KEYS[1] .. ':b:' .. ARGV[2 + i]
  local v = redis.call('HMGET', key, 's', 'h')
  redis.call('HINCRBY', key, 'h', amount)
end
redis.call('SET', KEYS[1] .. ':br:' .. ARGV[1], table.concat(ARGV, '\\n', 3), 'EX', 4200)
return 1
"""
_REDIS_BOUND_SETTLE = """
if not redis.call('SET', KEYS[1] .. ':bs:' .. ARGV[1], '1', 'NX', 'EX', 604800) then
  return 0
end
local amount = tonumber(ARGV[2])
for i = 4, #ARGV do
  local key = KEYS[1] .. ':b:' .. ARGV[i]
  redis.call('HINCRBY', key, 'h', -amount)
  redis.call('HINCRBY', key, 's', amount)
end
redis.call('DEL', KEYS[1] .. ':br:' .. ARGV[1])
local seq = redis.call('INCR', KEYS[1] .. ':bseq')
redis.call('ZADD', KEYS[1] .. ':blog', 0, string.format('%016x', seq) .. ARGV[3])
return 1
"""


class RedisBound:
    """The least a Redis reserve + settle can do (see the module docstring): one script each."""

    def __init__(self, url: str) -> None:
        import redis

        self.prefix = "{tb:" + url_option(url, "prefix") + "}"
        self._client = redis.Redis.from_url(_admin(url))
        self._shas = [
            self._client.script_load(s) for s in (_REDIS_BOUND_RESERVE, _REDIS_BOUND_SETTLE)
        ]

    def ping(self) -> None:
        self._client.ping()

    def server_time(self) -> float:
        seconds, micros = self._client.time()
        return int(seconds) + int(micros) / 1e6

    def reserve(self, rid: str, lines: list[Line], cost: Any, **_: Any) -> _Admitted:
        keys = [ln.key for ln in lines]
        self._client.evalsha(self._shas[0], 1, self.prefix, rid, int(cost[0]), *keys)
        return _Admitted()

    def release(self, rid: str, **_: Any) -> None:
        self._client.delete(f"{self.prefix}:br:{rid}")

    def settle(self, rid: str, lines: list[Line], cost: Any, record: UsageRecord,
               **_: Any) -> None:  # fmt: skip
        member = json.dumps({"ts": record.ts, "id": rid, "scopes": list(record.scopes),
                             "in": record.input_tokens, "out": record.output_tokens})  # fmt: skip
        keys = [ln.key for ln in lines]
        self._client.evalsha(self._shas[1], 1, self.prefix, rid, int(cost[0]), member, *keys)

    def close(self) -> None:
        self._client.close()


BOUNDS = {"pg-bound": PgBound, "redis-bound": RedisBound}
BACKENDS = ("redis", "redis-bound", "postgres", "pg-async", "pg-bound")


def open_ledger(backend: str, url: str) -> Any:
    """The backend's ledger, or its bound."""
    bound = BOUNDS.get(backend)
    return bound(url) if bound is not None else ledger_from_url(url)


def worker(backend: str, url: str, run: str, index: int, cycles: int, floors: int, limit: int,
           watch: list[int] | None, commit_table: str | None, barrier: Any,
           results: Any) -> None:  # fmt: skip
    """A child: connect and warm up, then (all at once) the floor and the commit reference,
    then the cycles."""
    ledger = open_ledger(backend, url)
    conn: Any = None
    if commit_table is not None:
        import psycopg

        conn = psycopg.connect(_admin(url), autocommit=True)
        conn.execute("SET synchronous_commit = on")
        for _ in range(20):
            commit_once(conn, commit_table)
    now = ledger.server_time() or time.time()
    lines = make_lines(run, index, limit, now)
    warm = make_lines(f"{run}-warm", index, 10**9, now)
    cost = amounts(100, 20, 1500)
    scopes = tuple(ln.scope for ln in lines)
    for i in range(20):  # connections, script cache, prepared statements
        floor_once(ledger)
        ledger.reserve(f"warm-{index}-{i}", warm, cost, now=now, expires_at=now + TTL)
        ledger.release(f"warm-{index}-{i}", now=now)
    barrier.wait()
    floor = [floor_once(ledger) for _ in range(floors)]
    commits = [] if conn is None else [commit_once(conn, commit_table or "") for _ in range(floors)]
    if conn is not None:
        conn.close()
    barrier.wait()
    latencies: list[float] = []
    admitted = 0
    start = time.perf_counter()
    for i in range(cycles):
        rid = f"{run}-{index}-{i}"
        t0 = time.perf_counter()
        if ledger.reserve(rid, lines, cost, now=now, expires_at=now + TTL).ok:
            record = UsageRecord(
                ts=now, reservation_id=rid, scopes=scopes, model="bench-model",
                requested_model="bench-model", action="allow", input_tokens=100,
                output_tokens=20, usd=1.5e-6,
            )  # fmt: skip
            ledger.settle(rid, lines, cost, record, now=now, watch=watch)
            latencies.append(time.perf_counter() - t0)
            admitted += 1
    elapsed = time.perf_counter() - start
    ledger.close()
    results.put((admitted, elapsed, latencies, floor, now, commits))


@dataclass
class Row:
    backend: str
    procs: int
    attempts: int
    seconds: float
    latencies: list[float]
    floor: list[float]
    commits: list[float]
    limit: int
    admitted: int
    counted: int
    held: int
    server: float | None = None  # seconds per reserve + settle inside the PostgreSQL server

    @property
    def rate(self) -> float:
        return self.attempts / self.seconds

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]

    @property
    def floor_p50(self) -> float:
        return statistics.median(self.floor)

    @property
    def commit_p50(self) -> float | None:
        return statistics.median(self.commits) if self.commits else None


def run_one(backend: str, url: str, procs: int, cycles: int, floors: int,
            watch: list[int] | None, commit_table: str | None) -> Row:  # fmt: skip
    run = uuid.uuid4().hex[:8]
    attempts = procs * cycles
    limit = attempts * 3 // 4  # admits exactly this many; the rest must be refused
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(procs + 1)
    children = [
        ctx.Process(
            target=worker,
            args=(
                backend,
                url,
                run,
                i,
                cycles,
                floors,
                limit,
                watch,
                commit_table,
                barrier,
                results,
            ),
        )
        for i in range(procs)
    ]
    for child in children:
        child.start()
    barrier.wait()  # everyone connected and warm
    barrier.wait()  # everyone timed the floor
    start = time.perf_counter()
    outs = [results.get(timeout=900) for _ in children]
    seconds = time.perf_counter() - start
    for child in children:
        child.join()
    now = outs[0][4]
    admitted = sum(o[0] for o in outs)
    if backend in BOUNDS:  # no limit, no state to read back
        limit, counted, held = admitted, admitted, 0
    else:
        with ledger_from_url(url) as ledger:
            states = ledger.status(make_lines(run, 0, limit, now), now=now)
            counted = states[0].spent[REQUESTS]
            held = sum(sum(s.held) for s in states)
    return Row(
        backend=backend,
        procs=procs,
        attempts=attempts,
        seconds=seconds,
        latencies=[x for o in outs for x in o[2]],
        floor=[x for o in outs for x in o[3]],
        commits=[x for o in outs for x in o[5]],
        limit=limit,
        admitted=admitted,
        counted=counted,
        held=held,
    )


_TIMED = ("tb_reserve2", "tb_settle2")  # the PostgreSQL ledger's reserve and settle functions


def with_function_timing(url: str) -> str:
    """``url`` with ``track_functions = pl`` for the ledger's sessions, if this user may set
    it (a superuser may); else ``url`` unchanged."""
    import psycopg

    try:
        with psycopg.connect(_admin(url), options="-c track_functions=pl"):
            pass
    except psycopg.Error:
        return url
    return url + "&options=-c%20track_functions%3Dpl"


def function_times(url: str, schema: str) -> dict[str, tuple[int, float]]:
    """Calls and total milliseconds per ledger function of ``schema`` (server statistics)."""
    import psycopg

    with psycopg.connect(_admin(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT funcname, calls, total_time FROM pg_stat_user_functions WHERE schemaname = %s",
            (schema,),
        ).fetchall()
    return {name: (calls, total) for name, calls, total in rows}


def server_time(url: str, schema: str, before: dict[str, tuple[int, float]],
                expected: int) -> float | None:  # fmt: skip
    """Seconds per reserve + settle spent inside the server since ``before``: the statistics
    of the workers' sessions, once they have all reached the server (``expected`` reserve
    calls, or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        after = function_times(url, schema)
        calls = {f: after.get(f, (0, 0.0))[0] - before.get(f, (0, 0.0))[0] for f in _TIMED}
        if calls[_TIMED[0]] >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not all(calls.values()):
        return None
    per_call = [(after[f][1] - before.get(f, (0, 0.0))[1]) / calls[f] / 1e3 for f in _TIMED]
    return sum(per_call)


def make_commit_table(url: str) -> str:
    """A 1-column table in the ledger's schema for the commit reference; returns its name."""
    import psycopg

    schema = url_option(url, "schema")
    with psycopg.connect(_admin(url), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {schema}.bench_commit (x int)")  # type: ignore[arg-type]
    return f"{schema}.bench_commit"


def cleanup(backend: str, url: str, namespace: str) -> None:
    """Delete the run's Redis keys or PostgreSQL schema."""
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(_admin(url))
        keys = list(client.scan_iter(match=f"{{tb:{namespace}}}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()
    else:
        import psycopg
        from psycopg import sql

        with psycopg.connect(_admin(url), autocommit=True) as conn:
            conn.execute("SET client_min_messages = warning")
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(namespace))
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis server URL")
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL URL"
    )
    parser.add_argument("--backend", action="append", choices=list(BACKENDS),
                        help="backend to run (repeatable); default all")  # fmt: skip
    parser.add_argument("--procs", default="1,4,8", help="process counts, comma-separated")
    parser.add_argument("--cycles", type=int, default=400, help="cycles per process")
    parser.add_argument("--floor", type=int, default=200, help="floor samples per process")
    parser.add_argument(
        "--watch",
        default="0",
        help="lines a settle reads back: comma-separated indexes (0 = global), 'all' or 'none'; "
        "default 0, like a guard with one alert line",
    )
    args = parser.parse_args(argv)
    watch: list[int] | None
    if args.watch == "all":
        watch = None
    elif args.watch == "none":
        watch = []
    else:
        watch = [int(i) for i in args.watch.split(",")]
    procs_list = [int(p) for p in args.procs.split(",")]
    namespace = f"tbbench_{uuid.uuid4().hex[:8]}"
    urls = {
        "redis": f"{args.redis}?prefix={namespace}",
        "postgres": f"{args.postgres}?schema={namespace}",
        # the same, with settles committed without waiting for the WAL flush (fsync)
        "pg-async": f"{args.postgres}?schema={namespace}_a&synchronous_commit=off",
        "redis-bound": f"{args.redis}?prefix={namespace}_b",
        "pg-bound": f"{args.postgres}?schema={namespace}_b",
    }
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f}; {args.cycles} cycles and "
          f"{args.floor} floor samples per process; 4 lines per call; settle watch="
          f"{args.watch}\n")  # fmt: skip
    header = (f"{'backend':<12}{'procs':>5}{'cycles/s':>10}{'p50 µs':>9}{'p99 µs':>9}"
              f"{'floor µs':>10}{'commit µs':>10}{'server µs':>10}{'p50/floor':>10}{'K':>7}"
              f"{'admitted':>9}{'overshoot':>10}{'held':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    failed = False
    for backend in args.backend or BACKENDS:
        url = urls[backend]
        redis_like = backend.startswith("redis")
        schema = url_option(url, "prefix" if redis_like else "schema")
        try:
            ledger = open_ledger(backend, url)
            ledger.ping()  # creates the schema
            ledger.close()
            commit_table = None
            if not redis_like:
                commit_table = make_commit_table(url)
                if backend not in BOUNDS:
                    url = with_function_timing(url)
            for procs in procs_list:
                timed = not redis_like and "track_functions" in url
                before = function_times(url, schema) if timed else {}
                row = run_one(backend, url, procs, args.cycles, args.floor, watch, commit_table)
                if timed:
                    row.server = server_time(url, schema, before, procs * (args.cycles + 20))
                ratio = row.p50 / row.floor_p50
                over = row.admitted - row.limit
                failed |= over != 0 or row.counted != row.admitted or row.held != 0
                commit = "-" if row.commit_p50 is None else f"{row.commit_p50 * 1e6:,.0f}"
                server = "-" if row.server is None else f"{row.server * 1e6:,.0f}"
                print(f"{backend:<12}{procs:>5}{row.rate:>10,.0f}{row.p50 * 1e6:>9,.0f}"
                      f"{row.p99 * 1e6:>9,.0f}{row.floor_p50 * 1e6:>10,.0f}{commit:>10}"
                      f"{server:>10}"
                      f"{ratio:>9.2f}x{row.limit:>7}{row.admitted:>9}{over:>10}{row.held:>6}",
                      flush=True)  # fmt: skip
        finally:
            cleanup("redis" if redis_like else "postgres", url, schema)
    print(f"\np50/floor target: <= {TARGET}x; overshoot and held must be 0.")
    print("The -bound rows are no ledger: the least work a reserve + settle needs "
          "(no limit check, no windows).")  # fmt: skip
    if failed:
        print("FAIL: a ledger admitted, counted or kept holds other than it should",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
