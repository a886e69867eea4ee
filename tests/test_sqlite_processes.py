"""The SQLite ledger under real concurrency: processes, a killed holder, fork and threads."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tb_plugins.core.usage import REQUESTS, TOKENS, ZERO, UsageRecord, amounts
from tb_plugins.ledger import Line, ledger_from_url, line_key

pytestmark = [pytest.mark.slow, pytest.mark.sqlite]

T0 = 1_700_000_000.0
TTL = 600.0
WORKERS, ATTEMPTS, ADMIT = 8, 250, 600  # 2,000 attempts for 600 places


def _lines(worker: int, requests_limit: int | None) -> list[Line]:
    """A scope path of 4 lines; only ``global`` limits ``requests``."""
    scopes = [
        ("global", requests_limit),
        ("team:t", None),
        (f"user:{worker}", None),
        ("agent:a", None),
    ]
    return [
        Line(
            key=line_key(scope, "total"),
            scope=scope,
            window="total",
            bucket=0,
            span=1,
            width=0,
            limits=(None, None, None, None, limit, None),
            expires_at=None,
        )
        for scope, limit in scopes
    ]


def _record(rid: str, lines: list[Line], tokens: int) -> UsageRecord:
    return UsageRecord(
        ts=T0,
        reservation_id=rid,
        scopes=tuple(ln.scope for ln in lines),
        model="m",
        requested_model="m",
        action="allow",
        input_tokens=tokens,
    )


def _hammer(url: str, worker: int, start: Any, out: Any) -> None:
    """Child: ATTEMPTS reserve(+settle) cycles; report (admitted, tokens settled)."""
    ledger = ledger_from_url(url)
    lines = _lines(worker, ADMIT)
    start.wait()
    admitted = settled_tokens = 0
    for i in range(ATTEMPTS):
        rid = f"w{worker}-{i}"
        if ledger.reserve(rid, lines, amounts(50, 0, 0), now=T0, expires_at=T0 + TTL).ok:
            admitted += 1
            actual = 1 + (worker * 31 + i * 7) % 97  # actual usage differs from the estimate
            ledger.settle(rid, lines, amounts(actual, 0, 0), _record(rid, lines, actual), now=T0)
            settled_tokens += actual
    ledger.close()
    out.put((admitted, settled_tokens))


def _hold_and_wait(url: str, held: Any) -> None:
    """Child: reserve the whole line, tell the parent, then wait to be killed."""
    ledger = ledger_from_url(url)
    lines = _lines(0, ADMIT)[:1]
    result = ledger.reserve("doomed", lines, amounts(0, 0, 0, requests=ADMIT), now=T0,
                            expires_at=T0 + TTL)  # fmt: skip
    held.put(result.ok)
    threading.Event().wait()


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_processes_admit_exactly_the_limit_and_counters_match_settled_spend(
    tmp_path: Path,
) -> None:
    """8 processes racing on one file admit exactly K calls and count exactly what they settled."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    ledger_from_url(url).close()  # create the schema once, before the race
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, w, start, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(admitted for admitted, _ in results) == ADMIT
    with ledger_from_url(url) as ledger:
        states = ledger.status(_lines(0, ADMIT), now=T0)
        assert states[0].spent[REQUESTS] == ADMIT
        assert states[0].spent[TOKENS] == sum(tokens for _, tokens in results)
        assert all(s.held == ZERO for s in states)
        assert len(ledger.records()) == ADMIT
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM holds").fetchone() == (0,)
    assert _integrity(path) == "ok"


def test_a_killed_holder_blocks_until_its_ttl_then_its_room_returns(tmp_path: Path) -> None:
    """A process SIGKILLed while holding the whole line blocks others until the hold's TTL."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    ctx = mp.get_context("spawn")
    held = ctx.Queue()
    child = ctx.Process(target=_hold_and_wait, args=(url, held))
    child.start()
    try:
        assert held.get(timeout=60) is True
    finally:
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    everything = amounts(0, 0, 0, requests=ADMIT)
    with ledger_from_url(url) as ledger:
        line = _lines(0, ADMIT)[:1]
        before = T0 + TTL - 1
        assert not ledger.reserve(
            "early", line, amounts(0, 0, 0), now=before, expires_at=T0 + 2 * TTL
        ).ok
        assert ledger.reserve("after", line, everything, now=T0 + TTL, expires_at=T0 + 2 * TTL).ok
    assert _integrity(path) == "ok"


def test_a_forked_child_reopens_its_connection_and_shares_the_file(tmp_path: Path) -> None:
    """After os.fork() the child's calls use a fresh connection and land in the same file."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    lines = _lines(0, None)[:1]
    with ledger_from_url(url) as ledger:
        ledger.reserve("parent", lines, amounts(5, 0, 0), now=T0, expires_at=T0 + TTL)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                ledger.reserve("child", lines, amounts(7, 0, 0), now=T0, expires_at=T0 + TTL)
                ok = ledger.settle(
                    "child", lines, amounts(7, 0, 0), _record("child", lines, 7), now=T0
                )
                code = 0 if ok.applied else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        ledger.settle("parent", lines, amounts(5, 0, 0), _record("parent", lines, 5), now=T0)
        (state,) = ledger.status(lines, now=T0)
        assert state.spent[TOKENS] == 12 and state.held == ZERO


def test_threads_share_one_ledger_without_over_admitting(tmp_path: Path) -> None:
    """Threads of one process, each with its own connection, admit exactly the limit."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    limit, threads, attempts = 50, 8, 20
    admitted: list[int] = []
    with ledger_from_url(url) as ledger:
        lines = _lines(0, limit)

        def run(t: int) -> None:
            n = 0
            for i in range(attempts):
                rid = f"t{t}-{i}"
                if ledger.reserve(rid, lines, amounts(1, 0, 0), now=T0, expires_at=T0 + TTL).ok:
                    ledger.settle(rid, lines, amounts(1, 0, 0), _record(rid, lines, 1), now=T0)
                    n += 1
            admitted.append(n)

        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert sum(admitted) == limit
        assert ledger.status(lines, now=T0)[0].spent[REQUESTS] == limit


def test_many_threads_of_one_process_never_starve(tmp_path: Path) -> None:
    """64 threads of one process sharing one file all get their turn: none is refused as
    'still locked', and the counters are exact."""
    from tb_plugins.errors import LedgerUnavailable

    url = f"sqlite:///{tmp_path}/threads.db?timeout=2"
    ledger = ledger_from_url(url)
    lines = _lines(0, None)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        for i in range(40):
            rid = f"t{n}-{i}"
            try:
                ledger.reserve(rid, lines, amounts(10, 5, 0), now=T0, expires_at=T0 + TTL)
                ledger.settle(rid, lines, amounts(10, 5, 0), _record(rid, lines, 15), now=T0)
            except LedgerUnavailable as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    (state,) = ledger.status(lines[:1], now=T0)
    assert state.spent[TOKENS] == 64 * 40 * 15 and state.held == ZERO


def test_writers_of_one_process_are_served_first_come_first_served() -> None:
    """The in-process writer lock hands over to waiters in arrival order (no starvation)."""
    import time

    from tb_plugins.ledger.sqlite.locks import FairLock as _FairLock

    lock = _FairLock()
    assert lock.acquire(timeout=1)
    order: list[int] = []

    def waiter(n: int) -> None:
        assert lock.acquire(timeout=10)
        order.append(n)
        lock.release()

    threads = []
    for n in range(8):
        t = threading.Thread(target=waiter, args=(n,))
        t.start()
        threads.append(t)
        while len(lock._waiters) < n + 1:  # wait until this one is queued before the next
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join()
    assert order == list(range(8))


def test_a_writer_that_times_out_leaves_the_queue() -> None:
    """A waiter that gives up is removed from the queue; the lock still works afterwards."""
    from tb_plugins.ledger.sqlite.locks import FairLock as _FairLock

    lock = _FairLock()
    assert lock.acquire(timeout=1)
    assert not lock.acquire(timeout=0.01)
    assert len(lock._waiters) == 0
    lock.release()
    assert lock.acquire(timeout=0.01)


# -- async operations: at once on the event loop's thread, or a worker when the file is busy --


async def test_async_operations_run_at_once_when_the_file_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody else writing, the async twins run on the loop's thread: no thread hop."""
    import tb_plugins.ledger.sqlite.ledger as sqlite_mod

    def no_hop(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async operation went to a worker thread")

    monkeypatch.setattr(sqlite_mod, "_to_thread", no_hop)
    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'l.db'}")
    lines = _lines(0, 1)
    five = amounts(5, 0, 0)
    assert (await ledger.areserve("r1", lines, five, now=T0, expires_at=T0 + TTL)).ok
    assert not (await ledger.areserve("r2", lines, five, now=T0, expires_at=T0 + TTL)).ok
    settled = await ledger.asettle("r1", lines, amounts(7, 0, 0), _record("r1", lines, 7), now=T0)
    assert settled.applied
    assert (await ledger.astatus(lines, now=T0))[0].spent[TOKENS] == 7
    assert await ledger.aclaim_alert("a", expires_at=None)
    assert not await ledger.arelease("r1", now=T0)
    ledger.close()


async def test_an_async_operation_waits_in_a_worker_when_another_process_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another connection holds the write lock, the loop is not blocked: the operation
    changes nothing at once and goes to a worker thread, which waits and then succeeds."""
    import tb_plugins.ledger.sqlite.ledger as sqlite_mod

    path = tmp_path / "l.db"
    ledger = ledger_from_url(f"sqlite:///{path}")
    lines = _lines(0, None)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, mid-transaction
    hops: list[str] = []
    real = sqlite_mod._to_thread

    async def hop(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn.__name__)
        assert ledger.status(lines, now=T0)[0] == _zero_state()  # nothing written meanwhile
        other.execute("COMMIT")  # the other writer finishes while the worker waits
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(sqlite_mod, "_to_thread", hop)
    result = await ledger.areserve("r1", lines, amounts(5, 0, 0), now=T0, expires_at=T0 + TTL)
    assert result.ok and hops == ["_run"]
    assert ledger.status(lines, now=T0)[0].held[TOKENS] == 5
    other.close()
    ledger.close()


async def test_an_async_operation_queues_behind_a_writer_thread_of_its_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of the same process holding the writer lock sends the operation to a worker
    (which queues first come, first served) instead of blocking the loop."""
    import tb_plugins.ledger.sqlite.ledger as sqlite_mod

    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'l.db'}")
    lines = _lines(0, None)
    writer = sqlite_mod._writer_lock(ledger.path)  # type: ignore[attr-defined]
    assert writer.acquire(timeout=1)
    real = sqlite_mod._to_thread
    hops: list[str] = []

    async def hop(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn.__name__)
        writer.release()
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(sqlite_mod, "_to_thread", hop)
    assert (await ledger.areserve("r1", lines, amounts(5, 0, 0), now=T0, expires_at=T0 + TTL)).ok
    assert hops == ["_run"]
    ledger.close()


def _zero_state() -> Any:
    from tb_plugins.ledger import LineState

    return LineState(spent=ZERO, held=ZERO)


async def test_checkpoints_of_async_writes_run_in_a_worker_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints (a checkpoint fsyncs the file); every
    CHECKPOINT_EVERY async writes a worker thread checkpoints the WAL instead."""
    import tb_plugins.ledger.sqlite.ledger as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", 3)
    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'l.db'}")
    real = sqlite_mod.SQLiteLedger._checkpoint
    threads: list[int] = []

    def spy(self: Any) -> None:
        threads.append(threading.get_ident())
        real(self)

    monkeypatch.setattr(sqlite_mod.SQLiteLedger, "_checkpoint", spy)
    lines = _lines(0, None)
    for i in range(3):
        assert (
            await ledger.areserve(f"r{i}", lines, amounts(1, 0, 0), now=T0, expires_at=T0 + TTL)
        ).ok
    pending = ledger._checkpointing  # type: ignore[attr-defined]
    assert pending is not None
    await pending
    assert threads and threads[0] != threading.get_ident()
    fast = ledger._conn(fast=True)  # type: ignore[attr-defined]
    assert fast.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    ledger.close()
