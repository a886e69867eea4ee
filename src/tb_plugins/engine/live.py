"""The guard's side of runtime overrides: change budgets while guards run, list them, audit them.

Overrides live in the ledger (:meth:`~tb_plugins.ledger.base.Ledger.append_override`), so every
guard sharing it applies a change within ``override_refresh`` seconds (default 5): on its next
check after that, it reads the changes it has not seen (one ledger read) and plans with the new
budgets. The guard that makes a change applies it at once. An override past its ``until``
stops applying at the first check after it expires. See :mod:`tb_plugins.engine.overrides`
for what an override does to a scope's limits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tb_plugins.core.usage import UNITS, nano_to_usd
from tb_plugins.engine.drivers import Flow, adrive, drive
from tb_plugins.engine.overrides import (
    Action,
    Override,
    OverrideLog,
    compile_overrides,
    new_override,
)
from tb_plugins.engine.planning import LinePlanner
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.core.budgets import Budget
    from tb_plugins.engine.clock import LedgerClock
    from tb_plugins.ledger import Ledger

__all__ = ["BudgetEntry", "HistoryEntry", "LiveBudgets"]

logger = logging.getLogger("tb_plugins")


@dataclass(frozen=True)
class BudgetEntry:
    """One budget in force (``guard.budgets()``, ``tb budgets list``).

    Attributes:
        scope: the scope or pattern.
        window: the window spec.
        limit: the limits, readable (``2,000,000 tokens``, ``$5``, ``suspended``).
        source: ``file`` or ``override``.
        until: when an override stops applying (None: never, or a file budget).
        reason: an override's reason.
        actor: who set an override.
        version: an override's place in the ledger's log (0 for a file budget).
    """

    scope: str
    window: str
    limit: str
    source: str
    until: float | None = None
    reason: str | None = None
    actor: str | None = None
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Every field, for JSON output."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class HistoryEntry:
    """One change of the overrides with what it replaced (``tb budgets history``)."""

    change: Override
    before: Override | None

    def to_dict(self) -> dict[str, Any]:
        """The change's fields plus ``before`` (the limit it replaced, or None)."""
        return {
            **self.change.to_dict(),
            "before": None if self.before is None else self.before.limit,
        }


class LiveBudgets:
    """The override methods, as methods of the guard (which provides the attributes below)."""

    policy: Policy
    ledger: Ledger
    planner: LinePlanner
    _time: LedgerClock

    def now(self) -> float:  # pragma: no cover - the guard's
        raise NotImplementedError

    def _init_overrides(self, file_budgets: list[Budget]) -> None:
        self._file_budgets = file_budgets
        self._overrides = OverrideLog()
        self._override_due = -math.inf  # monotonic time of the next read of the log
        self._override_expiry = math.inf  # when an override in force expires
        self.planner = LinePlanner(file_budgets, self.policy.tz)

    # -- on the call path ------------------------------------------------------------------

    def _refresh_due(self) -> bool:
        mono = self._time.mono()
        if mono < self._override_due and (
            self._override_expiry == math.inf or self._time.now() < self._override_expiry
        ):  # the clock is read only while an override in force has an `until`
            return False
        self._override_due = mono + self.policy.override_refresh
        return True

    def _refresh_flow(self) -> Flow[LedgerUnavailable | None]:
        """Read the changes not seen yet and replan if any (or if an override expired)."""
        try:
            rows = yield ("overrides", (), {"after": self._overrides.version})
        except LedgerUnavailable as exc:
            return exc
        except LedgerError as exc:
            logger.warning("tb_plugins: reading budget overrides failed: %s", exc)
            return None
        now = self.now()
        if self._overrides.add(rows) or now >= self._override_expiry:
            self._apply_overrides(now)
        return None

    def _apply_overrides(self, now: float) -> None:
        live = self._overrides.live(now)
        budgets = compile_overrides(self._file_budgets, live)
        # One assignment: a call planning meanwhile sees the old planner or the new one.
        self.planner = LinePlanner(budgets, self.policy.tz)
        self._override_expiry = self._overrides.next_expiry(now)

    def _maybe_refresh(self) -> LedgerUnavailable | None:
        return drive(self.ledger, self._refresh_flow()) if self._refresh_due() else None

    async def _amaybe_refresh(self) -> LedgerUnavailable | None:
        return await adrive(self.ledger, self._refresh_flow()) if self._refresh_due() else None

    # -- changing budgets ------------------------------------------------------------------

    def set_budget(
        self,
        scope: str,
        limit: str | int,
        *,
        window: str | None = None,
        until: float | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Override:
        """Set a budget for ``scope`` (a concrete scope or a pattern) in every guard sharing
        the ledger, until ``until`` (epoch seconds) or until unset.

        Args:
            scope: e.g. ``team:search``, ``key:ci-bot`` or ``user:*``.
            limit: as in the policy file (``3M tokens/day``, ``$5/month``, ``500 requests/hour``),
                or ``0`` to suspend the scope (every call refused; window ``total`` unless
                ``window`` says otherwise).
            window: the window, when ``limit`` does not name one.
            until: when the override stops applying.
            reason: why (kept in the audit trail).
            actor: who (default ``user@host``).

        Returns:
            The change as stored, with its version.

        Raises:
            ConfigError: a bad scope, limit, window, ``until`` or ``reason`` (nothing written).
            LedgerError: the ledger could not store it.

        Example:
            >>> from tb_plugins import BudgetGuard
            >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "budgets": [
            ...     {"scope": "team:*", "limit": "1M tokens/day"}]})
            >>> guard.set_budget("team:search", "3M tokens/day", reason="launch week").version
            1
            >>> [(b.scope, b.limit, b.source) for b in guard.budgets()][1]
            ('team:search', '3,000,000 tokens', 'override')
        """
        flow = self._change_flow("set", scope, limit, window, until, reason, actor)
        return drive(self.ledger, flow)

    async def aset_budget(
        self,
        scope: str,
        limit: str | int,
        *,
        window: str | None = None,
        until: float | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Override:
        """Async :meth:`set_budget`."""
        flow = self._change_flow("set", scope, limit, window, until, reason, actor)
        return await adrive(self.ledger, flow)

    def unset_budget(
        self,
        scope: str,
        *,
        window: str | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Override:
        """Remove the override of ``scope`` in ``window`` (every window when None): the file's
        budgets apply again.

        Raises:
            ConfigError: no override of ``scope`` (in ``window``) is in force.
        """
        flow = self._change_flow("unset", scope, None, window, None, reason, actor)
        return drive(self.ledger, flow)

    async def aunset_budget(
        self,
        scope: str,
        *,
        window: str | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Override:
        """Async :meth:`unset_budget`."""
        flow = self._change_flow("unset", scope, None, window, None, reason, actor)
        return await adrive(self.ledger, flow)

    def _change_flow(
        self,
        action: Action,
        scope: str,
        limit: str | int | None,
        window: str | None,
        until: float | None,
        reason: str | None,
        actor: str | None,
    ) -> Flow[Override]:
        if self._time.due():  # `ts` and `until` on the shared clock
            yield from self._time.sync_flow()
        change = new_override(
            action, scope, limit, window=window, until=until, reason=reason, actor=actor,
            now=self.now(),
        )  # fmt: skip
        down = yield from self._refresh_flow()
        if down is not None:
            raise down
        if change.action == "unset":
            now = self.now()
            if not any(
                o.scope == change.scope and change.window in ("", o.window)
                for o in self._overrides.live(now)
            ):
                where = f" in window {change.window!r}" if change.window else ""
                raise ConfigError(
                    f"no override of {change.scope!r}{where} is in force; "
                    f"`tb budgets list` shows them"
                )
        version = yield ("append_override", (change.to_json(),), {})
        down = yield from self._refresh_flow()
        if down is not None:
            raise down
        self._override_due = self._time.mono() + self.policy.override_refresh
        stored = next((c for c in self._overrides.changes if c.version == version), None)
        return stored or change

    # -- reading ---------------------------------------------------------------------------

    def budgets(self) -> list[BudgetEntry]:
        """Every budget that applies now: the file's, then the overrides (fresh from the
        ledger), each marked with its source."""
        drive(self.ledger, self._read_flow())
        return self._entries()

    async def abudgets(self) -> list[BudgetEntry]:
        """Async :meth:`budgets`."""
        await adrive(self.ledger, self._read_flow())
        return self._entries()

    def budget_history(self, scope: str | None = None) -> list[HistoryEntry]:
        """Every change of the overrides (of ``scope``), oldest first: when, who, the limit
        before and after, and why."""
        drive(self.ledger, self._read_flow())
        return [HistoryEntry(c, b) for c, b in self._overrides.history(scope)]

    async def abudget_history(self, scope: str | None = None) -> list[HistoryEntry]:
        """Async :meth:`budget_history`."""
        await adrive(self.ledger, self._read_flow())
        return [HistoryEntry(c, b) for c, b in self._overrides.history(scope)]

    def _read_flow(self) -> Flow[None]:
        down = yield from self._refresh_flow()
        if down is not None:
            raise down

    def _entries(self) -> list[BudgetEntry]:
        out = [
            BudgetEntry(b.pattern, b.window.spec, limit_text(b.limits), "file")
            for b in self._file_budgets
        ]
        for o in self._overrides.live(self.now()):
            limit = "suspended" if o.suspends else limit_text(_override_limits(self, o))
            out.append(
                BudgetEntry(
                    o.scope, o.window, limit, "override", o.until, o.reason, o.actor, o.version
                )
            )
        return out


def _override_limits(live: LiveBudgets, o: Override) -> Sequence[int | None]:
    for b in live.planner.budgets:
        if b.override and b.pattern == o.scope and b.window.spec == o.window:
            return b.limits
    return (None,) * len(UNITS)


def limit_text(limits: Sequence[int | None]) -> str:
    """Limits, readable: ``2,000,000 tokens + $5``."""
    parts = []
    for unit, lim in zip(UNITS, limits, strict=True):
        if lim is None:
            continue
        parts.append(f"${nano_to_usd(lim):g}" if unit == "usd" else f"{lim:,} {unit}")
    return " + ".join(parts) or "-"
