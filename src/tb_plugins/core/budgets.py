"""A budget as the guard uses it: a scope pattern, a window and six integer limits.

The policy file (:mod:`tb_plugins.config`) compiles each ``budgets:`` entry into one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from tb_plugins.core.usage import Limits
from tb_plugins.core.windows import Window

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """A budget ready for the guard: a scope pattern, a window, integer limits.

    Attributes:
        index: its position in the policy's ``budgets:``.
        name: how messages and alerts name it (``team:search 2,000,000 tokens/day``).
        pattern: the scope, or a pattern such as ``user:*``.
        window: the window it limits spend over.
        limits: six limits in :data:`~tb_plugins.core.usage.UNITS` order (usd in nano-dollars).
        alerts: thresholds that fire an alert, as fractions.
        downgrade_at: the fraction past which calls are downgraded.
        forecast_alert: with ``alerts``, also alert when the burn rate runs the budget out
            before it resets (``forecast_alert: false`` in the policy turns it off).
        override: True for a runtime override (``tb budgets set``): for the units it limits
            it replaces the file's budgets of its window (see
            :mod:`tb_plugins.engine.overrides`).
    """

    index: int
    name: str
    pattern: str
    window: Window
    limits: Limits
    alerts: tuple[float, ...]
    downgrade_at: float | None
    override: bool = False
    forecast_alert: bool = True

    @property
    def is_pattern(self) -> bool:
        """True when the scope is a pattern such as ``user:*`` (one budget per match)."""
        return any(c in self.pattern for c in "*?[")

    def matches(self, scope: str) -> bool:
        """Whether this budget applies to a concrete scope."""
        if not self.is_pattern:
            return scope == self.pattern
        return fnmatch.fnmatchcase(scope, self.pattern)
