"""The replay's state of each ledger line, kept in memory (:mod:`tb_plugins.engine.replay`):
its spend in the current window, the slot of each window, and the few steps the replay's loop
takes on them (move a rolling window, charge a call, look for a ``downgrade_at``)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tb_plugins.core.policy import Plan
from tb_plugins.core.usage import NANO
from tb_plugins.core.windows import Slot
from tb_plugins.engine.planning import LineTemplate

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget

__all__ = ["LineCounter", "PathLine", "WindowSlot", "charge", "downgrade_due", "fits", "roll"]

_INF = float("inf")


class LineCounter:
    """One line's spend in its current window; a rolling line keeps it per sub-bucket too
    (``[bucket, six units]`` each, oldest first)."""

    __slots__ = ("bucket", "parts", "sums")

    def __init__(self, rolling: bool) -> None:
        self.bucket: int | None = None  # none yet: the first read starts the window
        self.sums = [0, 0, 0, 0, 0, 0]
        self.parts: collections.deque[list[int]] | None = collections.deque() if rolling else None


class WindowSlot:
    """One window of the policy and its slot at the replay's current time."""

    __slots__ = ("follows", "slot")

    def __init__(self, follows: Budget, slot: Slot) -> None:
        self.follows = follows  # a budget of the window, for the planner's slot
        self.slot = slot


@dataclass(frozen=True, slots=True)
class PathLine:
    """One line of a scope path, as the replay's loop reads it."""

    template: LineTemplate
    scope: str
    window: WindowSlot
    counter: LineCounter
    checks: tuple[tuple[int, int], ...]  # (unit, limit) per limited unit
    watch: tuple[tuple[Budget, float, tuple[tuple[int, int], ...]], ...]  # downgrade_at budgets
    owners: tuple[Budget | None, ...]  # per unit, the budget whose limit the line has


def roll(counter: LineCounter, parts: collections.deque[list[int]], slot: Slot) -> None:
    """Move a rolling line's window to ``slot``: drop the sub-buckets it no longer sums, and
    make ``slot``'s bucket the last one."""
    bucket = slot.bucket
    if parts:
        low = bucket - (slot.span - 1) * slot.width
        if parts[-1][0] < low:  # all of it is out of the window
            parts.clear()
            counter.sums = [0, 0, 0, 0, 0, 0]
        else:
            sums = counter.sums
            while parts[0][0] < low:
                _, a, b, c, d, e, f = parts.popleft()
                sums[0] -= a
                sums[1] -= b
                sums[2] -= c
                sums[3] -= d
                sums[4] -= e
                sums[5] -= f
            if parts[-1][0] == bucket:
                return
    parts.append([bucket, 0, 0, 0, 0, 0, 0])


def charge(lines: tuple[PathLine, ...], inp: int, out: int, usd: float) -> None:
    """Add a call's spend to each of its lines (and a rolling line's current sub-bucket)."""
    tokens, nano = inp + out, round(usd * NANO)  # as usd_to_nano
    for lo in lines:
        counter = lo.counter
        s = counter.sums
        s[0] += tokens
        s[1] += inp
        s[2] += out
        s[3] += nano
        s[4] += 1
        s[5] += 1
        if counter.parts is not None:
            p = counter.parts[-1]  # the sub-bucket made current when the line was read
            p[1] += tokens
            p[2] += inp
            p[3] += out
            p[4] += nano
            p[5] += 1
            p[6] += 1


def downgrade_due(lo: PathLine, sums: list[int]) -> tuple[Budget, str] | None:
    """The first budget of a line past its ``downgrade_at`` (utilization as
    :func:`~tb_plugins.core.policy.utilization` computes it, nothing held)."""
    for b, at, units in lo.watch:
        for u, lim in units:
            if (sums[u] / lim if lim else (_INF if sums[u] else 0.0)) >= at:
                return b, lo.scope
    return None


def fits(plan: Plan, lines: tuple[PathLine, ...]) -> bool:
    want = plan.amounts()
    for lo in lines:
        sums = lo.counter.sums
        for u, limit in lo.checks:
            if sums[u] + want[u] > limit:
                return False
    return True
