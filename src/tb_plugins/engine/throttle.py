"""``on_exhausted: wait:<max>``: a refused call waits for its window to make room.

A budget with ``on_exhausted: wait:30s`` on a short window (``minute``, ``hour``, ``rolling:…``
or a paced budget) does not refuse a call at once: the call waits until the refusal's
``resets_at`` (when the window, or the paced allowance, admits it), bounded by what is left of
``max``, and is decided again; it loops so until the call fits or ``max`` has passed, then the
refusal says how long it waited. :meth:`BudgetGuard.check <tb_plugins.BudgetGuard.check>`
sleeps; :meth:`~tb_plugins.BudgetGuard.acheck` awaits :func:`asyncio.sleep`, so the event loop
serves other tasks meanwhile. Nothing is held while a call waits.

A call that could never fit (it needs more than the whole limit) is refused at once, and so is
every other refusal (a request cap, an agent limit, a budget without ``wait``).

Example:
    >>> from tb_plugins import BudgetGuard
    >>> t = [0.0]
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "budgets": [
    ...     {"limit": "100 tokens/rolling:1m", "scope": "global", "on_exhausted": "wait:2m"}]},
    ...     clock=lambda: t[0])
    >>> guard.sleep = lambda s: t.__setitem__(0, t[0] + s)  # a test clock: no real waiting
    >>> for _ in range(3):
    ...     d = guard.check("gpt-4o", input_tokens=50, max_tokens=10, adjust=False)
    ...     _ = guard.settle(d)
    >>> t[0] >= 60
    True
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tb_plugins.errors import BudgetExceeded, LoopLimitExceeded

if TYPE_CHECKING:
    from tb_plugins.core.request import Request
    from tb_plugins.engine.decision import Decision
    from tb_plugins.engine.planning import LinePlanner

__all__ = ["Throttle"]

logger = logging.getLogger("tb_plugins")

_MIN_STEP = 0.05  # seconds: a retry never comes sooner, so a stale resets_at cannot spin
_WAITING = (BudgetExceeded, LoopLimitExceeded)  # not tool or run limits: time does not help


class Throttle:
    """The waiting half of :class:`~tb_plugins.BudgetGuard` (a mixin).

    Attributes:
        sleep: what a sync check waits with (default :func:`time.sleep`); inject one in tests.
        asleep: what an async check awaits (default :func:`asyncio.sleep`).
    """

    sleep: Callable[[float], None] | None = None
    asleep: Callable[[float], Awaitable[None]] | None = None

    if TYPE_CHECKING:
        planner: LinePlanner

        def now(self) -> float: ...

    def _throttled(self, check: Callable[[Request], Decision], request: Request) -> Decision:
        waited = 0.0
        while True:
            try:
                return check(request)
            except _WAITING as exc:
                delay = self._delay(exc, waited)
                if delay is None:
                    raise
                budget = exc.budget
            logger.debug("tb_plugins: waiting %.3f s for budget %r", delay, budget)
            (self.sleep or time.sleep)(delay)
            waited += delay

    async def _athrottled(
        self, check: Callable[[Request], Awaitable[Decision]], request: Request
    ) -> Decision:
        waited = 0.0
        while True:
            try:
                return await check(request)
            except _WAITING as exc:
                delay = self._delay(exc, waited)
                if delay is None:
                    raise
                budget = exc.budget
            logger.debug("tb_plugins: waiting %.3f s for budget %r", delay, budget)
            await (self.asleep or asyncio.sleep)(delay)
            waited += delay

    def _delay(self, exc: BudgetExceeded, waited: float) -> float | None:
        """How long to wait before deciding again; None: raise ``exc`` (said waited, if so)."""
        if type(exc) not in _WAITING or exc.requested > exc.limit:
            return None
        most = self._wait_limits().get(exc.budget)
        if most is None:
            return None
        left = most - waited
        if left <= 1e-9:
            exc.args = (f"{str(exc).rstrip('.')}; refused after waiting {waited:.3g} s",)
            return None
        until = left if exc.resets_at is None else exc.resets_at - self.now()
        return min(left, max(_MIN_STEP, until))

    def _wait_limits(self) -> dict[str, float]:
        """Budget name -> ``wait`` seconds, of the budgets in force that wait (read on a
        refusal only, so overrides count as soon as the planner has them)."""
        waits: dict[str, float] = {}
        for b in self.planner.budgets:
            if b.wait is not None:
                waits[b.name] = max(b.wait, waits.get(b.name, 0.0))
        return waits
