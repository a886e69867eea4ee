"""Budget windows: calendar (in a timezone), rolling, and total.

A window turns "now" into a :class:`Slot`: the bucket whose counter a call charges, which
buckets a check sums, and when the window resets.

* Calendar windows (``minute``, ``hour``, ``day``, ``week``, ``month``) start at the local
  boundary in the policy's timezone, so a day is 23 or 25 hours long across a DST change and a
  month ends on its last day. Weeks start on Monday (ISO 8601). The bucket is the window's start
  in epoch seconds, so every process that agrees on the clock agrees on the bucket.
* Rolling windows (``rolling:1m``, ``rolling:1h30m``) are sliding windows kept as sub-buckets of
  ``duration / 60`` (at least one second). A check sums every bucket that overlaps the last
  ``duration`` seconds, so a spend counts for at least ``duration`` and at most
  ``duration + width``: the window may hold spend slightly longer, never shorter.
* ``total`` never resets.

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
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

__all__ = ["CALENDAR", "Clock", "Slot", "Window", "parse_duration", "parse_window", "system_clock"]

CALENDAR = ("minute", "hour", "day", "week", "month")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|hr|d|w)")
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


class Clock(Protocol):
    """Anything that returns the current time in epoch seconds (inject one in tests)."""

    def __call__(self) -> float: ...


def system_clock() -> float:
    """The wall clock, :func:`time.time`."""
    import time

    return time.time()


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"1w"`` or a number of seconds.

    Raises:
        ValueError: the text is not a positive duration.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION_PART.finditer(s):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos = m.end()
            if pos != len(s) or not s:
                raise ValueError(
                    f"not a duration: {text!r} (use e.g. '30s', '10m', '1h30m', '1d', '1w')"
                )
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


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
    local = datetime.fromtimestamp(now, tz)
    if unit in ("minute", "hour"):
        # Fixed-length windows: floor the local wall time (keeping ``fold`` so the repeated
        # hour of a DST fall-back is its own window), then add absolute seconds.
        if unit == "minute":
            floor = local.replace(second=0, microsecond=0)
            length = 60.0
        else:
            floor = local.replace(minute=0, second=0, microsecond=0)
            length = 3600.0
        start = floor.timestamp()
        return start, start + length
    day = local.date()
    if unit == "day":
        first, nxt = day, day + timedelta(days=1)
    elif unit == "week":
        first = day - timedelta(days=day.weekday())
        nxt = first + timedelta(days=7)
    elif unit == "month":
        first = day.replace(day=1)
        nxt = (
            first.replace(year=first.year + 1, month=1)
            if first.month == 12
            else first.replace(month=first.month + 1)
        )
    else:  # pragma: no cover - parse_window admits only CALENDAR
        raise ValueError(unit)
    start = datetime(first.year, first.month, first.day, tzinfo=tz).timestamp()
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp()
    return start, end


def _canonical_seconds(seconds: float) -> str:
    for suffix, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{suffix}"
    return f"{seconds:g}s"


def parse_window(text: str) -> Window:
    """Parse ``minute|hour|day|week|month|total|rolling:<duration>``.

    Raises:
        ValueError: unknown window, or a bad rolling duration.
    """
    if not isinstance(text, str):
        raise ValueError(f"a window must be a string, got {text!r}")
    s = text.strip().lower()
    if s in CALENDAR:
        return Window(spec=s, kind="calendar")
    if s == "total":
        return Window(spec="total", kind="total")
    if s.startswith("rolling:"):
        seconds = parse_duration(s.split(":", 1)[1])
        if seconds < 1:
            raise ValueError(f"a rolling window must be at least 1s, got {text!r}")
        return Window(
            spec=f"rolling:{_canonical_seconds(seconds)}", kind="rolling", seconds=seconds
        )
    raise ValueError(
        f"unknown window {text!r} (expected minute, hour, day, week, month, total "
        f"or rolling:<duration> such as rolling:1m)"
    )
