"""What the dashboard shows, as JSON-ready dicts: every budget now (:func:`status_payload`) and
the usage log over a period (:func:`usage_payload`): spend per scope in time buckets, the top
spenders, the latest decisions and the totals.

Everything is read through the guard and its ledger's usage log; nothing is written. Query
parameters arrive as text and are checked here (:func:`usage_query`, :func:`status_query`);
what cannot be used is a :class:`QueryError` whose message says what to send instead.

Example:
    >>> from tb_plugins import BudgetGuard, Usage
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "team:search", "limit": "1k tokens/day"}]})
    >>> d = guard.check("gpt-4o", input_tokens=400, max_tokens=50, scopes=["team:search"])
    >>> _ = guard.settle(d, Usage(400, 50))
    >>> status_payload(guard)["budgets"][0]["utilization"]
    0.45
    >>> usage = usage_payload(guard, usage_query({"bucket": "1m"}, guard.now()))
    >>> usage["totals"]["tokens"], [d["action"] for d in usage["decisions"]]
    (450, ['allow'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tb_plugins.core.scopes import normalize_scope
from tb_plugins.core.usage import UsageRecord, UsageRow
from tb_plugins.core.windows import parse_duration, parse_time

if TYPE_CHECKING:
    from tb_plugins.engine import BudgetGuard

__all__ = [
    "AUTO_SPAN",
    "DECISIONS",
    "MAX_BUCKETS",
    "MAX_DECISIONS",
    "QueryError",
    "SERIES",
    "TOP",
    "UsageQuery",
    "jsonable",
    "pick_bucket",
    "status_payload",
    "status_query",
    "usage_payload",
    "usage_query",
]

SERIES = 8
"""Scopes drawn on the spend chart: the ones that spent the most tokens in the period."""
TOP = 10
"""Rows of each top-spenders table."""
DECISIONS = 50
"""Usage records in the decisions timeline unless ``limit`` says otherwise."""
MAX_DECISIONS = 500
"""The largest ``limit``."""
MAX_BUCKETS = 500
"""The most time buckets one ``/api/usage`` answer has."""
AUTO_BUCKETS = 60
"""About how many buckets the period is cut into when ``bucket`` is not given."""
AUTO_SPAN = 86_400.0
"""Without ``since``, the period starts at the first record of the last day (at least a minute
back), so a ledger used for a few minutes fills the chart instead of one bar of a day."""
_MIN_SPAN = 60.0
_NICE_BUCKETS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
    3600, 7200, 10800, 21600, 43200, 86400, 2 * 86400, 7 * 86400,
)  # fmt: skip
_LATEST = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC, the last time datetime can show
_USAGE_PARAMS = ("since", "until", "bucket", "limit")
_STATUS_PARAMS = ("scope",)


class QueryError(ValueError):
    """A query parameter the API cannot use (HTTP 400); the message says what to send."""


@dataclass(frozen=True)
class UsageQuery:
    """The checked parameters of ``/api/usage``.

    Attributes:
        since: the period's start (epoch seconds), or None for the automatic start
            (:data:`AUTO_SPAN`).
        until: its end, excluded, or None for open-ended (up to now, and whatever the ledger
            dates later).
        bucket: seconds per bucket, or None to choose one (:func:`pick_bucket`).
        limit: how many of the latest usage records the decisions timeline holds.
    """

    since: float | None = None
    until: float | None = None
    bucket: float | None = None
    limit: int = DECISIONS


def status_query(params: Mapping[str, str]) -> str | None:
    """The ``scope`` of ``/api/status`` (None: every budget).

    Raises:
        QueryError: an unknown parameter, or a scope that is not ``kind:name``.
    """
    _known(params, _STATUS_PARAMS)
    text = params.get("scope", "")
    if not text:
        return None
    try:
        return normalize_scope(text)
    except ValueError as exc:
        raise QueryError(f"scope: {exc}") from None


def usage_query(params: Mapping[str, str], now: float) -> UsageQuery:
    """The checked parameters of ``/api/usage``; an empty value means the default.

    ``since`` and ``until`` are a time ago (``24h``, ``90m``, ``7d``), an ISO date or datetime
    (UTC unless it has a zone: ``2026-11-01``, ``2026-11-01T08:00``, ``...T08:00Z``) or epoch
    seconds; ``bucket`` a duration (``30s``, ``5m``, ``1h``, or seconds); ``limit`` a count
    from 1 to :data:`MAX_DECISIONS`.

    Raises:
        QueryError: an unknown parameter, or a value none of those forms reads.
    """
    _known(params, _USAGE_PARAMS)
    since = _time(params, "since", now)
    until = _time(params, "until", now)
    if since is not None and until is not None and since >= until:
        raise QueryError(f"since ({_iso(since)}) must be before until ({_iso(until)})")
    bucket = None
    if params.get("bucket"):
        try:
            bucket = parse_duration(params["bucket"])
        except ValueError as exc:
            raise QueryError(f"bucket: {exc}") from None
        if bucket < 1:
            raise QueryError(f"bucket must be at least 1s, got {_short(params['bucket'])}")
    limit = DECISIONS
    if params.get("limit"):
        text = params["limit"].strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_DECISIONS:
            raise QueryError(
                f"limit must be a whole number from 1 to {MAX_DECISIONS}, got {_short(text)}"
            )
        limit = int(text)
    return UsageQuery(since, until, bucket, limit)


def pick_bucket(span: float) -> float:
    """The bucket for a period of ``span`` seconds: the smallest round size (1s, 2s, 5s, ...,
    1h, ..., 1d, 2d, 1w) that cuts it into at most :data:`AUTO_BUCKETS`.

    Example:
        >>> pick_bucket(86_400), pick_bucket(90)
        (1800.0, 2.0)
    """
    for size in _NICE_BUCKETS:
        if span / size <= AUTO_BUCKETS:
            return float(size)
    return float(math.ceil(span / AUTO_BUCKETS))


def status_payload(guard: BudgetGuard, scope: str | None = None) -> dict[str, Any]:
    """Every limit of every budget now (``scope``: only that scope's), as
    :meth:`BudgetStatus.to_dict <tb_plugins.engine.decision.BudgetStatus.to_dict>` gives it,
    with the server's time (``now``). A suspended budget (limit 0) that was used has an
    infinite utilization, which JSON has no number for: it is ``null``."""
    budgets = [s.to_dict() for s in guard.status(scope)]
    now = guard.now()  # after: a spent limit's forecast (the status's time) is not after it
    payload: dict[str, Any] = jsonable({"now": now, "now_iso": _iso(now), "budgets": budgets})
    return payload


def usage_payload(guard: BudgetGuard, query: UsageQuery) -> dict[str, Any]:
    """The usage log over the period of ``query``.

    Keys: ``now``; ``since``, ``until`` (None: open-ended) and ``bucket`` (seconds);
    ``buckets``, the start of each bucket, on multiples of ``bucket`` since the epoch (the
    first and the last are cut to the period); ``series``, per scope drawn (the
    :data:`SERIES` that spent the most tokens) its ``tokens``, ``usd``, ``requests`` and
    ``denied`` per bucket; ``top``, the :data:`TOP` ``scopes`` (``global`` aside) and
    ``users`` by tokens spent; ``decisions``, the latest usage records, newest first (action
    ``allow``, ``clamp``, ``downgrade`` or ``deny``; a refusal's reason as ``note``); and
    ``totals`` of the period (every call once).

    Raises:
        QueryError: the period makes more than :data:`MAX_BUCKETS` buckets.
    """
    now = guard.now()
    until = query.until
    end = until if until is not None else now
    since = query.since if query.since is not None else _auto_since(guard, end, until)
    step = query.bucket or pick_bucket(max(end - since, 1.0))
    first = math.floor(since / step) * step
    # An open period keeps the bucket holding `now` (a record dated `now` falls in it).
    count = math.ceil((end - first) / step) if until is not None else int((end - first) // step) + 1
    if count > MAX_BUCKETS:
        raise QueryError(
            f"{_span(end - since)} in buckets of {_span(step)} makes {count:,} buckets, above "
            f"the maximum of {MAX_BUCKETS}; ask for a larger bucket or a shorter period"
        )
    starts = [first + i * step for i in range(max(count, 1))]
    spans = [
        (max(s, since), None if until is None and i == len(starts) - 1 else min(s + step, end))
        for i, s in enumerate(starts)
    ]
    by_scope = guard.usage(since=since, until=until, group_by="scope")
    ranked = sorted(by_scope, key=_spend_order)
    drawn = [r.key for r in ranked[:SERIES]]
    per_bucket = [{r.key: r for r in guard.usage(since=a, until=b)} for a, b in spans]
    series = [
        {
            "scope": scope,
            "tokens": [_row(rows, scope).tokens for rows in per_bucket],
            "usd": [_row(rows, scope).usd for rows in per_bucket],
            "requests": [_row(rows, scope).requests for rows in per_bucket],
            "denied": [_row(rows, scope).denied for rows in per_bucket],
        }
        for scope in drawn
    ]
    days = [_fields(r) for r in guard.usage(since=since, until=until, group_by="day")]
    counts = [f.name for f in fields(UsageRow) if f.name != "key"] + ["tokens"]
    totals = {k: sum(d[k] for d in days) for k in counts}
    totals["usd"] = float(totals["usd"])
    payload: dict[str, Any] = {
        "now": now,
        "now_iso": _iso(now),
        "since": since,
        "until": until,
        "bucket": step,
        "buckets": starts,
        "series": series,
        "top": {
            "scopes": [_fields(r) for r in ranked if r.key != "global"][:TOP],
            "users": [_fields(r) for r in ranked if r.key.startswith("user:")][:TOP],
        },
        "decisions": _decisions(guard, spans, per_bucket, since, until, query.limit),
        "totals": totals,
    }
    safe: dict[str, Any] = jsonable(payload)
    return safe


def jsonable(value: Any) -> Any:
    """``value`` with every float that is not finite (an infinite utilization) as None, so
    that ``json.dumps(..., allow_nan=False)`` writes JSON a browser parses."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# -- helpers ---------------------------------------------------------------------------------


def _known(params: Mapping[str, str], known: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(known))
    if unknown:
        names = ", ".join(_short(k) for k in unknown)
        raise QueryError(f"unknown parameter {names}; known: {', '.join(known)}")


def _time(params: Mapping[str, str], name: str, now: float) -> float | None:
    """A time parameter: a time ago, an ISO date or datetime (UTC without a zone), or epoch
    seconds; None when absent or empty."""
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        value: float | None = parse_time(text, now)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= _LATEST:  # NaN fails this too
        raise QueryError(
            f"{name}: cannot read the time {_short(text)}; use e.g. 24h (ago), 2026-11-01, "
            f"2026-11-01T08:00 (UTC unless it has a zone) or epoch seconds"
        )
    return value


def _auto_since(guard: BudgetGuard, end: float, until: float | None) -> float:
    """The first record's time in the day before ``end``, at least a minute before it."""
    first = guard.ledger.records(since=end - AUTO_SPAN, until=until, limit=1)
    start = first[0].ts if first else end - AUTO_SPAN
    return min(max(start, end - AUTO_SPAN), end - _MIN_SPAN)


def _spend_order(row: UsageRow) -> tuple[int, float, int]:
    return (-row.tokens, -row.usd, -(row.requests + row.denied))


def _row(rows: Mapping[str, UsageRow], scope: str) -> UsageRow:
    return rows.get(scope) or UsageRow(scope, 0, 0, 0, 0, 0, 0.0)


def _fields(row: UsageRow) -> dict[str, Any]:
    """Every field of a report row, and its ``tokens``."""
    out = {f.name: getattr(row, f.name) for f in fields(row)}
    out["tokens"] = row.tokens
    return out


def _decisions(
    guard: BudgetGuard,
    spans: Sequence[tuple[float, float | None]],
    per_bucket: Sequence[Mapping[str, UsageRow]],
    since: float,
    until: float | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The latest ``limit`` records of the period, newest first. The log is read oldest first,
    so it is read from the last bucket that, with the ones after it, holds ``limit`` records
    (every call is on ``global``, whose count per bucket is known), not from the start."""
    start, seen = since, 0
    for (a, _b), rows in zip(reversed(spans), reversed(per_bucket), strict=True):
        g = rows.get("global")
        seen += g.requests + g.denied if g is not None else 0
        if seen >= limit:
            start = a
            break
    records = guard.ledger.records(since=start, until=until)
    return [_decision(r) for r in reversed(records[-limit:])]


def _decision(r: UsageRecord) -> dict[str, Any]:
    error = r.extra.get("error") if isinstance(r.extra, Mapping) else None
    note = error.get("message") if isinstance(error, Mapping) else None
    return {
        "ts": r.ts,
        "ts_iso": _iso(r.ts),
        "action": r.action,
        "model": r.model,
        "requested_model": r.requested_model,
        "scopes": list(r.scopes),
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "tokens": r.input_tokens + r.output_tokens,
        "usd": r.usd,
        "estimated": r.estimated,
        "reservation_id": r.reservation_id,
        "note": note if isinstance(note, str) else "",
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _span(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")
