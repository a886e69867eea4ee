"""A budget as the guard uses it: a scope pattern, a window, six integer limits kept in the
ledger, and the agent limits kept in memory (``tool_calls``, ``repeats``, ``seconds``).

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
        tool_calls: tool calls allowed per scope and window (of ``tool`` only, if set).
        tool: the one tool ``tool_calls`` counts (None: every tool).
        repeats: a ``run:`` budget: the N-th call of one tool with the same arguments ends
            the run.
        seconds: a ``run:`` budget: wall-clock seconds a run may last.
        shadow: ``mode: shadow``: charged and decided, not enforced (see
            :mod:`tb_plugins.core.ladder`).
        pace: ``pace: even``: the burst share (``burst``, default 0) the allowance starts
            from; None when spend is not paced (see :mod:`tb_plugins.core.pacing`).
        stop_at: ``(priority, fraction)`` pairs: a call of that priority may use that
            fraction of the limit (of the paced allowance if paced).
        wait: ``on_exhausted: wait:<max>``: the seconds a refused call may wait for room
            (see :mod:`tb_plugins.engine.throttle`); None: refuse at once.

    The agent limits are counted in memory by :mod:`tb_plugins.engine.agents`, not in the
    ledger; a budget with only those has no ledger limit (:attr:`in_ledger` is False).
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
    tool_calls: int | None = None
    tool: str | None = None
    repeats: int | None = None
    seconds: float | None = None
    shadow: bool = False
    pace: float | None = None
    stop_at: tuple[tuple[str, float], ...] = ()
    wait: float | None = None

    @property
    def shapes(self) -> bool:
        """True when pacing or ``stop_at`` lowers its limits for some calls."""
        return self.pace is not None or bool(self.stop_at)

    @property
    def in_ledger(self) -> bool:
        """True when it limits a unit the ledger counts (tokens, usd, requests, calls...)."""
        return any(lim is not None for lim in self.limits)

    @property
    def limits_agents(self) -> bool:
        """True when it sets ``tool_calls``, ``repeats`` or ``seconds``."""
        return self.tool_calls is not None or self.repeats is not None or self.seconds is not None

    @property
    def is_pattern(self) -> bool:
        """True when the scope is a pattern such as ``user:*`` (one budget per match)."""
        return any(c in self.pattern for c in "*?[")

    def matches(self, scope: str) -> bool:
        """Whether this budget applies to a concrete scope."""
        if not self.is_pattern:
            return scope == self.pattern
        return fnmatch.fnmatchcase(scope, self.pattern)
