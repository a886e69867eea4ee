"""Windows roll over at the right instant in their timezone, across month ends and DST."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from tb_plugins import BudgetGuard, Usage
from tb_plugins.core.windows import parse_duration, parse_window

NY = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")
KOLKATA = ZoneInfo("Asia/Kolkata")


def ts(tz: ZoneInfo, *args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=tz, fold=fold).timestamp()  # type: ignore[misc]


def test_a_day_with_the_dst_fall_back_lasts_25_hours() -> None:
    """In New York, 2026-11-01 runs from local midnight to local midnight: 25 hours."""
    slot = parse_window("day").slot(ts(NY, 2026, 11, 1, 12), NY)
    assert slot.bucket == ts(NY, 2026, 11, 1)
    assert slot.resets_at == ts(NY, 2026, 11, 2)
    assert slot.resets_at - slot.bucket == 25 * 3600


def test_a_day_with_the_dst_spring_forward_lasts_23_hours() -> None:
    """In Paris, 2026-03-29 loses an hour: its day window is 23 hours."""
    slot = parse_window("day").slot(ts(PARIS, 2026, 3, 29, 12), PARIS)
    assert slot.resets_at - slot.bucket == 23 * 3600


def test_the_day_rolls_over_exactly_at_local_midnight() -> None:
    """One millisecond before local midnight is the old day; midnight itself is the new one."""
    day = parse_window("day")
    midnight = ts(PARIS, 2026, 10, 26)
    before = day.slot(midnight - 0.001, PARIS)
    after = day.slot(midnight, PARIS)
    assert before.resets_at == midnight
    assert after.bucket == midnight and after.bucket != before.bucket


def test_the_month_ends_on_its_last_local_day() -> None:
    """January ends at Feb 1 00:00 local; February 2026 has 28 days."""
    month = parse_window("month")
    jan = month.slot(ts(PARIS, 2026, 1, 31, 23, 59, 59), PARIS)
    feb = month.slot(ts(PARIS, 2026, 2, 1), PARIS)
    assert jan.resets_at == feb.bucket == ts(PARIS, 2026, 2, 1)
    assert feb.resets_at == ts(PARIS, 2026, 3, 1)
    assert (feb.resets_at - feb.bucket) == 28 * 86400


def test_a_month_across_a_dst_change_is_an_hour_short() -> None:
    """March 2026 in Paris spans the spring-forward: 31 days less one hour."""
    slot = parse_window("month").slot(ts(PARIS, 2026, 3, 15), PARIS)
    assert slot.resets_at - slot.bucket == 31 * 86400 - 3600


def test_december_rolls_into_the_next_year() -> None:
    """The December window resets on January 1 of the next year, local time."""
    slot = parse_window("month").slot(ts(NY, 2026, 12, 31, 23), NY)
    assert slot.resets_at == ts(NY, 2027, 1, 1)


def test_hours_follow_a_half_hour_offset() -> None:
    """In Kolkata (UTC+5:30) an hour window starts on the local hour, i.e. at :30 UTC."""
    slot = parse_window("hour").slot(ts(KOLKATA, 2026, 6, 1, 10, 45), KOLKATA)
    assert slot.bucket == ts(KOLKATA, 2026, 6, 1, 10)
    assert datetime.fromtimestamp(slot.bucket, timezone.utc).minute == 30


def test_the_repeated_hour_of_a_fall_back_is_two_windows() -> None:
    """01:30 EDT and 01:30 EST on 2026-11-01 fall in two different one-hour windows."""
    hour = parse_window("hour")
    first = hour.slot(ts(NY, 2026, 11, 1, 1, 30, fold=0), NY)
    second = hour.slot(ts(NY, 2026, 11, 1, 1, 30, fold=1), NY)
    assert second.bucket - first.bucket == 3600
    assert first.resets_at - first.bucket == 3600


def test_weeks_start_on_monday() -> None:
    """A week window starts on Monday 00:00 local (ISO weeks)."""
    slot = parse_window("week").slot(ts(PARIS, 2026, 11, 22, 18), PARIS)  # a Sunday
    assert datetime.fromtimestamp(slot.bucket, PARIS) == datetime(2026, 11, 16, tzinfo=PARIS)
    assert slot.resets_at == ts(PARIS, 2026, 11, 23)


def test_rolling_windows_cover_at_least_their_duration() -> None:
    """rolling:1m keeps one-second buckets and sums enough of them to cover 60 s."""
    w = parse_window("rolling:1m")
    slot = w.slot(1000.5, ZoneInfo("UTC"))
    assert (slot.width, slot.bucket) == (1, 1000)
    assert slot.bucket - slot.lowest_bucket >= 60
    big = parse_window("rolling:1d").slot(100_000.0, ZoneInfo("UTC"))
    assert big.width == 1440 and (big.span - 1) * big.width >= 86400


def test_total_never_resets() -> None:
    """`total` has one bucket and no reset."""
    slot = parse_window("total").slot(1e9, ZoneInfo("UTC"))
    assert (slot.bucket, slot.resets_at) == (0, None)


@pytest.mark.parametrize("text", ["fortnight", "rolling:", "rolling:0s", "rolling:5x", ""])
def test_bad_windows_are_refused(text: str) -> None:
    """Unknown windows and bad rolling durations raise ValueError."""
    with pytest.raises(ValueError):
        parse_window(text)


def test_durations_read_compound_forms() -> None:
    """`1h30m` is 5400 s; a bare number is seconds."""
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    assert parse_duration("2d") == 172800


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_guard_budget_resets_at_local_midnight() -> None:
    """A day budget in Paris is spent at 23:59 and full again at 00:00 local time."""
    clock = Clock(ts(PARIS, 2026, 10, 25, 23, 59))  # the DST fall-back day
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "timezone": "Europe/Paris",
            "alerts": [],
            "budgets": [{"scope": "team:a", "tokens": 1000, "window": "day"}],
        },
        clock=clock,
    )
    msgs = [{"role": "user", "content": "hi"}]
    d = guard.check(model="gpt-4o", messages=msgs, max_tokens=10, scopes=["team:a"])
    guard.settle(d, Usage(input_tokens=900, output_tokens=100))
    assert guard.status("team:a")[0].remaining == 0
    clock.t = ts(PARIS, 2026, 10, 26) - 0.001
    assert guard.status("team:a")[0].remaining == 0
    clock.t = ts(PARIS, 2026, 10, 26)
    status = guard.status("team:a")[0]
    assert (status.spent, status.remaining) == (0, 1000)
    assert status.window_start == ts(PARIS, 2026, 10, 26)
