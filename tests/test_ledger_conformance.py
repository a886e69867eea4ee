"""The ledger contract, run against every backend (see ``BACKENDS`` in ``conftest.py``).

Each test proves one behaviour of :class:`tb_plugins.ledger.base.Ledger`, named in its
docstring. Time is injected (``now``), never slept.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from conftest import make_ledger
from tb_plugins.core.usage import (
    UNITS,
    ZERO,
    Amounts,
    Limits,
    UsageRecord,
    UsageRow,
    add,
    amounts,
    usd_to_nano,
)
from tb_plugins.core.windows import parse_window
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger import Ledger, Line, LineState, ledger_from_url, line_key

UTC = ZoneInfo("UTC")
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
TTL = 600.0
DAY1, DAY2 = "2023-11-14", "2023-11-15"


def limits(**units: int | None) -> Limits:
    unknown = set(units) - set(UNITS)
    assert not unknown, unknown
    lim = tuple(units.get(unit) for unit in UNITS)
    return (lim[0], lim[1], lim[2], lim[3], lim[4], lim[5])


def line(scope: str, window: str = "day", *, now: float = T0, **units: int | None) -> Line:
    """The line of ``scope`` in ``window`` at ``now``, limited by ``units`` (e.g. tokens=100)."""
    w = parse_window(window)
    slot = w.slot(now, UTC)
    return Line(
        key=line_key(scope, w.spec),
        scope=scope,
        window=w.spec,
        bucket=slot.bucket,
        span=slot.span,
        width=slot.width,
        limits=limits(**units),
        expires_at=slot.expires_at,
    )


def cost(tokens: int = 0, *, output: int = 0, usd: float = 0.0, requests: int = 1) -> Amounts:
    """One call of ``tokens`` input (+ ``output``) tokens."""
    return amounts(tokens, output, usd_to_nano(usd), requests=requests, calls=requests)


def record(
    rid: str,
    scopes: tuple[str, ...],
    *,
    ts: float = T0,
    model: str = "gpt-4o",
    action: str = "allow",
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached: int = 0,
    usd: float = 0.0,
    **more: Any,
) -> UsageRecord:
    return UsageRecord(
        ts=ts,
        reservation_id=rid,
        scopes=scopes,
        model=model,
        requested_model=more.pop("requested_model", model),
        action=action,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        usd=usd,
        **more,
    )


def charge(
    ledger: Ledger,
    rid: str,
    lines: list[Line],
    amt: Amounts,
    *,
    ts: float = T0,
    model: str = "gpt-4o",
    cached: int = 0,
    usd: float = 0.0,
) -> None:
    """Reserve and settle ``amt`` on ``lines`` at ``ts`` (a whole successful call)."""
    assert ledger.reserve(rid, lines, amt, now=ts, expires_at=ts + TTL).ok
    rec = record(
        rid,
        tuple(ln.scope for ln in lines),
        ts=ts,
        model=model,
        input_tokens=amt[1],
        output_tokens=amt[2],
        cached=cached,
        usd=usd,
    )
    assert ledger.settle(rid, lines, amt, rec, now=ts).applied


def state(spent: Amounts = ZERO, held: Amounts = ZERO) -> LineState:
    return LineState(spent=spent, held=held)


def limited(states: Sequence[LineState | None], lines: Sequence[Line]) -> tuple[Any, ...]:
    """States as a check sees them: a reserve or settle may report 0 for a unit its line
    does not limit (``status`` reports every unit), so only the limited units compare."""

    def keep(amounts: Amounts, ln: Line) -> tuple[int, ...]:
        return tuple(a if lim is not None else 0 for a, lim in zip(amounts, ln.limits, strict=True))

    return tuple(
        None if st is None else (keep(st.spent, ln), keep(st.held, ln))
        for st, ln in zip(states, lines, strict=True)
    )


def settled(states: Sequence[LineState | None], lines: Sequence[Line]) -> tuple[Any, ...]:
    """Settle states as alerts see them: the limited units' spend (a backend may read the
    holds as 0 after a settle; alerts look at settled spend only)."""
    return tuple(None if v is None else v[0] for v in limited(states, lines))


# -- reserve -------------------------------------------------------------------------------


def test_reserve_is_all_or_nothing_when_one_line_fails(ledger: Ledger) -> None:
    """A reservation that fits one line but not another holds nothing on either."""
    roomy = line("team:a", tokens=1_000)
    tight = line("user:a", usd=usd_to_nano(0.01))
    result = ledger.reserve("r1", [roomy, tight], cost(10, usd=0.02), now=T0, expires_at=T0 + TTL)
    assert not result.ok
    assert ledger.status([roomy, tight], now=T0) == (state(), state())
    assert ledger.release("r1", now=T0) is False


def test_holds_count_against_limits(ledger: Ledger) -> None:
    """A live hold takes room from later reservations until it is settled or released."""
    ln = line("user:a", tokens=100)
    assert ledger.reserve("r1", [ln], cost(60), now=T0, expires_at=T0 + TTL).ok
    assert not ledger.reserve("r2", [ln], cost(60), now=T0, expires_at=T0 + TTL).ok
    assert ledger.reserve("r3", [ln], cost(40), now=T0, expires_at=T0 + TTL).ok
    assert ledger.status([ln], now=T0) == (state(held=add(cost(60), cost(40))),)


def test_reserve_returns_the_states_before_the_reservation(ledger: Ledger) -> None:
    """ReserveResult.states show spend and holds as they were before this call."""
    ln = line("user:a", tokens=100)
    first = ledger.reserve("r1", [ln], cost(30), now=T0, expires_at=T0 + TTL)
    assert first.ok and limited(first.states, [ln]) == limited((state(),), [ln])
    second = ledger.reserve("r2", [ln], cost(50), now=T0, expires_at=T0 + TTL)
    assert second.ok and limited(second.states, [ln]) == limited((state(held=cost(30)),), [ln])
    ledger.settle("r1", [ln], cost(20), record("r1", ("user:a",)), now=T0)
    refused = ledger.reserve("r3", [ln], cost(31), now=T0, expires_at=T0 + TTL)
    want = (state(spent=cost(20), held=cost(50)),)
    assert not refused.ok and limited(refused.states, [ln]) == limited(want, [ln])


def test_a_unit_without_a_limit_never_blocks(ledger: Ledger) -> None:
    """A unit whose limit is None admits any amount, while the line's other limits still bind."""
    free = line("global")
    ln = line("run:1", "total", requests=2)
    huge = cost(10**12, output=10**12, usd=10**6)
    for rid in ("r1", "r2"):
        assert ledger.reserve(rid, [free, ln], huge, now=T0, expires_at=T0 + TTL).ok
    assert not ledger.reserve("r3", [free, ln], huge, now=T0, expires_at=T0 + TTL).ok
    assert ledger.reserve("r4", [free], huge, now=T0, expires_at=T0 + TTL).ok


def test_a_zero_limit_blocks_any_positive_amount(ledger: Ledger) -> None:
    """A limit of 0 refuses every call that needs any of that unit."""
    assert not ledger.reserve("r1", [line("u", tokens=0)], cost(1), now=T0, expires_at=T0 + 1).ok
    assert not ledger.reserve("r2", [line("u", requests=0)], cost(0), now=T0, expires_at=T0 + 1).ok


def test_an_overspent_line_blocks_even_a_zero_amount(ledger: Ledger) -> None:
    """A line exactly at its limit still admits a zero amount; a line past it admits nothing."""
    ln = line("user:a", tokens=100)
    charge(ledger, "r1", [ln], cost(100))
    assert ledger.reserve("z1", [ln], ZERO, now=T0, expires_at=T0 + TTL).ok
    ledger.settle("r2", [ln], cost(1), record("r2", ("user:a",)), now=T0)  # settled unreserved
    assert not ledger.reserve("z2", [ln], ZERO, now=T0, expires_at=T0 + TTL).ok


def test_reserving_an_id_again_replaces_its_hold(ledger: Ledger) -> None:
    """A retried reserve with the same id replaces its hold instead of holding twice."""
    ln = line("user:a", tokens=100)
    assert ledger.reserve("r1", [ln], cost(60), now=T0, expires_at=T0 + TTL).ok
    assert not ledger.reserve("r1", [ln], cost(101), now=T0, expires_at=T0 + TTL).ok
    assert ledger.status([ln], now=T0) == (state(held=cost(60)),)
    again = ledger.reserve("r1", [ln], cost(90), now=T0, expires_at=T0 + TTL)
    assert again.ok and again.states == (state(),)
    assert ledger.status([ln], now=T0) == (state(held=cost(90)),)
    assert ledger.release("r1", now=T0) is True
    assert ledger.status([ln], now=T0) == (state(),)


# -- settle and release --------------------------------------------------------------------


def test_settle_records_more_than_the_estimate(ledger: Ledger) -> None:
    """Settling replaces the hold by the actual amounts, even when they exceed hold and limit."""
    ln = line("user:a", tokens=100)
    assert ledger.reserve("r1", [ln], cost(10), now=T0, expires_at=T0 + TTL).ok
    result = ledger.settle("r1", [ln], cost(150), record("r1", ("user:a",)), now=T0)
    assert result.applied
    assert settled(result.states, [ln]) == settled((state(spent=cost(150)),), [ln])
    assert ledger.status([ln], now=T0) == (state(spent=cost(150)),)


def test_settle_reads_back_the_watched_lines(ledger: Ledger) -> None:
    """``watch`` names the lines read back: they are exact; the others are None or exact."""
    lines = [line("global", tokens=10**6), line("team:a", tokens=500), line("user:a", "hour")]
    charge(ledger, "r0", lines, cost(100))
    assert ledger.reserve("r1", lines, cost(10), now=T0, expires_at=T0 + TTL).ok
    result = ledger.settle(
        "r1", lines, cost(40), record("r1", ("global", "team:a", "user:a")), now=T0, watch=[1]
    )
    truth = ledger.status(lines, now=T0)
    assert truth == (state(spent=add(cost(100), cost(40))),) * 3
    assert result.states[1] is not None
    assert settled(result.states[1:2], lines[1:2]) == settled(truth[1:2], lines[1:2])
    for got, want, ln in zip(result.states, truth, lines, strict=True):
        assert got is None or settled([got], [ln]) == settled([want], [ln])
    empty = ledger.settle("r2", lines, cost(1), record("r2", ("global",)), now=T0, watch=[])
    assert empty.applied and all(s is None or isinstance(s, LineState) for s in empty.states)
    assert len(empty.states) == 3


def test_settle_is_idempotent(ledger: Ledger) -> None:
    """A second settle of the same id changes nothing and says so."""
    ln = line("user:a", tokens=100)
    charge(ledger, "r1", [ln], cost(40))
    again = ledger.settle("r1", [ln], cost(99), record("r1", ("user:a",)), now=T0 + 1)
    assert again.applied is False
    assert settled(again.states, [ln]) == settled((state(spent=cost(40)),), [ln])
    assert len(ledger.records()) == 1


def test_release_twice_returns_true_then_false(ledger: Ledger) -> None:
    """Release drops the hold once; a second release (or an unknown id) finds nothing."""
    ln = line("user:a", tokens=100)
    ledger.reserve("r1", [ln], cost(60), now=T0, expires_at=T0 + TTL)
    assert ledger.release("r1", now=T0) is True
    assert ledger.release("r1", now=T0) is False
    assert ledger.release("never-reserved", now=T0) is False
    assert ledger.status([ln], now=T0) == (state(),)


def test_release_after_settle_changes_nothing(ledger: Ledger) -> None:
    """Releasing a settled reservation returns False and keeps its spend."""
    ln = line("user:a", tokens=100)
    charge(ledger, "r1", [ln], cost(40))
    assert ledger.release("r1", now=T0) is False
    assert ledger.status([ln], now=T0) == (state(spent=cost(40)),)


def test_expired_hold_stops_counting_at_expires_at_and_a_late_settle_still_records(
    ledger: Ledger,
) -> None:
    """A hold counts until just before expires_at, not at it; settling it later records spend."""
    ln = line("user:a", tokens=100)
    end = T0 + TTL
    assert ledger.reserve("r1", [ln], cost(100), now=T0, expires_at=end).ok
    just_before = end - 0.001
    assert ledger.status([ln], now=just_before) == (state(held=cost(100)),)
    assert not ledger.reserve("r2", [ln], cost(1), now=just_before, expires_at=end + TTL).ok
    assert ledger.status([ln], now=end) == (state(),)
    assert ledger.reserve("r3", [ln], cost(100), now=end, expires_at=end + TTL).ok
    late = ledger.settle("r1", [ln], cost(70), record("r1", ("user:a",)), now=end + 1)
    assert late.applied
    assert settled(late.states, [ln]) == settled((state(spent=cost(70)),), [ln])
    assert ledger.status([ln], now=end + 1) == (state(spent=cost(70), held=cost(100)),)


def test_releasing_an_expired_hold_returns_false(ledger: Ledger) -> None:
    """A hold past its expiry is no longer live, so releasing it reports nothing removed."""
    ln = line("user:a", tokens=100)
    ledger.reserve("r1", [ln], cost(10), now=T0, expires_at=T0 + TTL)
    assert ledger.release("r1", now=T0 + TTL) is False


# -- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["rolling:1m", "rolling:1h"])
def test_rolling_window_counts_only_buckets_inside_the_span(ledger: Ledger, window: str) -> None:
    """Spend in a rolling window counts while its bucket is in the span and not after."""
    first = line("user:a", window, tokens=100)
    charge(ledger, "r1", [first], cost(30))
    last_inside = T0 + (first.span - 1) * first.width
    inside = line("user:a", window, now=last_inside, tokens=100)
    outside = line("user:a", window, now=last_inside + first.width, tokens=100)
    assert inside.lowest_bucket <= first.bucket < outside.lowest_bucket
    assert ledger.status([inside, outside], now=last_inside) == (state(spent=cost(30)), state())
    assert not ledger.reserve("r2", [inside], cost(71), now=last_inside,
                              expires_at=last_inside + TTL).ok  # fmt: skip
    assert ledger.reserve("r3", [outside], cost(100), now=last_inside + first.width,
                          expires_at=last_inside + TTL).ok  # fmt: skip


def test_a_different_calendar_bucket_does_not_count(ledger: Ledger) -> None:
    """Spend in today's bucket is not read by tomorrow's line, and stays in today's."""
    today = line("user:a", "day", tokens=100)
    tomorrow = line("user:a", "day", now=T0 + 86_400, tokens=100)
    assert today.bucket != tomorrow.bucket
    charge(ledger, "r1", [today], cost(100))
    assert ledger.status([tomorrow], now=T0 + 86_400) == (state(),)
    assert ledger.reserve("r2", [tomorrow], cost(100), now=T0 + 86_400,
                          expires_at=T0 + 86_400 + TTL).ok  # fmt: skip
    assert ledger.status([today], now=T0) == (state(spent=cost(100)),)


@pytest.mark.parametrize("later", [61.0, 600.0])
@pytest.mark.parametrize("end", ["settle", "release", "expiry"])
def test_a_hold_on_a_rolling_line_counts_until_it_ends_whatever_its_bucket(
    ledger: Ledger, later: float, end: str
) -> None:
    """A live hold on a rolling line counts in full in reserve and status after its bucket
    left the window (a call longer than the window), until it is settled, released or
    expired; then only settled spend counts, in the window of the settle."""
    first = line("team:a", "rolling:1m", tokens=1_000)
    end_of_hold = T0 + later + 30
    assert ledger.reserve("r1", [first], cost(908), now=T0, expires_at=end_of_hold).ok
    now = T0 + later
    ln = line("team:a", "rolling:1m", now=now, tokens=1_000)
    assert ln.rolling and first.bucket < ln.lowest_bucket  # the hold's bucket left the window
    assert ledger.status([ln], now=now) == (state(held=cost(908)),)
    refused = ledger.reserve("r2", [ln], cost(908), now=now, expires_at=now + TTL)
    assert not refused.ok
    assert limited(refused.states, [ln]) == limited((state(held=cost(908)),), [ln])
    assert ledger.reserve("r3", [ln], cost(92), now=now, expires_at=now + TTL).ok
    assert ledger.status([ln], now=now) == (state(held=add(cost(908), cost(92))),)
    assert ledger.release("r3", now=now) is True
    if end == "settle":
        rec = record("r1", ("team:a",), ts=now, input_tokens=908)
        assert ledger.settle("r1", [ln], cost(908), rec, now=now).applied
        assert ledger.status([ln], now=now) == (state(spent=cost(908)),)
        assert not ledger.reserve("r4", [ln], cost(93), now=now, expires_at=now + TTL).ok
    elif end == "release":
        assert ledger.release("r1", now=now) is True
        assert ledger.status([ln], now=now) == (state(),)
        assert ledger.reserve("r4", [ln], cost(1_000), now=now, expires_at=now + TTL).ok
    else:
        now = end_of_hold
        ln = line("team:a", "rolling:1m", now=now, tokens=1_000)
        assert ledger.status([ln], now=now - 0.001) == (state(held=cost(908)),)
        assert ledger.status([ln], now=now) == (state(),)
        assert ledger.reserve("r4", [ln], cost(1_000), now=now, expires_at=now + TTL).ok


def test_a_hold_on_a_past_calendar_bucket_does_not_count_in_the_new_one(ledger: Ledger) -> None:
    """A live hold made in yesterday's bucket (or last hour's) does not count against today's
    window, in reserve or status; it still counts on its own bucket until it ends."""
    for window, step in (("day", 86_400.0), ("hour", 3_600.0), ("minute", 60.0)):
        old = line(f"user:{window}", window, tokens=100)
        assert ledger.reserve(f"{window}-1", [old], cost(100), now=T0,
                              expires_at=T0 + 2 * step).ok  # fmt: skip
        now = T0 + step
        new = line(f"user:{window}", window, now=now, tokens=100)
        assert not new.rolling and new.bucket > old.bucket
        assert ledger.status([new, old], now=now) == (state(), state(held=cost(100)))
        assert ledger.reserve(f"{window}-2", [new], cost(100), now=now,
                              expires_at=now + TTL).ok  # fmt: skip
        assert ledger.status([new], now=now) == (state(held=cost(100)),)


# -- bookkeeping -----------------------------------------------------------------------------


def test_claim_alert_is_true_exactly_once(ledger: Ledger) -> None:
    """The first claim of an alert key wins; every later claim loses; other keys are separate."""
    assert ledger.claim_alert("team:a|day|0.8", expires_at=T0 + 86_400) is True
    assert ledger.claim_alert("team:a|day|0.8", expires_at=T0 + 86_400) is False
    assert ledger.claim_alert("team:a|day|0.8", expires_at=None) is False
    assert ledger.claim_alert("team:a|day|1.0", expires_at=None) is True


def test_scopes_lists_every_scope_and_window_with_a_counter(ledger: Ledger) -> None:
    """scopes() returns each settled (scope, window) pair once."""
    lines = [line("user:a"), line("user:a", "rolling:1m"), line("team:b", "month")]
    charge(ledger, "r1", lines, cost(5))
    charge(ledger, "r2", lines[:1], cost(5))
    assert sorted(ledger.scopes()) == [
        ("team:b", "month"),
        ("user:a", "day"),
        ("user:a", "rolling:1m"),
    ]


def _usage_fixture(ledger: Ledger) -> None:
    """r1 on day 1 (team:a), r2 on day 2 (team:b), and a refused call on day 1 (team:a)."""
    a = [line("global"), line("team:a"), line("user:x")]
    b = [line("global"), line("team:b"), line("user:y")]
    charge(ledger, "r1", a, cost(100, output=10), cached=5, usd=0.01)
    charge(ledger, "r2", b, cost(200, output=20), ts=T0 + 5 * 3600, model="gpt-4o-mini",
           usd=0.002)  # fmt: skip
    ledger.append_usage(record("d1", ("global", "team:a", "user:x"), ts=T0 + 60,
                               action="deny", input_tokens=999))  # fmt: skip


def row(
    key: str, requests: int, denied: int, inp: int, out: int, cached: int, usd: float
) -> UsageRow:
    return UsageRow(key, requests, denied, inp, out, cached, cast(float, pytest.approx(usd)))


def test_usage_groups_by_scope_counting_a_record_under_each_of_its_scopes(
    ledger: Ledger,
) -> None:
    """usage(group_by="scope") sums each record once per scope it carries, sorted by scope."""
    _usage_fixture(ledger)
    assert ledger.usage(group_by="scope") == [
        row("global", 2, 1, 300, 30, 5, 0.012),
        row("team:a", 1, 1, 100, 10, 5, 0.01),
        row("team:b", 1, 0, 200, 20, 0, 0.002),
        row("user:x", 1, 1, 100, 10, 5, 0.01),
        row("user:y", 1, 0, 200, 20, 0, 0.002),
    ]


def test_usage_groups_by_model_and_by_utc_day(ledger: Ledger) -> None:
    """usage() groups by model name and by UTC date (YYYY-MM-DD)."""
    _usage_fixture(ledger)
    assert ledger.usage(group_by="model") == [
        row("gpt-4o", 1, 1, 100, 10, 5, 0.01),
        row("gpt-4o-mini", 1, 0, 200, 20, 0, 0.002),
    ]
    assert ledger.usage(group_by="day") == [
        row(DAY1, 1, 1, 100, 10, 5, 0.01),
        row(DAY2, 1, 0, 200, 20, 0, 0.002),
    ]


def test_usage_since_until_is_half_open(ledger: Ledger) -> None:
    """usage(since, until) counts records with since <= ts < until."""
    _usage_fixture(ledger)
    assert ledger.usage(group_by="model", until=T0 + 60) == [row("gpt-4o", 1, 0, 100, 10, 5, 0.01)]
    assert ledger.usage(group_by="model", since=T0 + 60, until=T0 + 61) == [
        row("gpt-4o", 0, 1, 0, 0, 0, 0.0)
    ]
    assert ledger.usage(group_by="day", since=T0 + 61) == [row(DAY2, 1, 0, 200, 20, 0, 0.002)]
    assert ledger.usage(since=T0 + 10 * 3600) == []


def test_usage_scope_filter_keeps_only_records_carrying_the_scope(ledger: Ledger) -> None:
    """usage(scope=...) totals only the records charged to that scope."""
    _usage_fixture(ledger)
    assert ledger.usage(group_by="scope", scope="team:b") == [
        row("global", 1, 0, 200, 20, 0, 0.002),
        row("team:b", 1, 0, 200, 20, 0, 0.002),
        row("user:y", 1, 0, 200, 20, 0, 0.002),
    ]
    assert ledger.usage(group_by="model", scope="user:x") == [row("gpt-4o", 1, 1, 100, 10, 5, 0.01)]
    assert ledger.usage(scope="user:nobody") == []


def test_deny_records_count_as_denied_and_never_as_settled(ledger: Ledger) -> None:
    """Refused calls count under ``denied`` with no spend, and do not mark their id settled."""
    ln = line("user:a")
    deny = record("r1", ("user:a",), action="deny", input_tokens=50)
    ledger.append_usage(deny)
    ledger.append_usage(deny)  # the same refusal logged twice is two refusals
    assert ledger.usage() == [row("user:a", 0, 2, 0, 0, 0, 0.0)]
    assert ledger.status([ln], now=T0) == (state(),)
    charge(ledger, "r1", [ln], cost(7))
    assert ledger.usage() == [row("user:a", 1, 2, 7, 0, 0, 0.0)]


def test_records_come_back_in_time_order_and_round_trip(ledger: Ledger) -> None:
    """records() returns every field as written, oldest first, honouring since/until/limit."""
    ln = [line("global"), line("user:a")]
    recs = [
        record("late", ("global", "user:a"), ts=T0 + 30, input_tokens=3, output_tokens=4,
               cached=1, usd=0.000123, estimated=True, priced=False,
               requested_model="gpt-4o", model="gpt-4o-mini",
               extra={"error": {"limit": 100.5, "path": ["a", None, True, 3]}}),
        record("early", ("global", "user:a"), ts=T0 + 10, input_tokens=1, output_tokens=2),
        record("deny", ("global", "user:a"), ts=T0 + 20, action="deny", extra={"why": "ünï"}),
    ]  # fmt: skip
    for rec in recs:
        if rec.action == "deny":
            ledger.append_usage(rec)
        else:
            amt = cost(rec.input_tokens, output=rec.output_tokens)
            ledger.reserve(rec.reservation_id, ln, amt, now=rec.ts, expires_at=rec.ts + TTL)
            assert ledger.settle(rec.reservation_id, ln, amt, rec, now=rec.ts).applied
    got = ledger.records()
    assert got == [recs[1], recs[2], recs[0]]
    assert isinstance(got[0].scopes, tuple)
    assert ledger.records(limit=2) == [recs[1], recs[2]]
    assert ledger.records(since=T0 + 20) == [recs[2], recs[0]]
    assert ledger.records(since=T0 + 11, until=T0 + 30) == [recs[2]]


NASTY = [
    "user:a",
    "user:a:b",
    "user:a%3Ab",  # what "user:a:b" escapes to
    "user:a|day",
    "team:{search}",
    'user:"double"',
    "user:'single'",
    "user:with space",
    "user:\\back\\slash",
    "user:ünïcødé-名前-🚀",
    "user:" + "x" * 10_000,
    "user:",
]


def test_scope_names_with_special_characters_round_trip_and_stay_apart(ledger: Ledger) -> None:
    """Scopes with : | { } quotes spaces unicode or 10 kB keep their own counters and names."""
    lines = [line(name, tokens=1_000) for name in NASTY]
    assert len({ln.key for ln in lines}) == len(NASTY)
    for i, ln in enumerate(lines):
        charge(ledger, f"r{i}", [ln], cost(i + 1))
    assert ledger.status(lines, now=T0) == tuple(
        state(spent=cost(i + 1)) for i in range(len(NASTY))
    )
    assert sorted(ledger.scopes()) == sorted((name, "day") for name in NASTY)
    assert [r.scopes for r in ledger.records()] == [(name,) for name in NASTY]
    by_scope = {r.key: r.input_tokens for r in ledger.usage()}
    assert by_scope == {name: i + 1 for i, name in enumerate(NASTY)}
    assert [r.key for r in ledger.usage(scope="user:a")] == ["user:a"]


# -- async twins -----------------------------------------------------------------------------


async def test_async_twins_give_the_same_results(
    ledger: Ledger, backend: str, tmp_path: Path
) -> None:
    """Every async twin returns what its sync method returns for the same sequence of calls."""
    twin = make_ledger(backend, tmp_path / "twin")
    try:
        ln = [line("global"), line("user:a", tokens=100)]
        rec = record("r1", ("global", "user:a"), input_tokens=70)
        deny = record("d1", ("global", "user:a"), action="deny")
        sync = [
            ledger.reserve("r1", ln, cost(80), now=T0, expires_at=T0 + TTL),
            ledger.reserve("r2", ln, cost(30), now=T0, expires_at=T0 + TTL),
            ledger.reserve("r3", ln, cost(10), now=T0, expires_at=T0 + TTL),
            ledger.status(ln, now=T0),
            ledger.settle("r1", ln, cost(70), rec, now=T0),
            ledger.settle("r1", ln, cost(70), rec, now=T0),
            ledger.release("r3", now=T0),
            ledger.release("r3", now=T0),
            ledger.claim_alert("k", expires_at=None),
            ledger.claim_alert("k", expires_at=None),
        ]
        ledger.append_usage(deny)
        asyn = [
            await twin.areserve("r1", ln, cost(80), now=T0, expires_at=T0 + TTL),
            await twin.areserve("r2", ln, cost(30), now=T0, expires_at=T0 + TTL),
            await twin.areserve("r3", ln, cost(10), now=T0, expires_at=T0 + TTL),
            await twin.astatus(ln, now=T0),
            await twin.asettle("r1", ln, cost(70), rec, now=T0),
            await twin.asettle("r1", ln, cost(70), rec, now=T0),
            await twin.arelease("r3", now=T0),
            await twin.arelease("r3", now=T0),
            await twin.aclaim_alert("k", expires_at=None),
            await twin.aclaim_alert("k", expires_at=None),
        ]
        await twin.aappend_usage(deny)
        assert asyn == sync
        assert twin.records() == ledger.records()
        assert twin.usage() == ledger.usage()
    finally:
        await twin.aclose()


# -- backend specifics: opening by URL -------------------------------------------------------


def test_each_memory_url_opens_its_own_empty_ledger() -> None:
    """Two memory:// ledgers share nothing."""
    first, second = ledger_from_url("memory://"), ledger_from_url("memory://")
    charge(first, "r1", [line("user:a")], cost(5))
    assert second.status([line("user:a")], now=T0) == (state(),)
    assert second.records() == []


def test_sqlite_urls_name_relative_and_absolute_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///rel.db is relative to the working directory; sqlite:////abs.db is absolute."""
    monkeypatch.chdir(tmp_path)
    with ledger_from_url("sqlite:///rel.db") as rel:
        charge(rel, "r1", [line("user:a")], cost(5))
    assert (tmp_path / "rel.db").exists()
    absolute = tmp_path / "sub" / "abs.db"
    absolute.parent.mkdir()
    with ledger_from_url(f"sqlite:///{absolute}") as led:
        assert led.url == f"sqlite:///{absolute}" and absolute.exists()
    with pytest.raises(ConfigError, match="names no file"):
        ledger_from_url("sqlite://")
    with pytest.raises(ConfigError, match="unknown option"):
        ledger_from_url(f"sqlite:///{absolute}?colour=blue")


def test_sqlite_errors_are_wrapped_and_name_the_file(tmp_path: Path) -> None:
    """A file that cannot be opened, or stays locked past the timeout, is LedgerUnavailable."""
    missing = tmp_path / "no-such-dir" / "ledger.db"
    with pytest.raises(LedgerUnavailable, match="no-such-dir") as info:
        ledger_from_url(f"sqlite:///{missing}")
    assert isinstance(info.value.__cause__, sqlite3.Error)
    path = tmp_path / "locked.db"
    with ledger_from_url(f"sqlite:///{path}?timeout=0.2") as led:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LedgerUnavailable, match=r"locked\.db"):
                led.reserve("r1", [line("user:a")], cost(1), now=T0, expires_at=T0 + TTL)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert led.reserve("r1", [line("user:a")], cost(1), now=T0, expires_at=T0 + TTL).ok


# The schema tb-plugins 0.1 wrote (version 1), as sqlite-utils created it.
_V1_SCHEMA = """
CREATE TABLE [counters] ([key] TEXT NOT NULL, [bucket] INTEGER NOT NULL, [scope] TEXT,
  [window] TEXT, [tokens] INTEGER NOT NULL, [input_tokens] INTEGER NOT NULL,
  [output_tokens] INTEGER NOT NULL, [usd] INTEGER NOT NULL, [requests] INTEGER NOT NULL,
  [calls] INTEGER NOT NULL, [expires_at] FLOAT, PRIMARY KEY ([key], [bucket]));
CREATE TABLE [holds] ([reservation_id] TEXT NOT NULL, [key] TEXT NOT NULL,
  [bucket] INTEGER NOT NULL, [tokens] INTEGER NOT NULL, [input_tokens] INTEGER NOT NULL,
  [output_tokens] INTEGER NOT NULL, [usd] INTEGER NOT NULL, [requests] INTEGER NOT NULL,
  [calls] INTEGER NOT NULL, [expires_at] FLOAT NOT NULL);
CREATE INDEX [idx_holds_key_bucket] ON [holds] ([key], [bucket]);
CREATE INDEX [idx_holds_reservation_id] ON [holds] ([reservation_id]);
CREATE INDEX [idx_holds_expires_at] ON [holds] ([expires_at]);
CREATE TABLE [usage] ([id] INTEGER PRIMARY KEY, [ts] FLOAT NOT NULL, [reservation_id] TEXT,
  [settled_id] TEXT, [scopes] TEXT, [model] TEXT, [requested_model] TEXT,
  [action] TEXT NOT NULL, [input_tokens] INTEGER, [output_tokens] INTEGER,
  [cached_input_tokens] INTEGER, [usd] FLOAT, [priced] INTEGER, [estimated] INTEGER,
  [extra] TEXT);
CREATE UNIQUE INDEX [idx_usage_settled_id] ON [usage] ([settled_id]);
CREATE INDEX [idx_usage_ts] ON [usage] ([ts]);
CREATE TABLE [usage_scopes] ([scope] TEXT, [usage_id] INTEGER, PRIMARY KEY ([scope], [usage_id]));
CREATE TABLE [alerts] ([key] TEXT PRIMARY KEY, [expires_at] FLOAT);
CREATE TABLE [meta] ([key] TEXT PRIMARY KEY, [value] TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_version_1_sqlite_file_is_migrated_with_its_spend_holds_and_log(tmp_path: Path) -> None:
    """A file written by tb-plugins 0.1 opens: counters, live holds and the usage log carry
    over, reports by scope still work, and the file says version 2 afterwards."""
    from tb_plugins.ledger.sqlite import SCHEMA_VERSION

    path = tmp_path / "v1.db"
    ln = line("team:a", tokens=1000)
    old = sqlite3.connect(path)
    old.executescript(_V1_SCHEMA)
    old.execute(
        "INSERT INTO counters VALUES (?, ?, ?, ?, 300, 200, 100, 0, 2, 2, ?)",
        (ln.key, ln.bucket, ln.scope, ln.window, ln.expires_at),
    )
    old.execute(
        "INSERT INTO holds VALUES ('live', ?, ?, 50, 50, 0, 0, 1, 1, ?)",
        (ln.key, ln.bucket, T0 + TTL),
    )
    old.execute(
        "INSERT INTO usage (ts, reservation_id, settled_id, scopes, model, requested_model,"
        " action, input_tokens, output_tokens, cached_input_tokens, usd, priced, estimated,"
        " extra) VALUES (?, 'r0', 'r0', '[\"global\", \"team:a\"]', 'gpt-4o', 'gpt-4o',"
        " 'allow', 200, 100, 0, 0.01, 1, 0, '{}')",
        (T0,),
    )
    old.commit()
    old.close()

    ledger = ledger_from_url(f"sqlite:///{path}")
    (st,) = ledger.status([ln], now=T0)
    assert st.spent[0] == 300 and st.held[0] == 50
    assert not ledger.reserve("big", [ln], cost(651), now=T0, expires_at=T0 + TTL).ok
    assert [r.key for r in ledger.usage(scope="team:a")] == ["global", "team:a"]
    assert ledger.settle("live", [ln], cost(60), record("live", ("team:a",)), now=T0).applied
    assert ledger.status([ln], now=T0)[0].held[0] == 0
    ledger.close()
    check = sqlite3.connect(path)
    tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "usage_scopes" not in tables
    assert check.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


def test_a_sqlite_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer tb-plugins is not touched: the error says to upgrade."""
    path = tmp_path / "new.db"
    ledger_from_url(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="schema version 99, newer"):
        ledger_from_url(f"sqlite:///{path}")


def test_a_line_passed_twice_is_charged_once(ledger: Ledger) -> None:
    """The same line twice in one call holds and spends once, and reads the same state."""
    ln = line("user:a", tokens=100)
    held = ledger.reserve("r1", [ln, ln], cost(30), now=T0, expires_at=T0 + TTL)
    assert held.ok and len(held.states) == 2
    assert ledger.status([ln], now=T0) == (state(held=cost(30)),)
    settled = ledger.settle("r1", [ln, ln], cost(40), record("r1", ("user:a",)), now=T0)
    assert settled.applied and len(settled.states) == 2
    assert ledger.status([ln], now=T0) == (state(spent=cost(40)),)
