"""Pacing and priorities: the limit a call may use now, below the budget's limit.

Both are transforms of a line's limits made when a call is planned; the ledger keeps counting
against integer limits and knows nothing of them.

* **Pacing** (``pace: even``, ``burst: 0.1``): at ``elapsed`` seconds into a calendar window
  of ``length`` seconds, spend may reach ``limit x min(1, elapsed / length + burst)``.
* **Priorities** (``stop_at: {low: 0.6, normal: 0.9}``): a call of priority ``p`` may use
  ``stop_at[p]`` of that (1.0 for ``critical`` and any priority not listed).

The two multiply, so a paced budget keeps the same share of its allowance for critical calls
all through the window.

Example:
    >>> allowance(1000, 1.0, 0.1, elapsed=0.0, length=100.0)
    100
    >>> allowance(1000, 0.6, 0.1, elapsed=50.0, length=100.0)
    360
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget

__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITIES",
    "Allowance",
    "allowance",
    "check_priority",
    "priority_of",
]

logger = logging.getLogger("tb_plugins")

PRIORITIES = ("low", "normal", "high", "critical")
"""The priorities a call may have (``stop_at`` keys)."""
DEFAULT_PRIORITY = "normal"
"""The priority of a call that names none."""


def priority_of(metadata: Mapping[str, object] | None, where: str = "metadata") -> str:
    """The priority named by ``tb_priority`` in metadata the application (never a remote
    client) sets; ``normal`` if absent; an unknown value is logged and taken as ``normal``.

    Example:
        >>> priority_of({"tb_priority": "low"}), priority_of(None)
        ('low', 'normal')
    """
    value = metadata.get("tb_priority") if isinstance(metadata, Mapping) else None
    if value is None:
        return DEFAULT_PRIORITY
    if value not in PRIORITIES:
        logger.warning(
            "tb_plugins: %s tb_priority=%r is not one of %s; using %r",
            where, value, ", ".join(PRIORITIES), DEFAULT_PRIORITY,
        )  # fmt: skip
        return DEFAULT_PRIORITY
    return str(value)


def check_priority(priority: object) -> str:
    """``priority`` if it is one of :data:`PRIORITIES`.

    Raises:
        ValueError: anything else.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
    return priority


def allowance(
    limit: int, share: float, burst: float | None, *, elapsed: float, length: float
) -> int:
    """What a call may bring spend up to: ``share`` of the paced allowance (of the limit if
    ``burst`` is None: not paced)."""
    if burst is not None and length > 0:
        return math.floor(limit * share * min(1.0, max(0.0, elapsed) / length + burst))
    return math.floor(limit * share)


@dataclass(frozen=True, slots=True)
class Allowance:
    """How a line's effective limits were made, to say when a refused call will fit.

    Attributes:
        start: when the window began (epoch seconds).
        length: the window's length in seconds.
        terms: per budget that shapes the line: ``(limits, share, burst)``; ``burst`` None
            for a budget that is not paced.
    """

    start: float
    length: float
    terms: tuple[tuple[tuple[int | None, ...], float, float | None], ...]

    def admits_at(self, unit: int, target: int) -> float | None:
        """The first whole second at which every term lets spend reach ``target`` on
        ``unit``; None if none does before the window ends."""
        at = self.start
        for limits, share, burst in self.terms:
            limit = limits[unit]
            if limit is None:
                continue
            if limit * share < target:
                return None  # not in this window: only the reset makes room
            if burst is None or self.length <= 0:
                continue
            # Solve limit x share x (elapsed / length + burst) >= target for elapsed.
            need = (target / (limit * share) - burst) * self.length
            t = math.ceil(self.start + max(0.0, need))
            while (
                allowance(limit, share, burst, elapsed=t - self.start, length=self.length) < target
            ):
                t += 1  # a float rounding short of the target
            at = max(at, t)
        return at if at < self.start + self.length else None


def effective(
    limits: tuple[int | None, ...],
    budgets: Sequence[Budget],
    priority: str,
    *,
    now: float,
    start: float,
    length: float,
) -> tuple[tuple[int | None, ...], Allowance | None]:
    """``limits`` (the line's) lowered by the pacing and ``stop_at`` of ``budgets`` for a
    call of ``priority`` at ``now``; the :class:`Allowance` if any limit is shaped."""
    out = list(limits)
    terms = []
    for b in budgets:
        share = dict(b.stop_at).get(priority, 1.0)
        if b.pace is None and share >= 1.0:
            continue
        terms.append((b.limits, share, b.pace))
        for u, lim in enumerate(b.limits):
            current = out[u]
            if lim is None or current is None:
                continue
            eff = allowance(lim, share, b.pace, elapsed=now - start, length=length)
            if eff < current:
                out[u] = eff
    if not terms:
        return limits, None
    return tuple(out), Allowance(start, length, tuple(terms))
