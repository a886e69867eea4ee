"""The decision ladder, as pure functions with no I/O.

The guard asks the ledger for a reservation; when it fails, these functions read the line
states the ledger returned and say what to try next, in order (first deny wins):

1. **fit** — the call fits as asked (the ledger refused only because of a race): try again.
2. **clamp** — lower ``max_tokens`` to what is left, if at least ``min_output_tokens`` fits.
3. **downgrade** — the cheaper model fits (possibly clamped too).
4. **deny** — :class:`~tb_plugins.errors.BudgetExceeded` for the binding budget: the one that
   resets last, since the call cannot succeed before it does.

A budget past its ``downgrade_at`` fraction also triggers a downgrade when the call would fit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from tb_plugins.core.lines import Line, LineState
from tb_plugins.core.usage import (
    CALLS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REQUESTS,
    TOKENS,
    UNITS,
    USD,
    Amounts,
    Limits,
    amounts,
    unit_value,
)
from tb_plugins.errors import BudgetExceeded, LoopLimitExceeded, _fmt_amount

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget
    from tb_plugins.core.pacing import Allowance

__all__ = [
    "LinePlan",
    "Plan",
    "alerts_crossed",
    "downgrade_due",
    "max_output_that_fits",
    "refusal",
    "remaining",
    "utilization",
]


@dataclass(frozen=True, slots=True)
class LinePlan:
    """A ledger line plus the budgets that set its limits (for messages and alerts).

    ``limit_names[u]`` names the budget whose limit on unit ``u`` is the tightest.

    A line with budgets in ``mode: shadow`` is reserved with their limits lifted (see
    :data:`~tb_plugins.core.ladder.LIFTED`); ``shadow`` is then the same line with every limit
    in force, on which :func:`~tb_plugins.core.ladder.decide` finds what enforcement would do.

    A line whose budgets pace spend or stop some priorities early (``shapes``) is planned per
    call with its limits lowered to what the call may use now (see
    :mod:`tb_plugins.core.pacing`); ``allowance`` then says when a refused call will fit.
    """

    line: Line
    budgets: tuple[Budget, ...]
    limit_names: tuple[str | None, ...]
    resets_at: float | None
    alerts: bool = False  # some budget of the line has alert thresholds
    downgrades: bool = False  # some budget of the line has a downgrade_at fraction
    shadow: LinePlan | None = None  # the line with its shadow budgets' limits in force
    shapes: bool = False  # some budget of the line is paced or has stop_at fractions
    allowance: Allowance | None = None  # how pacing and stop_at lowered the limits

    @classmethod
    def of(
        cls,
        line: Line,
        budgets: tuple[Budget, ...],
        limit_names: tuple[str | None, ...],
        resets_at: float | None,
    ) -> LinePlan:
        """A line plan with its ``alerts`` and ``downgrades`` flags worked out."""
        return cls(
            line,
            budgets,
            limit_names,
            resets_at,
            alerts=any(b.alerts for b in budgets),
            downgrades=any(b.downgrade_at is not None for b in budgets),
            shapes=any(b.shapes for b in budgets),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """One attempt: which model, how many tokens, at what price (nano-dollars per token)."""

    model: str
    input_tokens: int
    output_tokens: int
    max_tokens: int | None
    input_nano_per_token: float
    output_nano_per_token: float
    priced: bool
    exact: bool
    bound: bool = False  # input_tokens is an upper bound, not a count (bound-first estimates)

    def usd_nano(self, output_tokens: int | None = None) -> int:
        """Estimated cost, rounded up, of this plan with ``output_tokens`` of output."""
        out = self.output_tokens if output_tokens is None else output_tokens
        cost = self.input_tokens * self.input_nano_per_token + out * self.output_nano_per_token
        return math.ceil(cost - 1e-9)

    def amounts(self, output_tokens: int | None = None) -> Amounts:
        """The amounts this plan holds on every line."""
        out = self.output_tokens if output_tokens is None else output_tokens
        return amounts(self.input_tokens, out, self.usd_nano(out))


def _avail(limits: Limits, state: LineState, unit: int) -> int | None:
    limit = limits[unit]
    if limit is None:
        return None
    return limit - state.spent[unit] - state.held[unit]


def max_output_that_fits(
    plan: Plan, lines: Sequence[LinePlan], states: Sequence[LineState]
) -> tuple[int | None, list[tuple[int, int]]]:
    """The most output tokens every line still admits for this plan's input.

    Returns ``(max_output, hard_failures)``: ``max_output`` is None when no line limits output
    (it may be negative when even zero output does not fit); ``hard_failures`` lists
    ``(line_index, unit)`` pairs that no clamp can fix (requests, calls, input tokens, or the
    input's cost alone).
    """
    best: int | None = None
    hard: list[tuple[int, int]] = []
    in_cost = math.ceil(plan.input_tokens * plan.input_nano_per_token - 1e-9)
    for i, (lp, st) in enumerate(zip(lines, states, strict=True)):
        limits = lp.line.limits
        for unit in (REQUESTS, CALLS):
            a = _avail(limits, st, unit)
            if a is not None and a < 1:
                hard.append((i, unit))
        a = _avail(limits, st, INPUT_TOKENS)
        if a is not None and a < plan.input_tokens:
            hard.append((i, INPUT_TOKENS))
        caps: list[int] = []
        a = _avail(limits, st, TOKENS)
        if a is not None:
            caps.append(a - plan.input_tokens)
        a = _avail(limits, st, OUTPUT_TOKENS)
        if a is not None:
            caps.append(a)
        a = _avail(limits, st, USD)
        if a is not None:
            if a < in_cost:
                hard.append((i, USD))
            elif plan.output_nano_per_token > 0:
                caps.append(math.floor((a - in_cost) / plan.output_nano_per_token))
        for c in caps:
            best = c if best is None else min(best, c)
    return best, hard


def refusal(
    plan: Plan,
    lines: Sequence[LinePlan],
    states: Sequence[LineState],
    min_output_tokens: int,
) -> BudgetExceeded:
    """The error to raise when nothing fits: the failing budget that resets last (for a
    paced or ``stop_at`` limit: when its allowance admits the call, if before the reset)."""
    need = plan.amounts(min(plan.output_tokens, min_output_tokens))
    worst: tuple[float, int, int] | None = None
    for i, (lp, st) in enumerate(zip(lines, states, strict=True)):
        for unit in range(len(UNITS)):
            a = _avail(lp.line.limits, st, unit)
            if a is None or need[unit] <= a:
                continue
            reset = _admits_at(lp, st, unit, need[unit])
            key = (reset, -i, unit)
            if worst is None or key > worst:
                worst = key
    if worst is None:  # every line fits the minimum now; report the tightest line anyway
        worst = (0.0, 0, TOKENS)
        for i, lp in enumerate(lines):
            for unit in range(len(UNITS)):
                if lp.line.limits[unit] is not None:
                    worst = (0.0, -i, unit)
                    break
    at, neg_i, unit = worst
    lp, st = lines[-neg_i], states[-neg_i]
    limit = lp.line.limits[unit] or 0
    cls = LoopLimitExceeded if unit == CALLS else BudgetExceeded
    resets_at = lp.resets_at
    message = None
    if lp.allowance is not None and at and at != math.inf:
        resets_at = at
        message = _paced_message(lp, unit, st.spent[unit] + st.held[unit], limit, need[unit], at)
    return cls(
        scope=lp.line.scope,
        budget=lp.limit_names[unit] or lp.line.scope,
        unit=UNITS[unit],
        spent=unit_value(unit, st.spent[unit] + st.held[unit]),
        limit=unit_value(unit, limit),
        requested=unit_value(unit, need[unit]),
        resets_at=resets_at,
        message=message,
    )


def _admits_at(lp: LinePlan, st: LineState, unit: int, need: int) -> float:
    """When the line will have room for ``need`` more of ``unit`` (inf: never resets)."""
    if lp.allowance is not None:
        at = lp.allowance.admits_at(unit, st.spent[unit] + st.held[unit] + need)
        if at is not None:
            return at
    return math.inf if lp.resets_at is None else lp.resets_at


def _paced_message(lp: LinePlan, unit: int, used: int, limit: int, need: int, at: float) -> str:
    when = datetime.fromtimestamp(at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    name = UNITS[unit]
    return (
        f"budget {lp.limit_names[unit] or lp.line.scope!r} for scope {lp.line.scope!r} allows "
        f"{_fmt_amount(name, unit_value(unit, limit))} now, for this call's priority (pace / "
        f"stop_at): {_fmt_amount(name, unit_value(unit, used))} used, this call needs "
        f"{_fmt_amount(name, unit_value(unit, need))}; "
        + (
            f"the window resets at {when}"
            if at == lp.resets_at
            else f"the allowance admits it at {when}"
        )
    )


def utilization(budget: Budget, state: LineState, *, include_held: bool = True) -> float:
    """The largest fraction used of any unit this budget limits."""
    worst = 0.0
    for unit, limit in enumerate(budget.limits):
        if limit is None:
            continue
        used = state.spent[unit] + (state.held[unit] if include_held else 0)
        frac = (math.inf if used > 0 else 0.0) if limit == 0 else used / limit
        worst = max(worst, frac)
    return worst


def downgrade_due(lines: Sequence[LinePlan], states: Sequence[LineState]) -> Budget | None:
    """The first enforced budget already past its ``downgrade_at`` fraction, if any (a
    budget in ``mode: shadow`` only records it: see :func:`~tb_plugins.core.ladder.decide`)."""
    for lp, st in zip(lines, states, strict=True):
        for b in lp.budgets:
            if b.downgrade_at is not None and not b.shadow and utilization(b, st) >= b.downgrade_at:
                return b
    return None


def alerts_crossed(
    lines: Sequence[LinePlan], after: Sequence[LineState | None], charged: Amounts
) -> list[tuple[LinePlan, Budget, float, float]]:
    """Thresholds crossed by a settlement: ``(line, budget, threshold, utilization)``.

    Only settled spend counts (not holds): an alert says money was really spent. A line whose
    state was not read back (None) crosses nothing.
    """
    out = []
    for lp, st in zip(lines, after, strict=True):
        if st is None or not lp.alerts:
            continue
        before = LineState(
            spent=tuple(s - c for s, c in zip(st.spent, charged, strict=True)),  # type: ignore[arg-type]
            held=st.held,
        )
        for b in lp.budgets:
            if not b.alerts:
                continue
            u_after = utilization(b, st, include_held=False)
            u_before = utilization(b, before, include_held=False)
            for t in b.alerts:
                if u_before < t <= u_after:
                    out.append((lp, b, t, u_after))
    return out


def remaining(
    lines: Sequence[LinePlan], states: Sequence[LineState], held: Amounts | None = None
) -> dict[str, float]:
    """The least left of each limited unit over every line, after ``held`` more is held."""
    out: dict[str, float] = {}
    for lp, st in zip(lines, states, strict=True):
        for unit, limit, name in _limited_units(lp.line.limits):
            left = limit - st.spent[unit] - st.held[unit] - (held[unit] if held else 0)
            value = unit_value(unit, max(left, 0))
            known = out.get(name)
            if known is None or value < known:
                out[name] = value
    return out


@functools.lru_cache(maxsize=1024)
def _limited_units(limits: Limits) -> tuple[tuple[int, int, str], ...]:
    """``(unit, limit, unit name)`` of each limited unit."""
    return tuple((u, lim, UNITS[u]) for u, lim in enumerate(limits) if lim is not None)
