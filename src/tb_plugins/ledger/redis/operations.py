"""The Redis ledger's operations, each one flow: its checks, the script's arguments, the
reading of the reply.

Reserve, settle, release, status and the usage log are calls of ``ledger.lua`` (one round trip
each, atomic); alert claims, the list of lines and the clock are plain commands. A flow yields
the commands; :class:`~tb_plugins.ledger.redis.ledger.RedisLedger` sends them, blocking or
awaited.
"""

from __future__ import annotations

import abc
import functools
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult
from tb_plugins.core.usage import UsageRecord, UsageRow
from tb_plugins.ledger.base import GroupBy
from tb_plugins.ledger.checks import distinct_lines, distinct_watch, spread, usage_rows
from tb_plugins.ledger.flow import Flow, Report, Reserve, Settle
from tb_plugins.ledger.network import NetworkLedger, split_line_key
from tb_plugins.ledger.redis import codec

__all__ = ["PIPELINE", "RedisOperations", "command", "group_usage"]

T = TypeVar("T")

HOLD_GRACE = 3600  # seconds a line's hold keys outlive the last hold on them
COUNTER_GRACE = 86_400  # seconds a bucket's counter outlives its window (like SQLite's prune)
ALERT_GRACE = 86_400  # seconds an alert claim outlives its expires_at
MAX_AMOUNT = 2**53
"""The largest amount the script adds exactly (its arithmetic is on doubles)."""

PIPELINE = "pipeline"
"""The step of several commands sent at once: its arguments are ``(method, args)`` pairs."""


def command(name: str, *args: Any, **kwargs: Any) -> Flow[Any]:
    """One Redis command as a step: the client's method ``name`` and its arguments."""
    return (yield (name, args, kwargs))


def _ttl(seconds: float, grace: float) -> int:
    """A positive whole number of seconds: ``seconds`` from now (at least 0) plus ``grace``."""
    return max(math.ceil(max(seconds, 0.0) + grace), 1)


@functools.lru_cache(maxsize=64)
def _day_name(start: int) -> str:
    return datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%d")


def _day(ts: float) -> tuple[str, int]:
    """The UTC day of ``ts`` as ``YYYY-MM-DD`` and the epoch seconds it starts at."""
    start = int(ts // 86_400) * 86_400
    return _day_name(start), start


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def group_usage(
    records: Sequence[UsageRecord], group_by: GroupBy, scope: str | None
) -> list[UsageRow]:
    """Totals of ``records`` grouped by scope (each distinct scope of a record), model or UTC
    day: ``requests`` counts settled records (``clamped`` and ``downgraded`` those of that
    action), ``denied`` refused ones, and the token and usd sums cover settled records only.
    Sorted by key."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0, 0, 0])
    for r in records:
        if scope is not None and scope not in r.scopes:
            continue
        if group_by == "scope":
            keys = list(dict.fromkeys(r.scopes))
        elif group_by == "model":
            keys = [r.model]
        else:
            keys = [_day(r.ts)[0]]
        for key in keys:
            row = sums[key]
            if r.action == "deny":
                row[1] += 1
                continue
            row[0] += 1
            row[2] += r.input_tokens
            row[3] += r.output_tokens
            row[4] += r.cached_input_tokens
            row[5] += r.usd
            if r.action == "clamp":
                row[6] += 1
            elif r.action == "downgrade":
                row[7] += 1
    return usage_rows((key, *v) for key, v in sums.items())


class RedisOperations(NetworkLedger):
    """The operations of :class:`~tb_plugins.ledger.redis.ledger.RedisLedger`, as flows."""

    kind = "Redis"
    max_amount = MAX_AMOUNT
    key_prefix: str
    settled_ttl: int
    usage_ttl: float | None

    @abc.abstractmethod
    def _script(self, key: str, args: Sequence[str | bytes]) -> Flow[Any]:
        """The steps of one call of the script (``KEYS[1]`` is ``key``)."""

    @abc.abstractmethod
    def _call(self, flow: Flow[T], *, cleanup: bool = True) -> Flow[T]:
        """``flow``'s commands with their errors wrapped, then (``cleanup``) the release of
        orphaned holds."""

    def _eval(self, key: str, args: Sequence[str | bytes]) -> Flow[Any]:
        return self._call(self._script(key, args))

    def _rkey(self, reservation_id: str) -> str:
        return f"{self.key_prefix}:r:{reservation_id}"

    # -- the atomic operations -----------------------------------------------------------------

    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        """One script: expired holds of the lines are dropped first, then every limit is
        checked and the amounts held on every line, or on none."""
        unique, index = distinct_lines(op.lines)  # a line given twice holds once
        numbers: list[float] = [op.now, op.expires_at, *op.amounts]
        hold_ttl = _ttl(op.expires_at - op.now, HOLD_GRACE)
        for ln in unique:
            a, b, c, d, e, f = ln.limits
            numbers += (ln.bucket, ln.span, ln.width, -1 if ln.expires_at is None else hold_ttl,
                        -1 if a is None else a, -1 if b is None else b, -1 if c is None else c,
                        -1 if d is None else d, -1 if e is None else e,
                        -1 if f is None else f)  # fmt: skip
        args: list[str | bytes] = ["reserve", self.key_prefix, op.reservation_id,
                                   codec.pack(numbers), *[ln.key for ln in unique]]  # fmt: skip
        call = self._eval(self._rkey(op.reservation_id), args)
        reply = yield from self._unseen(op.reservation_id, call)
        return ReserveResult(ok=bool(reply[0]), states=spread(codec.states(reply[1]), index))

    def _settle(self, op: Settle) -> Flow[SettleResult]:
        """One script, idempotent by id for ``settled_ttl``. The call carries a random token:
        if its reply is lost and redis-py sends it again, the script finds the id settled with
        this same token and still answers ``applied=True``; a second ``settle`` call of the id
        answers ``applied=False``."""
        unique, index = distinct_lines(op.lines)  # a line given twice is charged once
        mask = _watch_mask(len(unique), distinct_watch(op.watch, index))
        member, ts, day, start, log_ttl = self._log_args(op.record)
        now = op.now
        numbers: list[float] = [now, self.settled_ttl, *op.amounts, log_ttl, start]
        for i, ln in enumerate(unique):
            exp = ln.expires_at
            read = 1 if mask is None or mask[i] else 0
            if exp is None:
                numbers += (ln.bucket, ln.span, ln.width, -1, math.inf, read)
            else:
                numbers += (ln.bucket, ln.span, ln.width, _ttl(exp - now, COUNTER_GRACE),
                            exp + COUNTER_GRACE, read)  # fmt: skip
        args: list[str | bytes] = ["settle", self.key_prefix, op.reservation_id,
                                   codec.pack(numbers), member, ts, day, codec.token(),
                                   *[ln.key for ln in unique]]  # fmt: skip
        self._adopt(op.reservation_id)
        reply = yield from self._eval(self._rkey(op.reservation_id), args)
        states = spread(codec.watched(reply[1], mask), index)
        return SettleResult(applied=bool(reply[0]), states=states)

    def _release(self, reservation_id: str, now: float) -> Flow[bool]:
        args: list[str | bytes] = ["release", self.key_prefix, reservation_id, codec.num(now)]
        call = self._eval(self._rkey(reservation_id), args)
        return bool((yield from self._unseen(reservation_id, call)))

    def _status(self, lines: Sequence[Line], now: float) -> Flow[tuple[LineState, ...]]:
        """One script; expired holds are dropped first, so they do not count."""
        numbers: list[float] = [now]
        for ln in lines:
            numbers += [ln.bucket, ln.span, ln.width]
        args: list[str | bytes] = [
            "status",
            self.key_prefix,
            codec.pack(numbers),
            *(ln.key for ln in lines),
        ]
        return codec.states((yield from self._eval(f"{self.key_prefix}:lines", args)))

    def _forget(self, reservation_ids: Sequence[str]) -> Flow[object]:
        args = ["forget", self.key_prefix, codec.num(time.time()), *reservation_ids]
        script = self._script(self._rkey(reservation_ids[0]), args)
        return (yield from self._call(script, cleanup=False))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _scopes(self) -> Flow[list[tuple[str, str]]]:
        """Every (scope, window) pair with spend whose window is still read."""
        members = yield from self._call(command("zrange", f"{self.key_prefix}:lines", 0, -1))
        return sorted(split_line_key(m) for m in members)

    def _claim_alert(self, alert_key: str, expires_at: float | None) -> Flow[bool]:
        """``SET NX``; the claim is kept until a day after ``expires_at``."""
        key = f"{self.key_prefix}:a:{alert_key}"
        ttl = None if expires_at is None else _ttl(expires_at - time.time(), ALERT_GRACE)
        return bool((yield from self._call(command("set", key, b"1", nx=True, ex=ttl))))

    def _append_override(self, body: str) -> Flow[int]:
        """``RPUSH`` onto one list: its new length is the version, atomically."""
        key = f"{self.key_prefix}:overrides"
        return int((yield from self._call(command("rpush", key, body.encode()))))

    def _overrides(self, after: int) -> Flow[list[tuple[int, str]]]:
        key = f"{self.key_prefix}:overrides"
        items = yield from self._call(command("lrange", key, after, -1))
        return [(after + i + 1, _text(b)) for i, b in enumerate(items)]

    def _log_args(self, record: UsageRecord) -> tuple[str, str, str, int, float]:
        """The record's JSON, its ts (as text), its UTC day, the day's start, and how long to
        keep that day (-1: forever)."""
        day, start = _day(record.ts)
        ttl = -1 if self.usage_ttl is None else _ttl(start + 86_400 - record.ts, self.usage_ttl)
        return codec.encode_record(record), codec.num(record.ts), day, start, ttl

    def _append_usage(self, record: UsageRecord) -> Flow[None]:
        member, ts, day, start, ttl = self._log_args(record)
        args = ["log", self.key_prefix, member, ts, day, str(start), str(ttl)]
        yield from self._eval(f"{self.key_prefix}:seq", args)

    def _records(
        self, since: float | None, until: float | None, limit: int | None
    ) -> Flow[list[UsageRecord]]:
        """Two round trips: the days, then every day's records in one pipeline."""
        low = "-inf" if since is None else codec.num(since)
        high = "+inf" if until is None else "(" + codec.num(until)
        day_low = "-inf" if since is None else str(_day(since)[1])
        p = self.key_prefix

        def read() -> Flow[list[bytes]]:
            days = yield from command("zrangebyscore", f"{p}:logdays", day_low, high)
            if not days:
                return []
            reads = [("zrangebyscore", (f"{p}:log:{_text(day)}", low, high)) for day in days]
            return [m for chunk in (yield from command(PIPELINE, *reads)) for m in chunk]

        members = yield from self._call(read())
        if limit is not None:
            members = members[: max(limit, 0)]
        return [codec.decode_record(m) for m in members]

    def _usage(self, report: Report) -> Flow[list[UsageRow]]:
        """Read from Redis, grouped here."""
        records = yield from self._records(report.since, report.until, None)
        return group_usage(records, report.group_by, report.scope)

    def _server_time(self) -> Flow[float]:
        """Redis's clock (``TIME``)."""
        seconds, micros = yield from self._call(command("time"))
        return int(seconds) + int(micros) / 1e6

    def _ping(self) -> Flow[object]:
        """``PING``."""
        return (yield from self._call(command("ping")))


def _watch_mask(n: int, watch: Sequence[int] | None) -> list[bool] | None:
    """Per line, whether a settle reads its state back (None: every line)."""
    if watch is None:
        return None
    mask = [False] * n
    for i in watch:
        mask[i] = True
    return mask
