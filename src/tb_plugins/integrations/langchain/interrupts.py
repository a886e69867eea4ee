"""``TokenBudgetMiddleware(..., on_exhausted="interrupt")``: check in with a person instead of
ending a run whose own budget is spent.

The run pauses with a LangGraph :func:`~langgraph.types.interrupt` whose payload names the
budget (see :func:`interrupt_payload`). Resuming with ``Command(resume={"extend": "5k
tokens"})`` raises *that run's* limit by the amount (a runtime override on the concrete
``run:<id>`` scope, see :meth:`BudgetGuard.set_budget
<tb_plugins.engine.live.LiveBudgets.set_budget>`, so it is in ``tb budgets history`` with its
reason) and the call goes on; anything else (``{"extend": None}``, ``"stop"``) ends the run
with the usual final message. Interrupts need a checkpointer (e.g. ``InMemorySaver``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tb_plugins.core.quantities import parse_quantity, parse_usd
from tb_plugins.engine import BudgetGuard
from tb_plugins.errors import (
    BudgetExceeded,
    BudgetRefused,
    RequestTooLarge,
    RunLimitExceeded,
    ToolLimitExceeded,
)

__all__ = [
    "INTERRUPT_KIND",
    "extend_change",
    "extendable",
    "extension",
    "interrupt_payload",
    "require_checkpointer",
    "run_scope",
]

INTERRUPT_KIND = "tb_plugins.budget_exhausted"
"""The ``type`` of the interrupt payload."""
_EXTENDABLE_UNITS = ("tokens", "input_tokens", "output_tokens", "usd", "requests", "calls")
_AMOUNT = re.compile(r"^\s*(?P<amount>\$?[\d_.,]+\s*[kmbgKMBG]?)\s*(?P<unit>[a-z_]+)?\s*$")


def run_scope(scopes: Sequence[str]) -> str | None:
    """The ``run:<id>`` scope of a call's scopes, if any."""
    return next((s for s in reversed(scopes) if s.startswith("run:")), None)


def extendable(err: BudgetRefused, run: str | None) -> bool:
    """True for a refusal an extension of the run's allowance can lift: a budget (tokens,
    usd, ``calls``, ...) of the run's own scope. A run ended by ``repeats`` or ``seconds``, a
    request above ``request.max_input_tokens`` and a budget of any other scope are not."""
    return (
        run is not None
        and isinstance(err, BudgetExceeded)
        and not isinstance(err, RunLimitExceeded | RequestTooLarge | ToolLimitExceeded)
        and err.scope == run
        and err.unit in _EXTENDABLE_UNITS
    )


def interrupt_payload(err: BudgetExceeded) -> dict[str, Any]:
    """What the interrupt shows: the budget, scope, spent, limit and unit, and how to go on.

    Example:
        >>> err = BudgetExceeded(scope="run:1", budget="run:* 5 calls/total", unit="calls",
        ...                      spent=5, limit=5, requested=1, resets_at=None)
        >>> p = interrupt_payload(err)
        >>> p["budget"], p["scope"], p["spent"], p["limit"], p["unit"]
        ('run:* 5 calls/total', 'run:1', 5, 5, 'calls')
    """
    return {
        "type": INTERRUPT_KIND,
        "budget": err.budget,
        "scope": err.scope,
        "unit": err.unit,
        "spent": err.spent,
        "limit": err.limit,
        "requested": err.requested,
        "message": str(err),
        "resume": (
            f'Command(resume={{"extend": "<amount, e.g. {_example(err.unit)}>"}}) raises this '
            f"run's limit by the amount; any other answer ends the run"
        ),
    }


def _example(unit: str) -> str:
    return {"usd": "$1", "calls": "5 calls", "requests": "5 requests"}.get(unit, f"5k {unit}")


def extension(answer: Any, unit: str) -> float | None:
    """The amount, in ``unit``, an answer to the interrupt extends the run by; None when the
    answer is not ``{"extend": <amount>}`` (the run ends).

    Raises:
        ValueError: the amount is not readable, not positive, or in another unit.

    Example:
        >>> extension({"extend": "5k tokens"}, "tokens"), extension({"extend": "$2"}, "usd")
        (5000, 2.0)
        >>> extension({"extend": None}, "tokens") is None, extension("stop", "calls") is None
        (True, True)
    """
    if not isinstance(answer, Mapping):
        return None
    value = answer.get("extend")
    if value is None or value is False:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    m = _AMOUNT.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"extend: expected an amount such as {_example(unit)!r}, got {value!r}")
    amount, named = m.group("amount"), m.group("unit")
    if amount.startswith("$"):
        named = named or "usd"
    named = {"dollars": "usd", "call": "calls", "token": "tokens"}.get(named or unit, named or unit)
    if named != unit:
        raise ValueError(
            f"extend: this run's budget is in {unit}; extend it with e.g. {_example(unit)!r}, "
            f"not {value!r}"
        )
    extra: float = parse_usd(amount) if unit == "usd" else parse_quantity(amount)
    if extra <= 0:
        raise ValueError(f"extend: the amount must be positive, got {value!r}")
    return extra


def extend_change(guard: BudgetGuard, err: BudgetExceeded, extra: float) -> dict[str, Any]:
    """The arguments of :meth:`BudgetGuard.set_budget
    <tb_plugins.engine.live.LiveBudgets.set_budget>` that raise the limit of the run's budget
    that refused ``err`` by ``extra``: an override on the concrete run scope, in the refused
    budget's window, with a reason that says so."""
    limit = err.limit + extra
    amount = f"${limit:.9g}" if err.unit == "usd" else f"{int(limit)} {err.unit}"
    return {
        "scope": err.scope,
        "limit": f"{amount}/{_window(guard, err)}",
        "reason": (
            f"extended at interrupt: +{_amount(err.unit, extra)} for {err.scope} "
            f"(budget {err.budget!r}, {_amount(err.unit, err.spent)} spent)"
        ),
    }


def _amount(unit: str, value: float) -> str:
    return f"${value:.9g}" if unit == "usd" else f"{value:,.0f} {unit}"


def _window(guard: BudgetGuard, err: BudgetExceeded) -> str:
    """The window of the budget (or override) that refused: read on the run's lines."""
    lines = guard.planner.lines(guard.planner.scope_path([err.scope]), guard.now())
    for lp in lines:
        if lp.line.scope == err.scope and any(b.name == err.budget for b in lp.budgets):
            return str(lp.line.window)
    return "total"


def require_checkpointer() -> None:
    """Raise a clear error when the graph runs without a checkpointer (an interrupt could
    not be resumed)."""
    from langgraph.config import get_config

    try:
        configurable = get_config().get("configurable") or {}
    except RuntimeError:  # not inside a graph: nothing to check
        return
    if configurable.get("__pregel_checkpointer") is None:
        raise ValueError(
            "TokenBudgetMiddleware(on_exhausted='interrupt') needs a checkpointer: "
            "create_agent(..., checkpointer=InMemorySaver()) and invoke with "
            "config={'configurable': {'thread_id': ...}}"
        )
