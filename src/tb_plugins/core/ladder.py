"""What enforcement would decide, worked out in memory: the decision ladder on known states.

The guard's check walks the ladder against the ledger (reserve; when refused, step down: clamp,
downgrade, deny). :func:`decide` walks the very same steps, with the rules of
:mod:`tb_plugins.core.policy`, against line states already read, with no I/O. Two features use
it:

* **shadow mode** — a budget in ``mode: shadow`` is charged but not enforced: the guard
  reserves with its limits *lifted* (:func:`lift`: a unit only a shadow budget limits gets the
  limit :data:`LIFTED`, which no spend reaches, so the ledger still reads the unit but never
  refuses on it), then asks :func:`decide` what the line with every limit in force
  (:attr:`LinePlan.shadow <tb_plugins.core.policy.LinePlan.shadow>`) would have done with the
  states the reservation returned. A policy with no budget in shadow mode plans no such view
  and pays nothing for it.
* **replay** — :mod:`tb_plugins.engine.replay` runs recorded calls through another policy,
  keeping the line states in memory.

Example:
    >>> from tb_plugins.core.usage import NO_LIMITS
    >>> lift((1000, None, None, None, None, None), (500, None, None, 10**9, None, None))
    (1000, None, None, 4611686018427387904, None, None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from tb_plugins.core.lines import LineState
from tb_plugins.core.policy import (
    LinePlan,
    Plan,
    max_output_that_fits,
    refusal,
    utilization,
)
from tb_plugins.core.usage import OUTPUT_TOKENS, TOKENS, UNITS, USD, Amounts, Limits
from tb_plugins.errors import BudgetExceeded

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget

__all__ = ["LIFTED", "Verdict", "Verdicts", "decide", "fits", "full_view", "lift"]

LIFTED = 2**62
"""The limit a reservation puts on a unit only shadow budgets limit: far above any spend a
ledger can add up (2**62 nano-dollars is $4.6 billion), exact as a double (Redis) and as an
int8 (PostgreSQL), so the ledger reads the unit's state and never refuses on it."""

Verdicts = Literal["allow", "clamp", "downgrade", "deny"]
_MAX_STEPS = 6  # as many steps as the guard's check takes (it cannot need more)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the ladder decides for one call.

    Attributes:
        action: ``allow``, ``clamp``, ``downgrade`` or ``deny``.
        plan: the call as it would run (model, output cap); for a deny, the smallest call
            that was tried.
        reasons: why, in words (as :attr:`Decision.reasons
            <tb_plugins.engine.decision.Decision.reasons>` gives them).
        budget: the budget that caused a clamp, downgrade or deny (None for an allow, or a
            clamp by a per-request cap alone).
        scope: the scope of that budget's line.
        unit: the unit that bound (``tokens``, ``usd``, ...), None for a ``downgrade_at``.
        error: for a deny, the error the guard would raise.
    """

    action: Verdicts
    plan: Plan
    reasons: tuple[str, ...] = ()
    budget: Budget | None = None
    scope: str | None = None
    unit: str | None = None
    error: BudgetExceeded | None = None


def lift(enforced: Limits, full: Limits) -> Limits:
    """The limits a line is reserved with: ``enforced`` (its enforced budgets' limits), with
    :data:`LIFTED` on each unit that only its shadow budgets limit (``full``)."""
    a, b, c, d, e, f = (
        LIFTED if lim is None and every is not None else lim
        for lim, every in zip(enforced, full, strict=True)
    )
    return (a, b, c, d, e, f)


def full_view(lines: Sequence[LinePlan]) -> tuple[LinePlan, ...]:
    """The lines with every limit in force: each line's ``shadow`` view where it has one."""
    return tuple([lp.shadow or lp for lp in lines])


def fits(amounts: Amounts, lines: Sequence[LinePlan], states: Sequence[LineState]) -> bool:
    """Whether ``amounts`` more fit every limit of every line (as the ledger checks it)."""
    for lp, st in zip(lines, states, strict=True):
        for unit, limit in enumerate(lp.line.limits):
            if limit is not None and st.spent[unit] + st.held[unit] + amounts[unit] > limit:
                return False
    return True


def decide(
    plan: Plan,
    reasons: Sequence[str],
    cheaper: Callable[[], tuple[Plan, list[str]]] | None,
    lines: Sequence[LinePlan],
    states: Sequence[LineState],
    min_output_tokens: int,
    *,
    adjust: bool = True,
) -> Verdict:
    """The guard's decision for ``plan`` if each line's state were ``states`` (spent and held
    by others, before this call), every budget of ``lines`` enforced.

    Args:
        plan: the call as asked (after the per-request output cap).
        reasons: why ``plan`` already differs from the request (that cap): then at least a
            clamp.
        cheaper: the call planned for the cheaper model, with its reasons (None: no
            downgrade mapping, or ``adjust`` is False); called at most once.
        lines: the lines of the call, limits in force.
        states: their states, one per line.
        min_output_tokens: the policy's floor for a clamp.
        adjust: False when the caller cannot change the request: allow or deny only.
    """
    action: Verdicts = "clamp" if reasons else "allow"
    why = list(reasons)
    cause: tuple[Budget | None, str | None, str | None] = (None, None, None)
    memo: list[tuple[Plan, list[str]]] = []

    def alternative() -> tuple[Plan, list[str]] | None:
        if cheaper is None or not adjust:
            return None
        if not memo:
            memo.append(cheaper())
        alt, alt_why = memo[0]
        return None if alt.model == plan.model else (alt, list(alt_why))

    watch = any(lp.downgrades for lp in lines)
    for _step in range(_MAX_STEPS):
        if fits(plan.amounts(), lines, states):
            due = _downgrade_due(lines, states) if watch else None
            alt = alternative() if due is not None else None
            if due is not None and alt is not None:
                budget, scope = due
                plan, why, action = alt[0], [*alt[1], _past(budget)], "downgrade"
                cause = (budget, scope, None)
                continue
            return Verdict(action, plan, tuple(why), cause[0], cause[1], cause[2])
        best, hard = max_output_that_fits(plan, lines, states)
        if not hard and (best is None or best >= plan.output_tokens):
            break  # the guard would try again, and with these states end in a deny
        if (
            adjust
            and not hard
            and best is not None
            and plan.output_tokens > 0
            and best >= min(min_output_tokens, plan.output_tokens)
        ):
            if action != "downgrade":
                cause = _clamp_cause(plan, lines, states)
                action = "clamp"
            why.append(
                f"max_tokens lowered from {plan.output_tokens} to {best} to fit what is left"
            )
            plan = replace(plan, output_tokens=best, max_tokens=best)
            continue
        alt = alternative()
        if alt is not None:
            cheap, cheap_why = alt
            best2, hard2 = max_output_that_fits(cheap, lines, states)
            floor = min(min_output_tokens, cheap.output_tokens)
            if not hard2 and (best2 is None or best2 >= floor):
                cheap_why.append(f"only the cheaper model {cheap.model!r} fits what is left")
                if best2 is not None and best2 < cheap.output_tokens:
                    cheap = replace(cheap, output_tokens=best2, max_tokens=best2)
                    cheap_why.append(f"max_tokens lowered to {best2} to fit what is left")
                err = refusal(plan, lines, states, min_output_tokens)
                plan, why, action = cheap, cheap_why, "downgrade"
                cause = (_named(lines, err.scope, err.budget), err.scope, err.unit)
                continue
        break
    err = refusal(plan, lines, states, min_output_tokens)
    binding = _named(lines, err.scope, err.budget)
    return Verdict("deny", plan, (*why, str(err)), binding, err.scope, err.unit, err)


def _downgrade_due(
    lines: Sequence[LinePlan], states: Sequence[LineState]
) -> tuple[Budget, str] | None:
    """The first budget (shadow ones included) past its ``downgrade_at``, and its scope."""
    for lp, st in zip(lines, states, strict=True):
        if not lp.downgrades:
            continue
        for b in lp.budgets:
            if b.downgrade_at is not None and utilization(b, st) >= b.downgrade_at:
                return b, lp.line.scope
    return None


def _past(budget: Budget) -> str:
    return f"budget {budget.name!r} is past its downgrade_at ({budget.downgrade_at:.0%})"


def _clamp_cause(
    plan: Plan, lines: Sequence[LinePlan], states: Sequence[LineState]
) -> tuple[Budget | None, str | None, str | None]:
    """The budget whose limit leaves the least output for ``plan`` (what a clamp fits)."""
    least: tuple[float, int, int] | None = None
    in_cost = math.ceil(plan.input_tokens * plan.input_nano_per_token - 1e-9)
    for i, (lp, st) in enumerate(zip(lines, states, strict=True)):
        for unit in (TOKENS, OUTPUT_TOKENS, USD):
            limit = lp.line.limits[unit]
            if limit is None:
                continue
            avail = limit - st.spent[unit] - st.held[unit]
            if unit == TOKENS:
                cap: float = avail - plan.input_tokens
            elif unit == OUTPUT_TOKENS:
                cap = avail
            elif plan.output_nano_per_token > 0:
                cap = (avail - in_cost) / plan.output_nano_per_token
            else:
                continue
            if least is None or cap < least[0]:
                least = (cap, i, unit)
    if least is None:
        return None, None, None
    _, i, unit = least
    lp = lines[i]
    return _of_unit(lp, unit), lp.line.scope, UNITS[unit]


def _of_unit(lp: LinePlan, unit: int) -> Budget | None:
    """The budget of a line whose limit on ``unit`` is the line's (the tightest)."""
    name = lp.limit_names[unit]
    for b in lp.budgets:
        if b.name == name and b.limits[unit] == lp.line.limits[unit]:
            return b
    return next((b for b in lp.budgets if b.limits[unit] == lp.line.limits[unit]), None)


def _named(lines: Sequence[LinePlan], scope: str, name: str) -> Budget | None:
    for lp in lines:
        if lp.line.scope == scope:
            for b in lp.budgets:
                if b.name == name:
                    return b
    return None
