"""Hostile input through the guard, on every ledger: each test names a class of bad input and
asserts a clear error or a correct decision, no spend lost, none invented, nothing left held.

Time is injected (a wall clock and a monotonic clock); ledgers come from the ``ledger``
fixture (memory, sqlite, redis, postgres).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tb_plugins import BudgetExceeded, BudgetGuard, LedgerUnavailable, Usage
from tb_plugins.core.usage import MAX_CALL_TOKENS
from tb_plugins.errors import LedgerError
from tb_plugins.ledger import Ledger
from tb_plugins.warnings import FailOpenWarning
from test_guard import MSGS, Clock


def guard_on(
    ledger: Ledger,
    budgets: list[dict[str, Any]],
    *,
    clock: Clock | None = None,
    monotonic: Clock | None = None,
    **policy: Any,
) -> BudgetGuard:
    data: dict[str, Any] = {"alerts": [], "budgets": budgets, **policy}
    return BudgetGuard.from_dict(data, ledger=ledger, clock=clock or Clock(), monotonic=monotonic)


def check(guard: BudgetGuard, scopes: Sequence[str] = ("team:a",), **kw: Any) -> Any:
    kw.setdefault("max_tokens", 100)
    return guard.check(model=kw.pop("model", "gpt-4o"), messages=MSGS, scopes=scopes, **kw)


def totals(guard: BudgetGuard, scope: str = "team:a") -> tuple[float, float]:
    """(spent, reserved) of the tokens budget on ``scope``."""
    (s,) = [s for s in guard.status(scope) if s.unit == "tokens"]
    return s.spent, s.reserved


def settled(guard: BudgetGuard) -> list[str]:
    return [r.reservation_id for r in guard.ledger.records() if r.action != "deny"]


TEAM = [{"scope": "team:a", "tokens": 10_000, "window": "day"}]

# -- amounts a caller passes -------------------------------------------------------------------

BAD_COUNTS = [-1, -(10**9), 1.5, True, math.nan, math.inf, "100", MAX_CALL_TOKENS + 1, 10**19]


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("field", ["max_tokens", "input_tokens"])
def test_a_bad_amount_in_a_check_is_refused_and_holds_nothing(
    ledger: Ledger, field: str, value: Any
) -> None:
    """max_tokens / input_tokens that are negative, fractional, boolean, NaN, text or above
    the maximum raise TypeError/ValueError naming the field, and hold nothing."""
    guard = guard_on(ledger, TEAM)
    with pytest.raises((TypeError, ValueError), match=field):
        check(guard, **{field: value})
    assert totals(guard) == (0, 0)


@pytest.mark.parametrize(
    "fields",
    [
        {"input_tokens": -100_000, "output_tokens": 0},
        {"input_tokens": 10, "output_tokens": -1},
        {"input_tokens": 10**19, "output_tokens": 0},
        {"input_tokens": 1.5, "output_tokens": 0},
        {"input_tokens": 10, "output_tokens": 0, "cached_input_tokens": -5},
        {"input_tokens": 10, "output_tokens": 0, "usd": -1.0},
        {"input_tokens": 10, "output_tokens": 0, "usd": math.nan},
        {"input_tokens": 10, "output_tokens": 0, "usd": math.inf},
        {"input_tokens": 10, "output_tokens": 0, "usd": 1e12},
    ],
    ids=repr,
)
def test_negative_or_oversized_usage_is_refused_before_it_reaches_a_budget(
    ledger: Ledger, fields: dict[str, Any]
) -> None:
    """Usage cannot carry negative, fractional, non-finite or oversized amounts, so a settle
    can never give a budget room back; the decision is still settled with real usage after."""
    guard = guard_on(ledger, TEAM)
    d = check(guard)
    with pytest.raises((TypeError, ValueError)):
        Usage(**fields)
    guard.settle(d, Usage(20, 30))
    assert totals(guard) == (50, 0)
    assert settled(guard) == [d.reservation_id]


# -- a ledger that refuses is not a ledger that is down ----------------------------------------


class Refusing(Ledger):
    """Wraps a real ledger; ``fail`` names operations that raise ``error`` instead."""

    schemes = ()

    def __init__(self, inner: Ledger, error: Exception) -> None:
        self.inner, self.error = inner, error
        self.url = inner.url
        self.fail: set[str] = set()
        self.refuse_ids: set[str] = set()
        self.calls: list[str] = []
        self.local_clock = False  # True: the guard keeps to its injected clock

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Ledger:
        raise NotImplementedError

    def _do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(name)
        if name in self.fail or (args and args[0] in self.refuse_ids):
            raise self.error
        return getattr(self.inner, name)(*args, **kwargs)

    def reserve(self, *a: Any, **k: Any) -> Any:
        return self._do("reserve", *a, **k)

    def settle(self, *a: Any, **k: Any) -> Any:
        return self._do("settle", *a, **k)

    def release(self, *a: Any, **k: Any) -> Any:
        return self._do("release", *a, **k)

    def status(self, *a: Any, **k: Any) -> Any:
        return self.inner.status(*a, **k)

    def scopes(self) -> Any:
        return self.inner.scopes()

    def claim_alert(self, *a: Any, **k: Any) -> Any:
        return self._do("claim_alert", *a, **k)

    def append_usage(self, *a: Any, **k: Any) -> Any:
        return self._do("append_usage", *a, **k)

    def usage(self, **k: Any) -> Any:
        return self.inner.usage(**k)

    def records(self, **k: Any) -> Any:
        return self.inner.records(**k)

    def server_time(self) -> Any:
        return None if self.local_clock else self._do("server_time")


@pytest.mark.parametrize(
    "error",
    [OverflowError("int too big to convert"), LedgerError("amount out of range"), TypeError("x")],
    ids=lambda e: type(e).__name__,
)
def test_an_overflow_in_the_ledger_is_never_admitted_under_fail_open(
    ledger: Ledger, error: Exception
) -> None:
    """A reservation the ledger refuses (overflow, out of range, a bug) raises LedgerError,
    not LedgerUnavailable, so fail_open does not admit the call unchecked."""
    wrapped = Refusing(ledger, error)
    guard = guard_on(wrapped, TEAM, on_ledger_error="fail_open")
    wrapped.fail.add("reserve")
    with pytest.raises(LedgerError, match="refused") as info:
        check(guard)
    assert not isinstance(info.value, LedgerUnavailable)
    assert totals(guard) == (0, 0) and settled(guard) == []


def test_a_settle_the_ledger_rejects_does_not_block_the_others(ledger: Ledger) -> None:
    """Spend kept while the ledger was down is written back past an entry the ledger
    rejects; the rejected one is logged, kept in guard.rejected, and never retried."""
    wrapped = Refusing(ledger, LedgerUnavailable("connection refused"))
    clock = Clock()
    guard = guard_on(wrapped, TEAM, clock=clock)
    decisions = [check(guard) for _ in range(3)]
    wrapped.fail.add("settle")
    for d in decisions:
        guard.settle(d, Usage(100, 10))
    assert guard.pending == 3
    wrapped.fail.clear()
    wrapped.error = LedgerError("integer overflow")
    wrapped.refuse_ids.add(decisions[0].reservation_id)  # the first one in the queue
    assert guard.flush() == 2
    assert guard.pending == 0
    assert [r.reservation_id for r in guard.rejected] == [decisions[0].reservation_id]
    assert sorted(settled(guard)) == sorted(d.reservation_id for d in decisions[1:])
    spent, held = totals(guard)
    assert spent == 220 and held == decisions[0].estimate.tokens  # its hold expires by TTL
    assert guard.flush() == 0 and len(guard.rejected) == 1


def test_one_call_waits_for_an_unreachable_ledger_once(ledger: Ledger) -> None:
    """With spend pending and a clock reading due, a call on a dead ledger tries it once
    (not a clock sync, then a flush, then a reserve), and its settle does not wait again."""
    wrapped = Refusing(ledger, LedgerUnavailable("timed out"))
    clock = Clock()
    guard = guard_on(wrapped, TEAM, clock=clock, on_ledger_error="fail_open")
    d = check(guard)
    wrapped.fail |= {"settle", "reserve", "server_time", "release"}
    guard.settle(d, Usage(10, 10))
    clock.t += 120  # the clock reading and the flush are both due now
    wrapped.calls.clear()
    with pytest.warns(Warning, match="fail_open"):
        local = check(guard)
    guard.settle(local, Usage(5, 5))
    assert len(wrapped.calls) == 1, wrapped.calls
    wrapped.fail.clear()
    clock.t += 10
    check(guard, max_tokens=1)  # the next call writes both back first
    assert guard.pending == 0
    assert totals(guard)[0] == 30


# -- clocks ------------------------------------------------------------------------------------


def test_a_wall_clock_stepped_back_does_not_reopen_a_spent_window(ledger: Ledger) -> None:
    """After the host clock steps back an hour, a spent rolling:1m budget stays spent: the
    guard follows the ledger's clock on a monotonic clock (local ledgers: it never goes
    back)."""
    wall, mono = Clock(), Clock(1000.0)
    guard = guard_on(
        ledger,
        [{"scope": "team:a", "tokens": 1_000, "window": "rolling:1m"}],
        clock=wall,
        monotonic=mono,
    )
    d = check(guard, max_tokens=1)
    guard.settle(d, Usage(990, 0))
    with pytest.raises(BudgetExceeded):
        check(guard, max_tokens=100)
    wall.t -= 3600
    mono.t += 1
    with pytest.raises(BudgetExceeded):
        check(guard, max_tokens=100)
    assert guard.now() >= d.created_at


# -- scope names -------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [" team:a", "team:a ", "\tteam:a\n"])
def test_a_padded_scope_is_charged_to_its_budget(ledger: Ledger, scope: str) -> None:
    """Whitespace around a scope is dropped, so padding cannot escape a team:* budget."""
    guard = guard_on(ledger, [{"scope": "team:*", "tokens": 1_000, "window": "day"}])
    d = check(guard, [scope])
    assert d.scopes == ("global", "team:a")
    guard.settle(d, Usage(50, 50))
    assert totals(guard) == (100, 0)


@pytest.mark.parametrize(
    "scope",
    [
        "tenant:a",  # an unknown kind would escape every budget
        "team:a\x00b",
        "team:a\x1b[2J",
        "user:\ud800",
        "team:" + "x" * 600,
        "team:",
        "team",
        "team: a",
        42,
    ],
    ids=repr,
)
def test_a_scope_that_could_escape_or_garble_a_budget_is_refused(
    ledger: Ledger, scope: Any
) -> None:
    """Unknown kinds, control characters, lone surrogates, over-long and malformed scopes
    raise ValueError naming the scope, and hold nothing."""
    guard = guard_on(ledger, [{"scope": "team:*", "tokens": 1_000, "window": "day"}])
    with pytest.raises(ValueError, match="scope"):
        check(guard, ["team:a", scope])
    assert totals(guard) == (0, 0)


# -- decisions and guards ----------------------------------------------------------------------


def test_a_decision_settles_only_on_the_guard_that_made_it(ledger: Ledger) -> None:
    """Settling or releasing another guard's decision raises ValueError and charges
    nothing; the guard that made it still settles it."""
    a = guard_on(ledger, TEAM)
    b = guard_on(ledger, TEAM)
    d = check(a)
    with pytest.raises(ValueError, match="another BudgetGuard"):
        b.settle(d, Usage(10, 10))
    with pytest.raises(ValueError, match="another BudgetGuard"):
        b.release(d)
    assert settled(a) == []
    assert totals(a) == (0, d.estimate.tokens)
    a.settle(d, Usage(10, 10))
    assert totals(a) == (20, 0)


# -- time edges --------------------------------------------------------------------------------


def test_a_call_across_midnight_is_charged_and_dated_on_the_day_it_was_admitted(
    ledger: Ledger,
) -> None:
    """Reserved at 23:59:59 and settled at 00:00:01: the day before pays, and the report
    dates the call on that day too."""
    midnight = datetime(2026, 9, 22, tzinfo=timezone.utc).timestamp()
    clock = Clock(midnight - 1)
    wrapped = Refusing(ledger, LedgerError("unused"))
    wrapped.local_clock = True  # the injected clock, not the server's, crosses midnight
    guard = guard_on(wrapped, TEAM, clock=clock)
    d = check(guard)
    clock.t += 2
    guard.settle(d, Usage(40, 2))
    assert totals(guard) == (0, 0)  # the new day starts empty
    (row,) = [r for r in guard.usage(group_by="day") if r.tokens]
    assert row.key == "2026-09-21" and row.tokens == 42
    (rec,) = [r for r in guard.ledger.records() if r.reservation_id == d.reservation_id]
    assert rec.ts == d.created_at


def test_a_call_longer_than_its_rolling_window_is_counted_in_it(ledger: Ledger) -> None:
    """A call that lasts 90 s on a rolling:1m budget is charged where the window sees it."""
    clock = Clock()
    guard = guard_on(
        ledger, [{"scope": "team:a", "tokens": 1_000, "window": "rolling:1m"}], clock=clock
    )
    d = check(guard, max_tokens=10)
    clock.t += 90
    guard.settle(d, Usage(985, 5))
    assert totals(guard) == (990, 0)
    with pytest.raises(BudgetExceeded):
        check(guard, max_tokens=500)


# -- model names -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o\x00", "gpt\x1b[2J", "gpt-\ud800", "", "m" * 600, None])
def test_a_model_name_that_cannot_be_stored_is_refused_at_check(ledger: Ledger, model: Any) -> None:
    """A model name with control characters, a lone surrogate, none at all or over 512
    characters raises TypeError/ValueError at check and holds nothing."""
    guard = guard_on(ledger, TEAM)
    with pytest.raises((TypeError, ValueError), match="model"):
        check(guard, model=model)
    assert totals(guard) == (0, 0)


@pytest.mark.parametrize("served", ["gpt-4o\x00mini", "gpt-4o-\ud800"])
def test_an_odd_model_name_a_provider_reports_is_stored_escaped_and_charged(
    ledger: Ledger, served: str
) -> None:
    """A served model name the ledger could not store exactly is escaped, never a reason to
    lose the call's spend."""
    guard = guard_on(ledger, TEAM)
    d = check(guard)
    charge = guard.settle(d, Usage(30, 12, model=served))
    assert charge.applied and totals(guard) == (42, 0)
    (rec,) = guard.ledger.records()
    assert rec.model.isprintable() and rec.model.startswith("gpt-4o")
    assert guard.rejected == []


# -- a ledger that cannot be opened ------------------------------------------------------------


def test_a_ledger_that_cannot_be_opened_fails_the_guard_at_build_under_fail_closed(
    tmp_path: Path,
) -> None:
    """A bad SQLite path or a server that refuses raises LedgerUnavailable when the guard is
    built (not at the first check), with the URL's password hidden."""
    with pytest.raises(LedgerUnavailable, match=r"cannot be opened.*fail_closed"):
        BudgetGuard.from_dict({"ledger": f"sqlite:///{tmp_path}/missing/dir/l.db"})
    with pytest.raises(LedgerUnavailable, match=r"u:\*\*\*@127\.0\.0\.1") as info:
        BudgetGuard.from_dict(
            {"ledger": "postgresql://u:s3cret@127.0.0.1:1/db", "ledger_timeout": 0.3}
        )
    assert "s3cret" not in str(info.value)


def test_a_ledger_that_cannot_be_opened_warns_under_fail_open_and_is_used_once_it_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under fail_open the guard starts with a warning, admits calls locally, and writes
    their spend to the ledger once it can be opened."""
    import tb_plugins.ledger.deferred as deferred

    monkeypatch.setattr(deferred, "_RETRY_EVERY", 0.0)
    folder = tmp_path / "later"
    url = f"sqlite:///{folder}/l.db"
    clock = Clock()
    with pytest.warns(FailOpenWarning, match="cannot be opened"):
        guard = BudgetGuard.from_dict(
            {"ledger": url, "on_ledger_error": "fail_open", "alerts": [], "budgets": TEAM},
            clock=clock,
        )
    with pytest.warns(FailOpenWarning):
        d = check(guard)
    assert d.local
    guard.settle(d, Usage(30, 12))
    assert guard.pending == 1
    folder.mkdir()
    clock.t += 10
    d2 = check(guard, max_tokens=1)  # the ledger opens; the kept spend goes in first
    assert not d2.local and guard.pending == 0
    guard.release(d2)
    assert totals(guard) == (42, 0)


# -- the exhausted alert -----------------------------------------------------------------------


def test_the_first_refusal_of_a_window_fires_one_exhausted_alert_across_guards(
    ledger: Ledger,
) -> None:
    """A budget's first refusal in a window sends one ``exhausted`` alert, whichever of two
    guards sharing the ledger refuses first and however many refusals follow; the next window
    fires again."""
    fired: list[Any] = []
    clock = Clock()
    shared = Refusing(ledger, LedgerError("unused"))
    shared.local_clock = True  # the test clock, not a server's, moves the window on
    budgets = [{"scope": "team:a", "tokens": 1_000, "window": "rolling:1m"}]
    a = guard_on(shared, budgets, clock=clock)
    b = guard_on(shared, budgets, clock=clock)
    a.add_alert_sink(fired.append)
    b.add_alert_sink(fired.append)
    a.settle(check(a, max_tokens=1), Usage(990, 0))
    for guard in (a, b, a, b):
        with pytest.raises(BudgetExceeded):
            check(guard, max_tokens=100)
    assert [(x.kind, x.scope) for x in fired] == [("exhausted", "team:a")]
    assert "exhausted" in fired[0].message and fired[0].utilization >= 0.99
    clock.t += 3600
    a.settle(check(a, max_tokens=1), Usage(990, 0))
    with pytest.raises(BudgetExceeded):
        check(b, max_tokens=100)
    assert [x.kind for x in fired] == ["exhausted", "exhausted"]
