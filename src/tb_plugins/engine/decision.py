"""What the guard hands back: a :class:`Decision` for a checked call, a :class:`Charge` for a
settled one, and a :class:`BudgetStatus` per budget limit, plus the ids reservations carry."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

from tb_plugins.core.policy import LinePlan, Plan
from tb_plugins.core.request import Request
from tb_plugins.core.usage import (
    CALLS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REQUESTS,
    TOKENS,
    UNIT_INDEX,
    UNITS,
    USD,
    UsageRow,
    unit_value,
)
from tb_plugins.engine.alerts import Alert
from tb_plugins.ledger.base import LineState

__all__ = [
    "Action",
    "BudgetStatus",
    "Charge",
    "Decision",
    "Estimate",
    "FORECAST_TRAILING_SECONDS",
    "Shadow",
    "forecast_queries",
    "new_reservation_id",
    "statuses",
    "with_forecasts",
]

Action = Literal["allow", "clamp", "downgrade"]

FORECAST_TRAILING_SECONDS = 3600.0
"""How far back :meth:`BudgetGuard.status <tb_plugins.engine.guard.BudgetGuard.status>` looks
in the usage log for the burn rate a forecast extrapolates: the last hour, or the time since
the window started when that is shorter."""


def new_reservation_id() -> str:
    """A time-ordered UUID (version 7) as 32 hex digits: 48 bits of Unix milliseconds, then
    74 random bits. Ids made in time order land next to each other in a ledger's index of
    settled ids (a random uuid4 lands on a random page of it, each time)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68) << 64
        | 0b10 << 62
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    return f"{value:032x}"


@dataclass(frozen=True)
class Estimate:
    """What a call is expected to use: the amounts held by its reservation.

    ``exact`` is True when the input side was counted with the model's own tokenizer (or
    given); False for an approximation, or for the upper bound of bound-first estimates
    (``estimate: {input: bound_first}``), which a call far from its limits is admitted on.
    """

    input_tokens: int
    output_tokens: int
    usd: float | None
    exact: bool

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Shadow:
    """What enforcement would have done with a call that budgets in ``mode: shadow`` let
    through unchanged (:attr:`Decision.shadow`; its usage row keeps it under
    ``extra["shadow"]``, see :meth:`to_dict`).

    Attributes:
        action: ``allow``, ``clamp``, ``downgrade`` or ``deny``.
        model: the model enforcement would have run.
        max_tokens: the output cap it would have sent.
        reasons: why, in words.
        budget: the name of the budget that caused a clamp, downgrade or deny (or
            ``request.max_input_tokens``), None for an allow.
        scope: the scope of that budget's line (``request`` for a per-request cap).
        unit: the unit that bound (``tokens``, ``usd``, ...), if one did.
        input_tokens: the input tokens the call was estimated at.
        asked_max_tokens: the output cap the call asked for (None: none set).
    """

    action: str
    model: str
    max_tokens: int | None
    reasons: tuple[str, ...] = ()
    budget: str | None = None
    scope: str | None = None
    unit: str | None = None
    input_tokens: int = 0
    asked_max_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON a usage row keeps (:func:`from_dict` reads it back)."""
        return {
            "action": self.action,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "budget": self.budget,
            "scope": self.scope,
            "unit": self.unit,
            "reasons": list(self.reasons),
            "request": {"input_tokens": self.input_tokens, "max_tokens": self.asked_max_tokens},
        }

    @classmethod
    def from_dict(cls, data: object) -> Shadow | None:
        """A verdict from a usage row's ``extra["shadow"]`` (None if it is not one)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("action"), str):
            return None
        request = data.get("request")
        request = request if isinstance(request, Mapping) else {}
        asked = request.get("max_tokens")
        reasons = data.get("reasons")
        return cls(
            action=data["action"],
            model=str(data.get("model") or ""),
            max_tokens=_count_or_none(data.get("max_tokens")),
            reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
            budget=_text_or_none(data.get("budget")),
            scope=_text_or_none(data.get("scope")),
            unit=_text_or_none(data.get("unit")),
            input_tokens=_count_or_none(request.get("input_tokens")) or 0,
            asked_max_tokens=_count_or_none(asked),
        )


def _count_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Decision:
    """The guard's answer for one call. Apply ``model`` and ``max_tokens`` to the request.

    Attributes:
        action: ``allow``, ``clamp`` (``max_tokens`` lowered) or ``downgrade`` (``model``
            replaced by its cheaper mapping; ``max_tokens`` may be lowered too).
        model: the model to call.
        requested_model: the model the caller asked for.
        max_tokens: the output cap to send (None: the caller set none and none is needed).
        reservation_id: the hold's id; pass the decision to ``settle`` or ``release``.
        estimate: the amounts held.
        scopes: the scope path charged (``global`` first).
        reasons: why the action differs from the request, in words.
        remaining: the least left of each limited unit over the path, after this hold.
        local: True when admitted under ``fail_open`` without a ledger hold.
        shadow: with budgets (or the policy) in ``mode: shadow``, what enforcement would have
            done (None otherwise); ``action``, ``model`` and ``max_tokens`` are then what
            the enforced budgets decided.
        kept_messages: under ``request: {on_too_long: trim}``, the indices of the request's
            messages to send, in order, when the conversation was trimmed to fit
            ``request.max_input_tokens`` (None: send them all).
    """

    action: Action
    model: str
    requested_model: str
    max_tokens: int | None
    reservation_id: str
    estimate: Estimate
    scopes: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    remaining: Mapping[str, float] = field(default_factory=dict)
    local: bool = False
    created_at: float = 0.0
    expires_at: float = 0.0
    lines: tuple[LinePlan, ...] = field(default=(), repr=False)
    plan: Plan | None = field(default=None, repr=False)
    issuer: str = field(default="", repr=False, compare=False)
    shadow: Shadow | None = None
    request: Request | None = field(default=None, repr=False, compare=False)
    kept_messages: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Charge:
    """What :meth:`BudgetGuard.settle` charged."""

    reservation_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    usd: float | None
    estimated: bool
    applied: bool
    alerts: tuple[Alert, ...] = ()

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class BudgetStatus:
    """One limit of one budget on one scope, now."""

    scope: str
    budget: str
    window: str
    unit: str
    spent: float
    reserved: float
    limit: float
    remaining: float
    utilization: float
    window_start: float | None
    resets_at: float | None
    forecast_exhausted_at: float | None = None
    """When the limit runs out at the recent burn rate (epoch seconds): ``now`` when it is
    already spent, None when it is not on course to run out before ``resets_at`` (any time,
    for ``total``) or nothing was spent in the trailing period
    (:data:`FORECAST_TRAILING_SECONDS`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO 8601 too)."""
        iso = {
            f"{k}_iso": None
            if v is None
            else datetime.fromtimestamp(v, tz=timezone.utc).isoformat()
            for k, v in (
                ("window_start", self.window_start),
                ("resets_at", self.resets_at),
                ("forecast_exhausted_at", self.forecast_exhausted_at),
            )
        }
        return {**self.__dict__, **iso}


def statuses(
    plans: Sequence[LinePlan], states: Sequence[LineState], now: float, tz: ZoneInfo
) -> list[BudgetStatus]:
    """One :class:`BudgetStatus` per limited unit of every budget of each line."""
    out = []
    for lp, st in zip(plans, states, strict=True):
        start = None
        if lp.budgets and lp.line.window != "total":
            start = lp.budgets[0].window.slot(now, tz).start
        for b in lp.budgets:
            for u, lim in enumerate(b.limits):
                if lim is None:
                    continue
                spent = unit_value(u, st.spent[u])
                held = unit_value(u, st.held[u])
                limit = unit_value(u, lim)
                used = spent + held
                out.append(
                    BudgetStatus(
                        scope=lp.line.scope,
                        budget=b.name,
                        window=lp.line.window,
                        unit=UNITS[u],
                        spent=spent,
                        reserved=held,
                        limit=limit,
                        remaining=max(limit - used, 0.0),
                        utilization=(used / limit) if limit else (float("inf") if used else 0.0),
                        window_start=start,
                        resets_at=lp.resets_at,
                    )
                )
    return out


def _trailing_since(status: BudgetStatus, now: float) -> float | None:
    """Where the burn-rate period of ``status`` starts, or None when it is empty (the window
    started just now)."""
    period = FORECAST_TRAILING_SECONDS
    if status.window_start is not None:
        period = min(period, now - status.window_start)
    return now - period if period > 0 else None


def forecast_queries(sts: Sequence[BudgetStatus], now: float) -> list[tuple[str, float]]:
    """The usage-log reads a forecast of ``sts`` needs, as ``(scope, since)`` without repeats:
    one per scope, unless a window of it started less than
    :data:`FORECAST_TRAILING_SECONDS` ago (its period is shorter, so it gets its own read)."""
    out: list[tuple[str, float]] = []
    for s in sts:
        since = _trailing_since(s, now)
        if since is not None and (s.scope, since) not in out:
            out.append((s.scope, since))
    return out


_ROW_UNIT: dict[int, Callable[[UsageRow], float]] = {  # calls are counted as requests
    TOKENS: lambda r: float(r.tokens),
    INPUT_TOKENS: lambda r: float(r.input_tokens),
    OUTPUT_TOKENS: lambda r: float(r.output_tokens),
    USD: lambda r: r.usd,
    REQUESTS: lambda r: float(r.requests),
    CALLS: lambda r: float(r.requests),
}


def with_forecasts(
    sts: Sequence[BudgetStatus],
    recent: Mapping[tuple[str, float], Sequence[UsageRow]],
    now: float,
) -> list[BudgetStatus]:
    """``sts`` with ``forecast_exhausted_at`` set from the usage each ``(scope, since)`` of
    :func:`forecast_queries` read (rows grouped by scope, from ``since`` on).

    The burn rate is the spend of the trailing period over its length; the forecast is
    ``now + remaining / rate``, kept only if it falls before the window resets. A limit
    already spent forecasts ``now``.
    """
    out = []
    for s in sts:
        at: float | None = None
        since = _trailing_since(s, now)
        if s.remaining <= 0:
            at = now
        elif since is not None:
            amount = _ROW_UNIT[UNIT_INDEX[s.unit]]
            spent = sum(amount(r) for r in recent.get((s.scope, since), ()) if r.key == s.scope)
            if spent > 0:
                at = now + s.remaining / (spent / (now - since))
                if s.resets_at is not None and at >= s.resets_at:
                    at = None
        out.append(replace(s, forecast_exhausted_at=at))
    return out
