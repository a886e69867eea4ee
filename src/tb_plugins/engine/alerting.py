"""The guard's alert flows: threshold alerts after a settle, forecast alerts on the burn rate,
the exhausted alert of a refusal, and the listeners every event goes to.

Each alert is claimed in the ledger first (:meth:`AlertFlows._fire`), so it goes to the sinks
once per budget and window across every process sharing the ledger; delivery itself is off
the call path (:mod:`tb_plugins.engine.alerts`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tb_plugins.core.policy import LinePlan, alerts_crossed
from tb_plugins.core.usage import UNITS, Amounts, UsageRow, unit_value
from tb_plugins.engine.alerts import Alert, AlertSink, dispatch
from tb_plugins.engine.decision import (
    FORECAST_TRAILING_SECONDS,
    forecast_queries,
    statuses,
    with_forecasts,
)
from tb_plugins.engine.drivers import Flow, quiet
from tb_plugins.errors import BudgetExceeded, BudgetRefused, LedgerError
from tb_plugins.ledger.base import Line, LineState

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget
    from tb_plugins.engine.planning import LinePlanner

__all__ = ["FORECAST_CHECK_SECONDS", "FORECAST_MIN_UTILIZATION", "AlertFlows"]

logger = logging.getLogger("tb_plugins")

_EXHAUSTED_MEMORY = 4096  # exhausted-alert keys this process claimed (forgotten past this)
_FORECAST_MEMORY = 4096  # lines whose next forecast check is remembered (forgotten past this)
_FORECAST_READS_PER_SCOPE = 4  # forecasts of more scopes read the log once per period
FORECAST_CHECK_SECONDS = 300.0
"""How often, at most, one process checks one line's forecast for a ``forecast`` alert."""
FORECAST_MIN_UTILIZATION = 0.1
"""A budget's forecast is checked once it is this much used (below it, no usage-log read)."""


class AlertFlows:
    """The alert flows, as methods of the guard (which provides the attributes below)."""

    planner: LinePlanner
    listeners: list[Callable[[str, Mapping[str, Any]], None]]
    _sinks: list[AlertSink]
    _exhausted: set[str]
    _forecast_due: dict[str, float]

    def _exhausted_alert(
        self, lines: Sequence[LinePlan], now: float, err: BudgetRefused
    ) -> Flow[None]:
        """The ``exhausted`` alert of the budget that refused: once per budget per window
        across processes (the ledger's claim decides), and one claim per process at most."""
        if not isinstance(err, BudgetExceeded) or not self._sinks:
            return
        lp = next(
            (
                lp
                for lp in lines
                if lp.line.scope == err.scope
                and (err.budget in lp.limit_names or err.budget == lp.line.scope)
            ),
            None,
        )
        if lp is None or (lp.allowance is not None and _shaped(lp, err)):
            return  # a paced or stop_at refusal: the budget itself is not exhausted
        key = f"{lp.line.key}|{_period(lp.line)}|exhausted|{err.budget}"
        if key in self._exhausted:
            return
        if len(self._exhausted) > _EXHAUSTED_MEMORY:
            self._exhausted.clear()
        self._exhausted.add(key)
        alert = Alert(
            scope=err.scope,
            budget=err.budget,
            window=lp.line.window,
            threshold=1.0,
            utilization=(err.spent / err.limit) if err.limit else 1.0,
            resets_at=err.resets_at,
            ts=now,
            kind="exhausted",
            unit=err.unit,
            spent=float(err.spent),  # the refusal's figures are in the unit's own terms
            limit=float(err.limit),
        )
        yield from self._fire(alert, key, lp)

    def _alerts(
        self,
        lines: Sequence[LinePlan],
        states: Sequence[LineState | None],
        charged: Amounts,
        now: float,
    ) -> Flow[list[Alert]]:
        fired = []
        for lp, budget, threshold, util in alerts_crossed(lines, states, charged):
            key = f"{lp.line.key}|{_period(lp.line)}|{budget.index}:{budget.name}|{threshold:g}"
            state = states[lines.index(lp)]
            alert = Alert(
                scope=lp.line.scope,
                budget=budget.name,
                window=lp.line.window,
                threshold=threshold,
                utilization=util,
                resets_at=lp.resets_at,
                ts=now,
                **_figures(budget, state),
            )
            if (yield from self._fire(alert, key, lp)):
                fired.append(alert)
        return fired

    def _forecast_alerts(
        self, lines: Sequence[LinePlan], states: Sequence[LineState | None], now: float
    ) -> Flow[list[Alert]]:
        """``forecast`` alerts: a line with alert thresholds in a calendar window, checked at
        most every :data:`FORECAST_CHECK_SECONDS` per process, whose burn rate (the trailing
        hour, as ``tb status``) runs it out before it resets. Not before the window has run
        an hour (or a tenth of its length, if shorter): the first minutes' rate says little; and
        not below :data:`FORECAST_MIN_UTILIZATION` used, so the many scopes that spend little
        cost no read. One usage-log read per line checked; once per budget per window across
        processes (the ledger's claim)."""
        due = [
            (lp, st)
            for lp, st in zip(lines, states, strict=True)
            if st is not None
            and lp.alerts  # cheapest tests first: this runs on every settle
            and self._forecast_due.get(lp.line.key, -math.inf) <= now
            and lp.resets_at is not None
            and not lp.line.rolling
            and any(b.alerts and b.forecast_alert for b in lp.budgets)
        ]
        fired: list[Alert] = []
        if not due:
            return fired
        if len(self._forecast_due) > _FORECAST_MEMORY:
            self._forecast_due.clear()
        for lp, _st in due:
            self._forecast_due[lp.line.key] = now + FORECAST_CHECK_SECONDS
        forecasting = {b.name for lp, _ in due for b in lp.budgets if b.alerts and b.forecast_alert}
        sts = [
            s
            for s in statuses([lp for lp, _ in due], [st for _, st in due], now, self.planner.tz)
            if s.budget in forecasting
            and FORECAST_MIN_UTILIZATION <= s.utilization < 1
            and s.window_start is not None
            and s.resets_at is not None
            and now - s.window_start
            >= min(FORECAST_TRAILING_SECONDS, (s.resets_at - s.window_start) / 10)
        ]
        try:
            recent = yield from self._recent_usage(forecast_queries(sts, now))
        except LedgerError as exc:
            logger.warning("tb_plugins: reading the usage log for forecasts failed: %s", exc)
            return fired
        by_key = {(lp.line.scope, lp.line.window): lp for lp, _ in due}
        for s in with_forecasts(sts, recent, now):
            at = s.forecast_exhausted_at
            if at is None or s.remaining <= 0:
                continue  # not on course to run out, or already out (an exhausted alert)
            lp = by_key[(s.scope, s.window)]
            key = f"{lp.line.key}|{_period(lp.line)}|{s.budget}|forecast"
            alert = Alert(
                scope=s.scope,
                budget=s.budget,
                window=s.window,
                threshold=0.0,
                utilization=s.utilization,
                resets_at=s.resets_at,
                ts=now,
                kind="forecast",
                forecast_exhausted_at=at,
                unit=s.unit,
                spent=s.spent,
                limit=s.limit,
            )
            if (yield from self._fire(alert, key, lp)):
                fired.append(alert)
        return fired

    def _fire(self, alert: Alert, key: str, lp: LinePlan) -> Flow[bool]:
        """Send ``alert`` if this process wins its ledger claim (once per ``key`` across
        processes; the claim is kept a day past the line's window). True if sent."""
        expires = None if lp.line.expires_at is None else lp.line.expires_at + 86400
        if not (yield from quiet("claim_alert", (key,), {"expires_at": expires})):
            return False
        dispatch(alert, self._sinks)
        self._emit("alert", {"alert": alert})
        return True

    def _recent_usage(
        self, queries: Sequence[tuple[str, float]]
    ) -> Flow[dict[tuple[str, float], list[UsageRow]]]:
        """The usage rows each ``(scope, since)`` of a forecast needs: a read per scope when
        there are few, else one read per distinct ``since`` for every scope at once (a status
        of 10,000 users reads the log a few times, not 10,000)."""
        out: dict[tuple[str, float], list[UsageRow]] = {}
        if len(queries) <= _FORECAST_READS_PER_SCOPE:
            for scope, since in queries:
                read = {"since": since, "until": None, "group_by": "scope", "scope": scope}
                out[(scope, since)] = yield ("usage", (), read)
            return out
        for since in sorted({since for _scope, since in queries}):
            rows = yield ("usage", (), {"since": since, "until": None, "group_by": "scope"})
            by_scope = {r.key: r for r in rows}
            for scope, at in queries:
                if at == since and scope in by_scope:
                    out[(scope, since)] = [by_scope[scope]]
        return out

    def _emit(self, event: str, data: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event, data)
            except Exception:
                logger.exception("tb_plugins: listener %r failed", listener)


def _figures(budget: Budget, state: LineState | None) -> dict[str, Any]:
    """The unit, spent and limit of the budget's most used unit after a settle (settled
    spend only, as thresholds count it), for an alert's message."""
    if state is None:
        return {}
    best: tuple[float, int, int] | None = None
    for u, lim in enumerate(budget.limits):
        if lim:
            used = state.spent[u] / lim
            if best is None or used > best[0]:
                best = (used, u, lim)
    if best is None:
        return {}
    _, u, lim = best
    return {"unit": UNITS[u], "spent": unit_value(u, state.spent[u]), "limit": unit_value(u, lim)}


def _shaped(lp: LinePlan, err: BudgetExceeded) -> bool:
    """Whether ``err`` refused on a limit pacing or ``stop_at`` lowered below the budget's."""
    unit = UNITS.index(err.unit)
    full = [lim for b in lp.budgets if not b.shadow and (lim := b.limits[unit]) is not None]
    return bool(full) and err.limit < unit_value(unit, min(full))


def _period(line: Line) -> int:
    """Which window an alert is once per: a calendar window's bucket; for a rolling window,
    its bucket rounded down to the window's length (its bucket moves every sub-bucket, so
    keying on it would send the same alert again every few seconds)."""
    if not line.rolling:
        return line.bucket
    length = line.span * line.width
    return line.bucket - line.bucket % length
