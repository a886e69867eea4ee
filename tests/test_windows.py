"""Windows roll over at the right instant in their timezone, across month ends and DST."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from tb_plugins import BudgetGuard, Usage
from tb_plugins.core.windows import MAX_DURATION, MAX_ROLLING, parse_duration, parse_window

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


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10min", 600), ("2hr", 7200), ("30sec", 30), ("500ms", 0.5), ("1m30s", 90), ("1w", 604800)],
)
def test_durations_read_every_unit_name(text: str, seconds: float) -> None:
    """The long unit names (`min`, `hr`, `sec`) read as well as the short ones."""
    assert parse_duration(text) == seconds


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


LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
KATHMANDU = ZoneInfo("Asia/Kathmandu")

# (zone, a UTC instant near a change of UTC offset): the window walk below starts before it.
TRANSITIONS = [
    ("Australia/Lord_Howe", "2026-04-04T15:00", "fall back 30 min"),
    ("Australia/Lord_Howe", "2026-10-03T15:30", "spring forward 30 min"),
    ("Europe/Paris", "2026-03-29T01:00", "spring forward 1 h"),
    ("Europe/Paris", "2026-10-25T01:00", "fall back 1 h"),
    ("Asia/Kathmandu", "1985-12-31T18:30", "+5:30 to +5:45 at midnight"),
    ("Asia/Kathmandu", "2026-06-01T00:00", "+5:45, no change"),
    ("America/Santiago", "2026-04-05T03:00", "fall back at midnight"),
    ("America/Santiago", "2026-09-06T04:00", "midnight skipped"),
    ("Pacific/Apia", "2011-12-30T10:00", "a whole day skipped"),
    ("America/Goose_Bay", "2006-10-29T03:01", "fall back at 00:01: midnight twice"),
    ("America/Goose_Bay", "2006-04-02T04:01", "spring forward at 00:01"),
]
SPANS = {  # unit: (hours walked either side, sampling step in seconds)
    "minute": (3, 7),
    "hour": (48, 60),
    "day": (96, 600),
    "week": (24 * 15, 1800),
    "month": (24 * 70, 3600),
}


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("unit", list(SPANS))
@pytest.mark.parametrize(
    ("zone", "at", "what"), TRANSITIONS, ids=[f"{z} {w}" for z, _, w in TRANSITIONS]
)
def test_calendar_windows_tile_time_across_offset_changes(
    zone: str, at: str, what: str, unit: str
) -> None:
    """Consecutive windows never overlap and never leave a gap, whatever the zone does: every
    instant sampled lies in its own slot, and each window starts where the previous ended."""
    tz, window = ZoneInfo(zone), parse_window(unit)
    hours, step = SPANS[unit]
    t, end = utc(at) - hours * 3600, utc(at) + hours * 3600
    previous = window.slot(t, tz)
    while t < end:
        slot = window.slot(t, tz)
        assert slot.resets_at is not None
        assert slot.start <= t < slot.resets_at
        assert slot.bucket == int(slot.start)
        if slot.bucket != previous.bucket:
            assert slot.start == previous.resets_at, (previous, slot)
        assert window.slot(slot.resets_at, tz).start == slot.resets_at
        assert window.slot(slot.resets_at - 0.001, tz).bucket == slot.bucket
        previous = slot
        t += step


def test_lord_howe_fall_back_splits_the_hour_at_the_change() -> None:
    """02:00 +11 becomes 01:30 +10:30: hour 1 lasts 60 min, its repeated half 30 min, and
    the window of 02:00 starts when the second 01:30-02:00 ends: no two windows overlap."""
    hour = parse_window("hour")
    change = utc("2026-04-04T15:00")
    first = hour.slot(change - 1, LORD_HOWE)
    repeat = hour.slot(change, LORD_HOWE)
    after = hour.slot(change + 1800, LORD_HOWE)
    assert (first.start, first.resets_at) == (change - 3600, change)
    assert (repeat.start, repeat.resets_at) == (change, change + 1800)
    assert after.start == change + 1800 and after.resets_at == change + 5400
    assert datetime.fromtimestamp(after.start, LORD_HOWE).strftime("%H:%M") == "02:00"


def test_lord_howe_spring_forward_gives_a_half_hour_window() -> None:
    """02:00 +10:30 becomes 02:30 +11: the 02:xx window lasts 30 min and ends at 03:00."""
    hour = parse_window("hour")
    change = utc("2026-10-03T15:30")
    before = hour.slot(change - 1, LORD_HOWE)
    short = hour.slot(change, LORD_HOWE)
    assert before.resets_at == short.start == change
    assert short.resets_at is not None and short.resets_at - short.start == 1800
    assert datetime.fromtimestamp(short.resets_at, LORD_HOWE).strftime("%H:%M") == "03:00"


def test_hours_follow_a_45_minute_offset() -> None:
    """In Kathmandu (UTC+5:45) an hour starts at :15 UTC; the 1986 change from +5:30 gives
    one 45-minute hour, and the day starts at the change since local midnight was skipped."""
    slot = parse_window("hour").slot(ts(KATHMANDU, 2026, 6, 1, 10, 45), KATHMANDU)
    assert datetime.fromtimestamp(slot.bucket, timezone.utc).minute == 15
    change = utc("1985-12-31T18:30")
    short = parse_window("hour").slot(change + 60, KATHMANDU)
    assert short.resets_at is not None
    assert (short.start, short.resets_at - short.start) == (change, 45 * 60)
    day = parse_window("day").slot(change + 60, KATHMANDU)
    assert day.start == change and day.resets_at == ts(KATHMANDU, 1986, 1, 2)


def test_a_day_that_starts_at_a_skipped_midnight_starts_at_the_change() -> None:
    """Santiago skips 00:00-01:00 on 2026-09-06: that day starts at 01:00 local, 23 h long."""
    santiago = ZoneInfo("America/Santiago")
    slot = parse_window("day").slot(ts(santiago, 2026, 9, 6, 12), santiago)
    assert slot.start == utc("2026-09-06T04:00")
    assert slot.resets_at is not None and slot.resets_at - slot.start == 23 * 3600


@pytest.mark.parametrize(
    "text",
    [math.nan, math.inf, -math.inf, 10**400, "99999999999999999999d", "0", "-5s", -1, 0.0],
    ids=["nan", "inf", "-inf", "10**400", "1e20 days", "zero text", "negative text", "-1", "0.0"],
)
def test_durations_are_finite_positive_and_bounded(text: object) -> None:
    """NaN, infinity, zero, negatives and absurdly long durations raise ValueError."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)  # type: ignore[arg-type]


def test_a_duration_may_be_bounded_by_the_caller() -> None:
    """`maximum=` caps a duration; the default cap is MAX_DURATION (3650 days)."""
    assert parse_duration("3650d") == MAX_DURATION
    with pytest.raises(ValueError, match="at most 3650d"):
        parse_duration("3651d")
    assert parse_duration("60s", maximum=60) == 60
    with pytest.raises(ValueError, match="at most 1m"):
        parse_duration("61s", maximum=60)


@pytest.mark.parametrize("text", ["rolling:367d", "rolling:53w", "rolling:99999999999999999999d"])
def test_rolling_windows_are_at_most_366_days(text: str) -> None:
    """A rolling window longer than MAX_ROLLING (366 days) is refused; 366 days is fine."""
    assert parse_window("rolling:366d").seconds == MAX_ROLLING == 366 * 86400
    with pytest.raises(ValueError, match="at most 366d"):
        parse_window(text)
