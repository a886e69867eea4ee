"""Hostile input and a hostile environment, on every ledger backend.

What a ledger is given may be absurd (amounts past 64 bits, names with NUL or lone
surrogates) and the ground may move under it (its SQLite file deleted or replaced). Each test
proves that such a case is either handled exactly or refused with a clear error of the right
kind: a plain :class:`LedgerError` for bad input (the guard never admits a call on it), and
:class:`LedgerUnavailable` only for a store that cannot be reached (where ``fail_open`` may
admit). Time is injected, never slept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import make_ledger
from tb_plugins.core.usage import Amounts
from tb_plugins.errors import LedgerError, LedgerUnavailable
from tb_plugins.ledger import Ledger, Line, ledger_from_url
from tb_plugins.ledger.sqlite import ledger as sqlite_ledger
from test_ledger_conformance import T0, TTL, charge, cost, line, record, state

HUGE = [2**63, 2**64, 10**19]
"""Amounts no 64-bit counter holds (2**63 nano-dollars is about $9.2 billion)."""


def max_amount(backend: str) -> int:
    """The largest amount ``backend`` takes: 2**63 - 1, or 2**53 for Redis (whose script adds
    doubles, exact up to 2**53)."""
    return 2**53 if backend == "redis" else 2**63 - 1


def unchanged(ledger: Ledger, lines: list[Line]) -> None:
    """Nothing held, nothing spent, nothing logged."""
    assert ledger.status(lines, now=T0) == (state(),) * len(lines)
    assert ledger.records() == []
    assert ledger.usage() == []


def assert_out_of_range(info: pytest.ExceptionInfo[LedgerError]) -> None:
    assert not isinstance(info.value, LedgerUnavailable)
    assert "amount out of range" in str(info.value)


# -- amounts past 64 bits -------------------------------------------------------------------


@pytest.mark.parametrize("huge", HUGE)
@pytest.mark.parametrize("unit", [0, 3], ids=["tokens", "usd_nano"])
def test_a_reserve_of_an_amount_past_64_bits_is_a_ledger_error_and_holds_nothing(
    ledger: Ledger, huge: int, unit: int
) -> None:
    """A reservation of 2**63, 2**64 or 10**19 (tokens, or a dollar hold in nano-dollars) is
    a LedgerError naming the problem, never LedgerUnavailable (which fail_open would admit),
    on a limited line and on an unlimited one; nothing is held, and the ledger still works."""
    amt = list(cost(10))
    amt[unit] = huge
    amounts: Amounts = (amt[0], amt[1], amt[2], amt[3], amt[4], amt[5])
    lines = [line("global"), line("team:a", tokens=100, usd=10**9)]
    for subset in (lines, lines[:1]):
        with pytest.raises(LedgerError) as info:
            ledger.reserve("r1", subset, amounts, now=T0, expires_at=T0 + TTL)
        assert_out_of_range(info)
    unchanged(ledger, lines)
    assert ledger.release("r1", now=T0) is False
    charge(ledger, "ok", lines, cost(5))
    assert ledger.status(lines, now=T0)[0] == state(spent=cost(5))


@pytest.mark.parametrize("huge", HUGE)
@pytest.mark.parametrize("unit", [0, 3], ids=["tokens", "usd_nano"])
def test_a_settle_of_an_amount_past_64_bits_is_a_ledger_error_and_changes_nothing(
    ledger: Ledger, huge: int, unit: int
) -> None:
    """Settling 2**63, 2**64 or 10**19 is a LedgerError (not LedgerUnavailable): the hold
    stays as it was, no spend is added, nothing is logged and the id is not marked settled."""
    ln = [line("global"), line("user:a", tokens=100)]
    assert ledger.reserve("r1", ln, cost(10), now=T0, expires_at=T0 + TTL).ok
    amt = list(cost(10))
    amt[unit] = huge
    amounts: Amounts = (amt[0], amt[1], amt[2], amt[3], amt[4], amt[5])
    with pytest.raises(LedgerError) as info:
        ledger.settle("r1", ln, amounts, record("r1", ("global", "user:a")), now=T0)
    assert_out_of_range(info)
    assert ledger.status(ln, now=T0) == (state(held=cost(10)),) * 2
    assert ledger.records() == []
    assert ledger.settle("r1", ln, cost(7), record("r1", ("global", "user:a")), now=T0).applied


@pytest.mark.parametrize("bad", [-1, 1.5, True, None], ids=["negative", "float", "bool", "none"])
def test_an_amount_that_is_not_a_whole_number_from_0_is_a_ledger_error(
    ledger: Ledger, bad: Any
) -> None:
    """Negative, fractional, boolean or missing amounts are refused before anything is
    written (never stored as a float, never an outage)."""
    amounts = (bad, 0, 0, 0, 1, 1)
    with pytest.raises(LedgerError, match="amount out of range") as info:
        ledger.reserve("r1", [line("u")], amounts, now=T0, expires_at=T0 + TTL)  # type: ignore[arg-type]
    assert not isinstance(info.value, LedgerUnavailable)
    with pytest.raises(LedgerError, match="amount out of range"):
        ledger.settle("r1", [line("u")], amounts, record("r1", ("u",)), now=T0)  # type: ignore[arg-type]
    unchanged(ledger, [line("u")])


@pytest.mark.parametrize("huge", HUGE)
def test_a_usage_record_with_tokens_past_64_bits_is_refused(ledger: Ledger, huge: int) -> None:
    """A usage record whose token counts no 64-bit column holds is a LedgerError, whether
    appended (a refusal) or settled; the log stays empty."""
    with pytest.raises(LedgerError, match="amount out of range") as info:
        ledger.append_usage(record("d1", ("u",), action="deny", input_tokens=huge))
    assert not isinstance(info.value, LedgerUnavailable)
    with pytest.raises(LedgerError, match="amount out of range"):
        ledger.settle("r1", [line("u")], cost(1), record("r1", ("u",), output_tokens=huge), now=T0)
    unchanged(ledger, [line("u")])


def test_a_settle_that_would_take_a_sum_past_64_bits_changes_nothing(
    ledger: Ledger, backend: str
) -> None:
    """Settles of the largest amount a backend takes, until one more would take the line's
    sum past 2**63 - 1: that settle is a LedgerError (not an outage, not a wrapped-around or
    float counter), and the line, the log and the id's settled mark stay as they were."""
    big = max_amount(backend)
    ln = line("global", "total")
    amt: Amounts = (big, 0, 0, 0, 1, 1)
    n = 2**63 // big - (1 if big == 2**53 else 0)  # settles that still fit
    for i in range(n):
        ledger.settle(f"s{i}", [ln], amt, record(f"s{i}", ("global",)), now=T0)
    before = ledger.status([ln], now=T0)
    assert before[0].spent[0] == n * big
    with pytest.raises(LedgerError) as info:
        ledger.settle("over", [ln], amt, record("over", ("global",)), now=T0)
    assert_out_of_range(info)
    assert ledger.status([ln], now=T0) == before
    assert len(ledger.records()) == n
    assert ledger.release("over", now=T0) is False
    other = line("user:b", "total")
    assert ledger.settle("over", [other], cost(1), record("over", ("user:b",)), now=T0).applied


def test_holds_that_sum_past_64_bits_read_as_a_ledger_error(ledger: Ledger, backend: str) -> None:
    """Live holds of the largest amount a backend takes, until their sum reaches 2**63: a
    status (which sums every unit) is a LedgerError naming the problem, not an outage and
    not a wrapped-around number; once the holds are released the line reads zero again."""
    big = max_amount(backend)
    ln = line("global", "total")
    amt: Amounts = (big, 0, 0, 0, 1, 1)
    n = -(-(2**63) // big)  # holds whose sum reaches 2**63
    for i in range(n):
        assert ledger.reserve(f"h{i}", [ln], amt, now=T0, expires_at=T0 + TTL).ok
    with pytest.raises(LedgerError) as info:
        ledger.status([ln], now=T0)
    assert_out_of_range(info)
    for i in range(n):
        assert ledger.release(f"h{i}", now=T0) is True
    assert ledger.status([ln], now=T0) == (state(),)


# -- names: NUL, control characters, astral planes, lone surrogates -------------------------

NAMES = [
    "team:a",
    "team:a\x00b",
    "team:a\x00c",
    "team:a\x00",
    "team:\x00",
    "team:\x01\x1f\x7f\x9f\n\t\r",
    "team:\u2028\u2029\ufeff",
    "team:🚀\U0010ffff",
    "team:\ufdd0",  # what the PostgreSQL ledger escapes NUL with
    "team:\ufdd00",
    "team:\\u0000",  # what JSON escapes NUL to, as plain text
]


def test_names_with_nul_control_and_astral_characters_are_stored_and_reported_exactly(
    ledger: Ledger,
) -> None:
    """Scope and model names holding NUL, other control characters, astral characters (or
    the escapes backends use for them) keep their own counters and come back exactly from
    status, scopes, records and every usage report; none is merged with another (SQLite's
    JSON functions once cut "team:a\\x00b" to "team:a")."""
    lines = [line(name, tokens=10**6) for name in NAMES]
    for i, ln in enumerate(lines):
        charge(ledger, f"r{i}", [line("global"), ln], cost(i + 1), model="m:" + ln.scope)
    assert ledger.status(lines, now=T0) == tuple(
        state(spent=cost(i + 1)) for i in range(len(NAMES))
    )
    assert sorted(ledger.scopes()) == sorted([("global", "day")] + [(n, "day") for n in NAMES])
    got = ledger.records()
    assert [r.scopes for r in got] == [("global", n) for n in NAMES]
    assert [r.model for r in got] == ["m:" + n for n in NAMES]
    assert [r.requested_model for r in got] == ["m:" + n for n in NAMES]
    by_scope = {r.key: r.input_tokens for r in ledger.usage()}
    want = {n: i + 1 for i, n in enumerate(NAMES)}
    assert by_scope == {"global": sum(want.values()), **want}
    by_model = {r.key: r.input_tokens for r in ledger.usage(group_by="model")}
    assert by_model == {"m:" + n: i + 1 for i, n in enumerate(NAMES)}
    for i, name in enumerate(NAMES):
        only = ledger.usage(scope=name)
        assert {r.key: r.input_tokens for r in only} == {"global": i + 1, name: i + 1}
        assert [r.key for r in ledger.usage(group_by="model", scope=name)] == ["m:" + name]
    assert [r.key for r in ledger.usage(group_by="day", scope="team:a\x00b")] == ["2023-11-14"]


def test_names_with_nul_in_refusals_ids_and_alert_keys_round_trip(ledger: Ledger) -> None:
    """A refusal logged with NUL in its id, model and action, and an alert key with a NUL,
    are stored and read back exactly; the alert is claimed once."""
    deny = record("d\x00id", ("team:a\x00b",), action="deny", model="m\x00", extra={"k": "\x00"})
    ledger.append_usage(deny)
    assert ledger.records() == [deny]
    assert [(r.key, r.denied) for r in ledger.usage(group_by="model")] == [("m\x00", 1)]
    assert ledger.claim_alert("team:a\x00b|day|0.8", expires_at=None) is True
    assert ledger.claim_alert("team:a\x00b|day|0.8", expires_at=None) is False
    assert ledger.claim_alert("team:a\x00c|day|0.8", expires_at=None) is True


SURROGATE = "m\ud800"
HOLD = {"now": T0, "expires_at": T0 + TTL}


def _bad_calls(ledger: Ledger) -> dict[str, Callable[[], object]]:
    ok = line("user:a", tokens=100)
    bad_line = dataclasses.replace(ok, scope="user:\ud800")
    bad_key = dataclasses.replace(ok, key="user%3A\udfff|day")
    rec = record("r1", ("user:a",))
    calls: dict[str, Callable[[], object]] = {
        "reserve scope": lambda: ledger.reserve("r1", [bad_line], cost(1), **HOLD),
        "reserve key": lambda: ledger.reserve("r1", [bad_key], cost(1), **HOLD),
        "reserve id": lambda: ledger.reserve("r\ud800", [ok], cost(1), **HOLD),
        "settle scope": lambda: ledger.settle("r1", [bad_line], cost(1), rec, now=T0),
        "settle id": lambda: ledger.settle("r\ud800", [ok], cost(1), rec, now=T0),
        "record scope": lambda: ledger.settle(
            "r1", [ok], cost(1), dataclasses.replace(rec, scopes=("user:\ud800",)), now=T0
        ),
        "record model": lambda: ledger.settle(
            "r1", [ok], cost(1), dataclasses.replace(rec, model=SURROGATE), now=T0
        ),
        "record requested model": lambda: ledger.settle(
            "r1", [ok], cost(1), dataclasses.replace(rec, requested_model=SURROGATE), now=T0
        ),
        "record id": lambda: ledger.settle(
            "r1", [ok], cost(1), dataclasses.replace(rec, reservation_id="r\udc00"), now=T0
        ),
        "append model": lambda: ledger.append_usage(
            dataclasses.replace(rec, action="deny", model=SURROGATE)
        ),
        "release id": lambda: ledger.release("r\ud800", now=T0),
        "alert key": lambda: ledger.claim_alert("user:\ud800|day|0.8", expires_at=None),
        "usage filter": lambda: ledger.usage(scope="user:\ud800"),
    }
    assert list(calls) == BAD_CALLS
    return calls


BAD_CALLS = [
    "reserve scope", "reserve key", "reserve id", "settle scope", "settle id", "record scope",
    "record model", "record requested model", "record id", "append model", "release id",
    "alert key", "usage filter",
]  # fmt: skip


@pytest.mark.parametrize("where", BAD_CALLS)
def test_a_lone_surrogate_is_refused_before_anything_is_written(ledger: Ledger, where: str) -> None:
    """A scope, line key, model, reservation id or alert key holding a lone surrogate (which
    UTF-8 cannot encode) is a LedgerError that says so, raised before anything is written;
    the ledger is not poisoned: the same calls with valid names work afterwards."""
    with pytest.raises(LedgerError, match="lone surrogate") as info:
        _bad_calls(ledger)[where]()
    assert not isinstance(info.value, LedgerUnavailable)
    unchanged(ledger, [line("user:a")])
    assert ledger.scopes() == []
    charge(ledger, "r1", [line("user:a", tokens=100)], cost(3))
    assert [r.key for r in ledger.usage()] == ["user:a"]


def test_a_lone_surrogate_inside_extra_is_kept_exactly(ledger: Ledger) -> None:
    """``extra`` is free-form JSON: a lone surrogate in it is written escaped and read back
    exactly, on every backend."""
    rec = record("r1", ("user:a",), extra={"error": "bad \ud800 name", "k\udfff": [1]})
    assert ledger.reserve("r1", [line("user:a")], cost(1), now=T0, expires_at=T0 + TTL).ok
    assert ledger.settle("r1", [line("user:a")], cost(1), rec, now=T0).applied
    ledger.append_usage(dataclasses.replace(rec, reservation_id="d1", action="deny"))
    assert [r.extra for r in ledger.records()] == [rec.extra, rec.extra]


# -- SQLite: the file deleted or replaced under the ledger ----------------------------------


class FakeClock:
    """The monotonic clock of the SQLite ledger's file checks, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = sqlite_ledger.FILE_CHECK_EVERY) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(sqlite_ledger, "_clock", fake)
    return fake


@pytest.fixture
def db(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Path, sqlite_ledger.SQLiteLedger]]:
    path = tmp_path / "ledger.db"
    led = ledger_from_url(f"sqlite:///{path}")
    assert isinstance(led, sqlite_ledger.SQLiteLedger)
    yield path, led
    led.close()


def _spent(path: Path, ln: Line) -> int:
    with ledger_from_url(f"sqlite:///{path}") as other:
        return other.status([ln], now=T0)[0].spent[0]


@pytest.mark.sqlite
def test_a_deleted_sqlite_file_makes_the_ledger_unavailable_instead_of_losing_spend(
    db: tuple[Path, sqlite_ledger.SQLiteLedger], clock: FakeClock
) -> None:
    """Once the file is deleted, the next call after the check interval (reads and writes)
    is LedgerUnavailable naming the file and saying what happened, and stays so: no spend
    goes to the unlinked file, and no new file is created at the path behind anyone's back.
    reopen() then starts the file now at the path (here a new, empty one)."""
    path, led = db
    ln = line("user:a", tokens=100)
    charge(led, "r1", [ln], cost(5))
    for suffix in ("", "-wal", "-shm"):
        with_suffix = Path(f"{path}{suffix}")
        if with_suffix.exists():
            with_suffix.unlink()
    clock.advance()
    for op in (
        lambda: led.reserve("r2", [ln], cost(5), now=T0, expires_at=T0 + TTL),
        lambda: led.settle("r2", [ln], cost(5), record("r2", ("user:a",)), now=T0),
        lambda: led.status([ln], now=T0),
        lambda: led.records(),
    ):
        with pytest.raises(LedgerUnavailable, match=r"ledger\.db: the ledger file was deleted"):
            op()
    assert not path.exists()
    led.reopen()
    assert led.status([ln], now=T0) == (state(),)
    charge(led, "r3", [ln], cost(7))
    assert _spent(path, ln) == 7


@pytest.mark.sqlite
def test_a_replaced_sqlite_file_makes_the_ledger_unavailable(
    db: tuple[Path, sqlite_ledger.SQLiteLedger], clock: FakeClock, tmp_path: Path
) -> None:
    """A file moved over the ledger's path (another ledger, a restored backup) is detected
    by its inode: calls are LedgerUnavailable ("replaced"), and the new file is left as it
    is until reopen(), which then reads it."""
    path, led = db
    ln = line("user:a", tokens=100)
    charge(led, "r1", [ln], cost(5))
    # Empty the write-ahead log first: a stale one beside the path would be replayed into
    # whatever file is moved there (SQLite's hazard, not the ledger's).
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other_path = tmp_path / "other.db"
    with ledger_from_url(f"sqlite:///{other_path}") as other:
        charge(other, "o1", [ln], cost(40))
    os.replace(other_path, path)
    clock.advance()
    with pytest.raises(LedgerUnavailable, match="was replaced by another file"):
        led.reserve("r2", [ln], cost(1), now=T0, expires_at=T0 + TTL)
    assert _spent(path, ln) == 40
    led.reopen()
    assert led.status([ln], now=T0)[0].spent == cost(40)


@pytest.mark.sqlite
def test_a_new_thread_never_opens_a_file_that_is_not_the_ledgers(
    db: tuple[Path, sqlite_ledger.SQLiteLedger],
) -> None:
    """A thread opening its first connection after the file was deleted fails at once
    (before the interval), instead of creating an empty file at the path."""
    path, led = db
    charge(led, "r1", [line("user:a")], cost(5))
    path.unlink()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            led.status([line("user:a")], now=T0)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], LedgerUnavailable)
    assert not path.exists()


@pytest.mark.sqlite
def test_the_file_is_checked_at_most_once_per_interval(
    db: tuple[Path, sqlite_ledger.SQLiteLedger],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check costs one stat per FILE_CHECK_EVERY seconds at most, whatever the call
    rate, and always runs before the first call after that interval."""
    _, led = db
    stats: list[int] = []
    real = led._stat_id

    def counted() -> tuple[int, int] | None:
        stats.append(1)
        return real()

    monkeypatch.setattr(led, "_stat_id", counted)
    ln = line("user:a")
    for i in range(50):
        charge(led, f"r{i}", [ln], cost(1))
    assert len(stats) <= 1
    clock.advance()
    led.status([ln], now=T0)
    assert len(stats) <= 2 and stats
    clock.advance(0.1)
    led.status([ln], now=T0)
    assert len(stats) <= 2


@pytest.mark.sqlite
def test_the_guard_applies_its_fail_mode_when_the_sqlite_file_is_deleted(
    tmp_path: Path, clock: FakeClock
) -> None:
    """With the file gone, a fail_closed guard refuses the call with LedgerUnavailable, and
    a fail_open guard admits it, keeping its spend locally (pending)."""
    from tb_plugins import BudgetGuard, Usage
    from tb_plugins.warnings import FailOpenWarning

    path = tmp_path / "guarded.db"
    prices = {"m": {"input": "$1/1M", "output": "$2/1M"}}
    budgets = [{"scope": "team:t", "tokens": 10_000, "window": "day"}]
    guards = {
        mode: BudgetGuard.from_dict({"ledger": f"sqlite:///{path}", "on_ledger_error": mode,
                                     "prices": prices, "alerts": [], "budgets": budgets})
        for mode in ("fail_closed", "fail_open")
    }  # fmt: skip
    try:
        for guard in guards.values():
            d = guard.check(model="m", input_tokens=10, max_tokens=5, scopes=["team:t"])
            guard.settle(d, Usage(10, 5, model="m"))
        path.unlink()
        clock.advance()
        with pytest.raises(LedgerUnavailable, match="deleted"):
            guards["fail_closed"].check(model="m", input_tokens=10, max_tokens=5,
                                        scopes=["team:t"])  # fmt: skip
        with pytest.warns(FailOpenWarning):
            d = guards["fail_open"].check(model="m", input_tokens=10, max_tokens=5,
                                          scopes=["team:t"])  # fmt: skip
            guards["fail_open"].settle(d, Usage(10, 5, model="m"))
        assert guards["fail_open"].pending == 1
    finally:
        for guard in guards.values():
            guard.close()


@pytest.mark.sqlite
def test_a_memory_ledger_has_no_file_to_check(clock: FakeClock) -> None:
    """memory:// keeps working whatever the clock says (there is no file)."""
    led = make_ledger("memory", Path("."))
    clock.advance(10)
    charge(led, "r1", [line("user:a")], cost(1))
    assert led.status([line("user:a")], now=T0)[0].spent == cost(1)
    led.reopen()  # type: ignore[attr-defined]
    assert led.status([line("user:a")], now=T0)[0].spent == cost(1)
