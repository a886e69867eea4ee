"""The exceptions tb_plugins raises.

Every error derives from :class:`TokenBudgetError`::

    TokenBudgetError
    ├── ConfigError              a policy file or dict is malformed (also a ValueError)
    ├── BudgetRefused            a call was refused; never retry it
    │   ├── BudgetExceeded       a budget of a scope has no room for the call
    │   │   └── LoopLimitExceeded  the per-run/session `calls` limit (agent-loop cutoff)
    │   ├── RequestTooLarge      a per-request cap (`request.max_input_tokens`) was exceeded
    │   └── UnpricedModel        `unpriced: deny` and the model has no known price
    └── LedgerError              the ledger failed (wrapped with ``raise ... from exc``)
        └── LedgerUnavailable    the ledger cannot be reached (fail_closed)

Integrations re-raise refusals as framework-specific subclasses where a framework would
otherwise retry them (see ``tb_plugins.integrations.langchain``).
"""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = [
    "BudgetExceeded",
    "BudgetRefused",
    "ConfigError",
    "LedgerError",
    "LedgerUnavailable",
    "LoopLimitExceeded",
    "RequestTooLarge",
    "TokenBudgetError",
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
    noun = {"calls": "call", "requests": "request"}.get(unit, unit.replace("_", " "))
    if noun in ("call", "request") and n != 1:
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
