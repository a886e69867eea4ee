"""Calls an integration admitted and has not finished yet, by a key of its choosing (a LangChain
run id, a LiteLLM call id, a proxy request's token), and the one way to finish them.

Every integration keeps its holds here, so the rules are written once: a key holds one call;
finishing *takes* the call out before it settles or releases it, so a hook that fires twice
(or two hooks racing) cannot charge a call twice; and accounting failures are logged, never
raised into the host application.

Example:
    >>> from tb_plugins import BudgetGuard, Usage
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://"})
    >>> held = HeldCalls[str]()
    >>> held.hold("call-1", guard.check("gpt-4o", input_tokens=10, max_tokens=5))
    >>> len(held), finish(guard, held.take("call-1"), Usage(10, 5)), len(held)
    (1, True, 0)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from tb_plugins.core.usage import Usage
from tb_plugins.engine.decision import Decision

if TYPE_CHECKING:
    from tb_plugins.engine.guard import BudgetGuard

__all__ = ["Cost", "HeldCalls", "afinish", "finish"]

logger = logging.getLogger("tb_plugins")
K = TypeVar("K", bound=Hashable)

Cost = Usage | None | Literal[False]
"""How a call ends: its usage, ``None`` to charge its estimate, or ``False`` to release it."""


class HeldCalls(Generic[K]):
    """Decisions of calls in flight, by key. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[K, Decision] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    def hold(self, key: K, decision: Decision) -> Decision | None:
        """Keep ``decision`` under ``key``; returns the call it displaced (the caller must
        release it: a key reused while its call is in flight would orphan that hold)."""
        with self._lock:
            displaced = self._calls.get(key)
            self._calls[key] = decision
        return displaced

    def take(self, key: K) -> Decision | None:
        """Remove and return the call under ``key`` (None if there is none): only the taker
        may finish it."""
        with self._lock:
            return self._calls.pop(key, None)


def finish(guard: BudgetGuard, decision: Decision | None, cost: Cost) -> bool:
    """Settle ``decision`` (with usage, or its estimate for None) or release it (False).
    Never raises: a failure is logged. Returns whether there was a call to finish."""
    if decision is None:
        return False
    try:
        if cost is False:
            guard.release(decision)
        else:
            guard.settle(decision, cost)
    except Exception:  # accounting must never break the host app
        logger.exception("tb_plugins: closing reservation %s failed", decision.reservation_id)
    return True


async def afinish(guard: BudgetGuard, decision: Decision | None, cost: Cost) -> bool:
    """Async :func:`finish`."""
    if decision is None:
        return False
    try:
        if cost is False:
            await guard.arelease(decision)
        else:
            await guard.asettle(decision, cost)
    except Exception:  # accounting must never break the host app
        logger.exception("tb_plugins: closing reservation %s failed", decision.reservation_id)
    return True
