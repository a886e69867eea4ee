"""Budget windows: calendar (in a timezone), rolling, and total.

A window turns "now" into a :class:`Slot`: the bucket whose counter a call charges, which
buckets a check sums, and when the window resets.

* Calendar windows (``minute``, ``hour``, ``day``, ``week``, ``month``) follow the wall clock of
  the policy's timezone, and in every IANA zone they tile time: each instant belongs to exactly
  one window, and a window ends where the next begins. Weeks start on Monday (ISO 8601). The
  bucket is the window's start in epoch seconds, so every process that agrees on the clock
  agrees on the bucket.

  - ``day``, ``week`` and ``month`` start at local midnight of their first day, so a day is 23
    or 25 hours long across a DST change and a month ends on its last day. When a DST change
    skips midnight, the window starts at the change (the first instant of that local day).
  - ``minute`` and ``hour`` are local clock minutes and hours during which the UTC offset does
    not change; a change of offset always ends one window and starts the next. So the repeated
    hour of a fall-back is two windows, and a 30-minute shift (``Australia/Lord_Howe``) or a
    15-minute one (``Asia/Kathmandu`` in 1986) makes one hour window 30 or 45 minutes long
    rather than overlapping its neighbour.
* Rolling windows (``rolling:1m``, ``rolling:1h30m``) are sliding windows kept as sub-buckets of
  ``duration / 60`` (at least one second). A check sums every bucket that overlaps the last
  ``duration`` seconds, so a spend counts for at least ``duration`` and at most
  ``duration + width``: the window may hold spend slightly longer, never shorter. A rolling
  window lasts from 1 second to :data:`MAX_ROLLING` (366 days).
* ``total`` never resets.

Durations are finite and positive, and at most :data:`MAX_DURATION` (3650 days) unless the
caller sets a smaller maximum.

Example:
    >>> from zoneinfo import ZoneInfo
    >>> w = parse_window("day")
    >>> s = w.slot(1_700_000_000.0, ZoneInfo("UTC"))
    >>> s.bucket, s.resets_at
    (1699920000, 1700006400.0)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

__all__ = [
    "parse_time",
    "CALENDAR",
    "MAX_DURATION",
    "MAX_ROLLING",
    "Clock",
    "Slot",
    "Window",
    "parse_duration",
    "parse_window",
    "system_clock",
]

CALENDAR = ("minute", "hour", "day", "week", "month")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|sec|s|min|m|hr|h|d|w)")  # longest first
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "hr": 3600,
    "d": 86400,
    "w": 604800,
}
ROLLING_BUCKETS = 60
MAX_DURATION = 3650 * 86400.0
"""Longest duration :func:`parse_duration` accepts by default: 3650 days (about ten years)."""
MAX_ROLLING = 366 * 86400.0
"""Longest rolling window: 366 days (a leap year), i.e. ``rolling:366d``."""


class Clock(Protocol):
    """Anything that returns the current time in epoch seconds (inject one in tests)."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    """The wall clock, :func:`time.time`."""
    import time

    return time.time()


def parse_duration(text: str | int | float, *, maximum: float = MAX_DURATION) -> float:
    """Seconds from ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"1w"`` or a number of seconds.

    Args:
        text: the duration.
        maximum: the longest duration accepted, in seconds (:data:`MAX_DURATION`, 3650 days,
            unless the caller bounds it further).

    Raises:
        ValueError: the text is not a duration, or it is not finite, not positive, or longer
            than ``maximum``.

    Example:
        >>> parse_duration("1h30m")
        5400.0
    """
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if isinstance(text, int) and text > maximum:  # before float(): a huge int overflows it
            raise ValueError(
                f"a duration must be at most {_canonical_seconds(maximum)}, got {_short(text)}"
            )
        seconds = float(text)
    elif isinstance(text, str):
        s = text.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            pos, seconds = 0, 0.0
            while pos < len(s):  # anchored matches: searching ahead would be quadratic
                m = _DURATION_PART.match(s, pos)
                if m is None:
                    break
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                raise ValueError(
                    f"not a duration: {_short(text)} (use e.g. '30s', '10m', '1h30m', '1d', '1w')"
                )
    else:
        raise ValueError(f"not a duration: {_short(text)}")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {_short(text)}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {_short(text)}")
    if seconds > maximum:
        raise ValueError(
            f"a duration must be at most {_canonical_seconds(maximum)}, got {_short(text)}"
        )
    return seconds


def parse_time(text: str, now: float, *, ahead: bool = False) -> float:
    """A time given as a duration (before ``now``, or after it when ``ahead``), an ISO date
    or datetime (UTC if no zone; ``Z`` accepted), or finite epoch seconds >= 0.

    Example:
        >>> parse_time("2h", 10_000.0), parse_time("1970-01-01T01:00Z", 0.0)
        (2800.0, 3600.0)

    Raises:
        ValueError: none of those; the message gives examples.
    """
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"cannot read time {text!r}: epoch seconds are finite and >= 0")
        return value
    try:
        span = parse_duration(text)
    except ValueError:
        pass
    else:
        return now + span if ahead else now - span
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        example = "2h, 7d" if ahead else "24h, 7d"
        raise ValueError(
            f"cannot read time {text!r}: use e.g. {example}, 2026-11-01 or 2026-11-01T08:00"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-10:]} ({len(text):,} characters)"


@dataclass(frozen=True)
class Slot:
    """Where "now" falls in a window.

    Attributes:
        bucket: the bucket a charge goes to (epoch seconds of its start; 0 for ``total``).
        span: how many buckets a check sums, ending at ``bucket``.
        width: seconds between buckets (0 when ``span`` is 1).
        start: when the counted period starts (epoch seconds).
        resets_at: when the window resets (calendar), or when its oldest bucket drops off
            (rolling); None for ``total``.
        expires_at: after this instant the bucket's counter is no longer read.
    """

    bucket: int
    span: int
    width: int
    start: float
    resets_at: float | None
    expires_at: float | None

    @property
    def lowest_bucket(self) -> int:
        """The oldest bucket a check sums."""
        return self.bucket - (self.span - 1) * self.width


@dataclass(frozen=True)
class Window:
    """A parsed window spec; ``spec`` is canonical (``"day"``, ``"rolling:60s"``, ``"total"``)."""

    spec: str
    kind: str  # "calendar" | "rolling" | "total"
    seconds: float = 0.0  # rolling duration

    def slot(self, now: float, tz: ZoneInfo) -> Slot:
        """The slot ``now`` falls in, with calendar boundaries in ``tz``."""
        if self.kind == "total":
            return Slot(bucket=0, span=1, width=0, start=0.0, resets_at=None, expires_at=None)
        if self.kind == "rolling":
            width = max(1, int(self.seconds // ROLLING_BUCKETS))
            bucket = int(now // width) * width
            span = math.ceil(self.seconds / width) + 1
            return Slot(
                bucket=bucket,
                span=span,
                width=width,
                start=now - self.seconds,
                resets_at=float(bucket + width),
                expires_at=float(bucket + width * span),
            )
        start, end = _calendar_bounds(self.spec, now, tz)
        return Slot(bucket=int(start), span=1, width=0, start=start, resets_at=end, expires_at=end)


def _calendar_bounds(unit: str, now: float, tz: ZoneInfo) -> tuple[float, float]:
    if unit == "minute":
        return _clock_bounds(now, tz, 60)
    if unit == "hour":
        return _clock_bounds(now, tz, 3600)
    if unit not in ("day", "week", "month"):  # pragma: no cover - parse_window admits CALENDAR
        raise ValueError(unit)
    # The local date is a first guess: where the clock steps back over midnight, an instant
    # can show yesterday's date although today's window already started, so step to the
    # period whose [start, end) really holds ``now``.
    first = _period_start(unit, datetime.fromtimestamp(now, tz).date())
    start = _first_instant(first, tz)
    while now < start:
        first = _period_start(unit, first - timedelta(days=1))
        start = _first_instant(first, tz)
    nxt = _next_period(unit, first)
    end = _first_instant(nxt, tz)
    while now >= end:
        first, start = nxt, end
        nxt = _next_period(unit, first)
        end = _first_instant(nxt, tz)
    return start, end


def _period_start(unit: str, day: date) -> date:
    if unit == "week":
        return day - timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    return day


def _next_period(unit: str, first: date) -> date:
    if unit == "week":
        return first + timedelta(days=7)
    if unit == "month":
        if first.month == 12:
            return first.replace(year=first.year + 1, month=1)
        return first.replace(month=first.month + 1)
    return first + timedelta(days=1)


def _offset(t: float, tz: ZoneInfo) -> float:
    offset = datetime.fromtimestamp(t, tz).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


def _first_instant(day: date, tz: ZoneInfo) -> float:
    """The first instant at which the local clock in ``tz`` reads ``day`` 00:00 or later.

    Midnight of an ambiguous night is its first occurrence (``fold=0``). A midnight that a DST
    change skips does not exist: the day then starts at the change itself.
    """
    wall = datetime(day.year, day.month, day.day)
    after = wall.replace(tzinfo=tz).timestamp()  # fold=0: a skipped time maps past the change
    if datetime.fromtimestamp(after, tz).replace(tzinfo=None) == wall:
        return after
    before = wall.replace(tzinfo=tz, fold=1).timestamp()  # the same time before the change
    return float(_change_between(math.floor(before), math.ceil(after), tz))


def _change_between(lo: int, hi: int, tz: ZoneInfo) -> int:
    """The first whole second in ``(lo, hi]`` whose UTC offset differs from the one at ``lo``.

    The offset at ``hi`` must differ from the one at ``lo``; tz database changes fall on whole
    seconds, and no zone changes its offset twice within the spans searched here (an hour, or
    the gap of one skipped midnight).
    """
    base = _offset(lo, tz)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(mid, tz) == base:
            lo = mid
        else:
            hi = mid
    return hi


def _clock_bounds(now: float, tz: ZoneInfo, length: int) -> tuple[float, float]:
    """A local clock minute or hour holding ``now``, cut where the UTC offset changes."""
    offset = _offset(now, tz)
    mark = math.floor((now + offset) / length) * length  # the local mark, as wall-clock seconds
    start = mark - offset
    end = start + length
    if _offset(start, tz) != offset:  # the offset changed after the mark: start at the change
        start = float(_change_between(math.floor(start), math.floor(now), tz))
    if _offset(end, tz) != offset:  # it changes before the next mark: end at the change
        end = float(_change_between(math.floor(now), math.ceil(end), tz))
    return start, end


def _canonical_seconds(seconds: float) -> str:
    for suffix, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{suffix}"
    return f"{seconds:g}s"


def parse_window(text: str) -> Window:
    """Parse ``minute|hour|day|week|month|total|rolling:<duration>``.

    A rolling duration is from 1 second to :data:`MAX_ROLLING` (366 days).

    Raises:
        ValueError: unknown window, or a bad rolling duration.

    Example:
        >>> parse_window("rolling:90m").spec
        'rolling:90m'
    """
    if not isinstance(text, str):
        raise ValueError(f"a window must be a string, got {_short(text)}")
    s = text.strip().lower()
    if s in CALENDAR:
        return Window(spec=s, kind="calendar")
    if s == "total":
        return Window(spec="total", kind="total")
    if s.startswith("rolling:"):
        seconds = parse_duration(s.split(":", 1)[1], maximum=MAX_ROLLING)
        if seconds < 1:
            raise ValueError(f"a rolling window must be at least 1s, got {_short(text)}")
        return Window(
            spec=f"rolling:{_canonical_seconds(seconds)}", kind="rolling", seconds=seconds
        )
    raise ValueError(
        f"unknown window {_short(text)} (expected minute, hour, day, week, month, total "
        f"or rolling:<duration> such as rolling:1m)"
    )
