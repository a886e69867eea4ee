"""What a replay (:mod:`tb_plugins.engine.replay`) finds: per budget and in all, the calls
that would have been allowed, clamped, downgraded and denied, and what that would have saved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BudgetTally", "ReplayReport"]


@dataclass
class BudgetTally:
    """What one budget of the replayed policy would have done.

    ``calls`` counts the replayed calls it applies to; ``clamped``, ``downgraded`` and
    ``denied`` the calls it caused to be so (a call stopped by several budgets is put on the
    one that binds, as the guard's error names it); ``allowed`` the rest. ``tokens_saved`` and
    ``usd_saved`` are what its denials spent and its clamps and downgrades cut (negative
    dollars: the call would have cost more, e.g. a model the log shows downgraded that the
    replayed policy lets run).
    """

    budget: str
    scope: str
    window: str
    calls: int = 0
    clamped: int = 0
    downgraded: int = 0
    denied: int = 0
    tokens_saved: int = 0
    usd_saved: float = 0.0

    @property
    def allowed(self) -> int:
        """Calls it let through as asked."""
        return self.calls - self.clamped - self.downgraded - self.denied

    def count(self, action: str, tokens: int, usd: float) -> None:
        """One call it caused to be clamped, downgraded or denied, saving so much."""
        if action == "clamp":
            self.clamped += 1
        elif action == "downgrade":
            self.downgraded += 1
        else:
            self.denied += 1
        self.tokens_saved += tokens
        self.usd_saved += usd

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``allowed`` too."""
        return {
            "budget": self.budget,
            "scope": self.scope,
            "window": self.window,
            "calls": self.calls,
            "allowed": self.allowed,
            "clamped": self.clamped,
            "downgraded": self.downgraded,
            "denied": self.denied,
            "tokens_saved": self.tokens_saved,
            "usd_saved": round(self.usd_saved, 9),
        }


@dataclass
class ReplayReport:
    """The outcome of a replay (see :meth:`to_dict` for its JSON)."""

    records: int
    replayed: int
    not_replayed: int
    since: float | None
    until: float | None
    totals: BudgetTally
    budgets: list[BudgetTally]
    recorded: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``records`` read, ``replayed`` (calls that ran), ``not_replayed`` (refusals in the
        log), the first and last ``ts`` replayed (``since``, ``until``), ``totals`` over every
        call, ``budgets`` (one entry per budget, and per request cap or unpriced rule, that
        applied), and ``recorded``: the decisions in the log (``allow`` ... ``deny``) and its
        shadow verdicts (``would_allow`` ... ``would_deny``)."""
        return {
            "records": self.records,
            "replayed": self.replayed,
            "not_replayed": self.not_replayed,
            "since": self.since,
            "until": self.until,
            "totals": self.totals.to_dict(),
            "budgets": [b.to_dict() for b in self.budgets],
            "recorded": dict(self.recorded),
        }
