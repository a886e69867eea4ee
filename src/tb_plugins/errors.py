"""The exceptions tb_plugins raises.

Every error derives from :class:`TokenBudgetError`::

    TokenBudgetError
    ├── ConfigError              a policy file or dict is malformed (also a ValueError)
    ├── BudgetRefused            a call was refused; never retry it
    │   ├── BudgetExceeded       a budget of a scope has no room for the call
    │   │   └── LoopLimitExceeded  the per-run/session `calls` limit (agent-loop cutoff)
    │   │       ├── ToolLimitExceeded  a `tool_calls` budget refuses one tool call
    │   │       └── RunLimitExceeded   `repeats` or `seconds`: the run must end
    │   ├── RequestTooLarge      a per-request cap (`request.max_input_tokens`) was exceeded
    │   └── UnpricedModel        `unpriced: deny` and the model has no known price
    └── LedgerError              the ledger failed (wrapped with ``raise ... from exc``)
        └── LedgerUnavailable    the ledger cannot be reached (fail_closed)

Integrations re-raise refusals as framework-specific subclasses where a framework would
otherwise retry them (see ``tb_plugins.integrations.langchain``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

__all__ = [
    "BudgetExceeded",
    "BudgetRefused",
    "ConfigError",
    "LedgerError",
    "LedgerUnavailable",
    "LoopLimitExceeded",
    "RequestTooLarge",
    "RunLimitExceeded",
    "TokenBudgetError",
    "ToolLimitExceeded",
    "UnpricedModel",
]


class TokenBudgetError(Exception):
    """Base class of every tb_plugins error."""


class ConfigError(TokenBudgetError, ValueError):
    """A policy is malformed. The message names the file, the entry and the field."""

    def __init__(self, message: str, *, source: str | None = None, location: str | None = None):
        self.source = source
        self.location = location
        super().__init__(message)


class BudgetRefused(TokenBudgetError):
    """A call was refused before it reached the model. Not retryable."""

    retryable = False

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description, used for HTTP 429 bodies and logs."""
        return {"error": type(self).__name__, "message": str(self)}


def _fmt_amount(unit: str, value: float) -> str:
    if unit == "usd":
        return f"${value:,.4f}"
    n = int(value)
    noun = {"calls": "call", "requests": "request", "tool_calls": "tool call"}.get(
        unit, unit.replace("_", " ")
    )
    if noun in ("call", "request", "tool call") and n != 1:
        noun += "s"
    return f"{n:,} {noun}"


def _resets(ts: float | None) -> str:
    if ts is None:
        return "this budget never resets (window: total)"
    when = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"the window resets at {when}"


class BudgetExceeded(BudgetRefused):
    """A budget has no room left for the call.

    Attributes:
        scope: the concrete scope charged, e.g. ``"user:alice"``.
        budget: the budget's name, e.g. ``"user:* tokens/day"``.
        unit: ``tokens``, ``input_tokens``, ``output_tokens``, ``usd``, ``requests`` or ``calls``.
        spent: settled spend plus live holds in the current window.
        limit: the budget's limit in ``unit``.
        requested: what the call needed at the least.
        resets_at: epoch seconds when the window resets (None for ``total``).
    """

    def __init__(
        self,
        *,
        scope: str,
        budget: str,
        unit: str,
        spent: float,
        limit: float,
        requested: float,
        resets_at: float | None,
        message: str | None = None,
    ):
        self.scope = scope
        self.budget = budget
        self.unit = unit
        self.spent = spent
        self.limit = limit
        self.requested = requested
        self.resets_at = resets_at
        if message is None:
            message = (
                f"budget {budget!r} for scope {scope!r} is exhausted: "
                f"{_fmt_amount(unit, spent)} of {_fmt_amount(unit, limit)} used, "
                f"this call needs {_fmt_amount(unit, requested)}; {_resets(resets_at)}"
            )
        super().__init__(message)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description, used for HTTP 429 bodies and logs."""
        return {
            "error": type(self).__name__,
            "message": str(self),
            "scope": self.scope,
            "budget": self.budget,
            "unit": self.unit,
            "spent": self.spent,
            "limit": self.limit,
            "requested": self.requested,
            "resets_at": self.resets_at,
            "resets_at_iso": None
            if self.resets_at is None
            else datetime.fromtimestamp(self.resets_at, tz=timezone.utc).isoformat(),
        }


class LoopLimitExceeded(BudgetExceeded):
    """A run or session used up its ``calls`` limit: the agent-loop cutoff."""


class ToolLimitExceeded(LoopLimitExceeded):
    """A ``tool_calls`` budget has no room: this tool call is refused before it runs (the run
    may go on, and other tools still run).

    Attributes:
        tool: the tool refused. ``unit`` is ``tool_calls``; ``spent`` the calls already made in
            the budget's window, ``limit`` its limit, ``requested`` 1.
    """

    def __init__(self, *, tool: str, **fields: Any):
        self.tool = tool
        if fields.get("message") is None:
            fields["message"] = (
                f"tool {tool!r} refused: budget {fields['budget']!r} for scope "
                f"{fields['scope']!r} allows {_fmt_amount('tool_calls', fields['limit'])} and "
                f"{_fmt_amount('tool_calls', fields['spent'])} were made; "
                f"{_resets(fields['resets_at'])}. Go on without this tool, or raise "
                f"'tool_calls' in the policy"
            )
        super().__init__(**fields)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description, with the tool."""
        return {**super().to_dict(), "tool": self.tool}


class RunLimitExceeded(LoopLimitExceeded):
    """A run must end: a tool was called ``repeats`` times with the same arguments (the agent
    is looping), or the run is past its ``seconds``. Every later model or tool call of the run
    is refused with the same error.

    Attributes:
        tool: the repeated tool (None for ``seconds``). ``unit`` is ``repeats`` (``spent``: the
            identical calls made before this one, ``limit``: N) or ``seconds`` (``spent``: the
            seconds the run has lasted, ``limit``: its limit).
    """

    def __init__(self, *, tool: str | None = None, **fields: Any):
        self.tool = tool
        if fields.get("message") is None:
            budget, scope, limit = fields["budget"], fields["scope"], fields["limit"]
            if fields["unit"] == "repeats":
                fields["message"] = (
                    f"run {scope!r} ends: tool {tool!r} was called {int(limit):,} times with the "
                    f"same arguments (budget {budget!r}); the agent is looping. Change the "
                    f"prompt or the tool, or raise 'repeats' in the policy"
                )
            else:
                fields["message"] = (
                    f"run {scope!r} ends: it has run {fields['spent']:,.1f} s and budget "
                    f"{budget!r} allows {limit:,g} s. Raise 'seconds' in the policy to let "
                    f"runs last longer"
                )
        super().__init__(**fields)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description, with the tool."""
        return {**super().to_dict(), "tool": self.tool}


class RequestTooLarge(BudgetExceeded):
    """One request exceeds a per-request cap of the policy (``request.max_input_tokens``)."""


class UnpricedModel(BudgetRefused):
    """The model has no known price and the policy says ``unpriced: deny``."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(
            f"model {model!r} has no known price and the policy says 'unpriced: deny'; "
            f"add it under 'prices:' in the policy or set 'unpriced: count_tokens_only'"
        )

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {"error": type(self).__name__, "message": str(self), "model": self.model}


class LedgerError(TokenBudgetError):
    """The ledger failed to read or write."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be reached; with ``on_ledger_error: fail_closed`` calls are denied."""
