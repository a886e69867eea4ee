"""The ledger contract every backend implements.

A ledger stores, per *line* (one scope in one window), the settled spend in each bucket and
the live *holds* of reservations. The guard decides; the ledger only does three atomic things:

* :meth:`Ledger.reserve` — for every line of a call, check that settled spend + live holds +
  the new amounts stay within each limited unit, and if *all* do, hold the amounts on every line
  under one reservation id. All or nothing, in one transaction / script.
* :meth:`Ledger.settle` — replace the hold by the actual amounts (which may exceed the
  estimate), append a usage record; idempotent by reservation id, and it still records the spend
  when the hold has already expired.
* :meth:`Ledger.release` — drop the hold (error, cancellation).

Holds carry an absolute expiry; a hold whose owner died stops counting once ``now`` passes it,
and is purged. Which holds a line counts depends on its window (see :attr:`Line.rolling`): on a
line that sums one bucket (a calendar window, ``total``) only the holds made in that bucket
(a hold made in last period's bucket does not count against the new period); on a rolling line
every live hold, whatever bucket it was made in, because a hold is spend not yet charged, and a
call may run longer than the window (its spend is charged in the bucket of its settle). Only
settled spend is windowed by buckets.

Time is always passed in (``now``), never read by the ledger, so tests inject a clock and shared
ledgers can follow the server's clock through :meth:`Ledger.server_time`.

Amount vectors are six integers (see :mod:`tb_plugins.core.usage`). Storage keys come from
:func:`line_key`, which escapes scope names so no scope can reach another's keys.

**Hostile input** (the checks are in :mod:`tb_plugins.ledger.checks`). A ledger checks what
it is given before it writes anything, so that bad input is a plain
:class:`~tb_plugins.errors.LedgerError` (the guard never admits a call on it) and never a
:class:`~tb_plugins.errors.LedgerUnavailable` (which ``fail_open`` would admit unchecked):
:func:`~tb_plugins.ledger.checks.check_amounts` refuses an amount that is not a
whole number from 0 to the backend's maximum (64-bit storage: ``2**63 - 1``), and
:func:`~tb_plugins.ledger.checks.check_texts` a name that is not valid Unicode text (a lone
surrogate such as ``"\\ud800"`` cannot be stored as UTF-8). Any other text is stored and
reported exactly, NUL and other control characters included. Only a real connection failure
(refused, reset, timed out, locked, missing file) is ``LedgerUnavailable``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, ParamSpec, TypeVar

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult, line_key
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.errors import LedgerError
from tb_plugins.ledger.checks import (
    MAX_AMOUNT,
    MAX_OVERRIDE_BODY,
)

__all__ = [
    "MAX_AMOUNT",
    "MAX_OVERRIDE_BODY",
    "GroupBy",
    "Ledger",
    "LineState",
    "ReserveResult",
    "SettleResult",
    "Line",
    "line_key",
]

GroupBy = Literal["scope", "model", "day"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


async def _to_thread(fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    import asyncio  # not at import time: `import tb_plugins` stays light

    return await asyncio.to_thread(fn, *args, **kwargs)


class Ledger(abc.ABC):
    """Durable spend per (scope, window), shared by every guard that opens the same URL.

    Subclasses declare ``schemes`` and implement the sync methods; the async twins (``a``
    prefix) default to running the sync method in a worker thread. The backends of this
    package derive from :class:`~tb_plugins.ledger.flow.FlowLedger` instead, which writes each
    operation once and runs it blocking or with native async I/O.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    url: str = ""

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> Ledger:
        """Open the ledger a URL names.

        Every backend accepts ``timeout`` (seconds): the most any single operation may wait
        for the store (lock, connection or reply) before raising ``LedgerUnavailable``. The
        guard passes ``timeout=policy.ledger_timeout``.
        """

    # -- the atomic operations ---------------------------------------------------------------

    @abc.abstractmethod
    def reserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Hold ``amounts`` on every line if every limit of every line allows it; else nothing.

        Holds that expired at or before ``now`` do not count (a backend drops them when it
        likes); on a rolling line every other hold counts, whatever bucket it was made in (see
        :class:`Line`). A limit allows the call when ``spent + held + amount <= limit`` for
        that unit.
        """

    @abc.abstractmethod
    def settle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Drop the hold (if still there), add ``amounts`` to each line's bucket, append
        ``record`` to the usage log. A second settle of the same id changes nothing.

        ``watch`` lists the indexes of the lines whose states the caller reads afterwards
        (for alerts); ``None`` means every line. Other lines' states may come back ``None``.
        """

    @abc.abstractmethod
    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold. Returns True if a live hold was removed."""

    @abc.abstractmethod
    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line (expired holds do not count; on a rolling line every live
        hold counts, whatever bucket it was made in)."""

    # -- bookkeeping -----------------------------------------------------------------------

    @abc.abstractmethod
    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair that has a counter, for listing pattern budgets."""

    @abc.abstractmethod
    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True exactly once per ``alert_key`` across every process (until ``expires_at``)."""

    @abc.abstractmethod
    def append_usage(self, record: UsageRecord) -> None:
        """Append a record with no spend to the usage log (refused calls)."""

    @abc.abstractmethod
    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals of the usage log grouped by scope (a record counts under each of its
        scopes), model or UTC day, optionally only records that carry ``scope``."""

    @abc.abstractmethod
    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Usage records in time order."""

    # -- runtime overrides: an append-only log of policy changes ---------------------------

    def append_override(self, body: str) -> int:
        """Append one change of the runtime budget overrides (``body``: the engine's JSON, at
        most :data:`MAX_OVERRIDE_BODY` characters) and return its version: 1 for the first,
        then one more than the last, in the order every reader sees them."""
        raise LedgerError(f"the {type(self).__name__} does not store budget overrides")

    def overrides(self, *, after: int = 0) -> list[tuple[int, str]]:
        """The override changes with a version above ``after``, oldest first, as
        ``(version, body)``. The log is the audit trail: it is never rewritten."""
        return []

    def server_time(self) -> float | None:
        """The shared clock of a networked ledger (epoch seconds), or None to use the local
        clock. Guards that share a ledger follow it so they agree on window boundaries."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- async twins ---------------------------------------------------------------------------

    async def areserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Async :meth:`reserve`."""
        return await _to_thread(
            self.reserve, reservation_id, lines, amounts, now=now, expires_at=expires_at
        )

    async def asettle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Async :meth:`settle`."""
        return await _to_thread(
            self.settle, reservation_id, lines, amounts, record, now=now, watch=watch
        )

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release`."""
        return await _to_thread(self.release, reservation_id, now=now)

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status`."""
        return await _to_thread(self.status, lines, now=now)

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert`."""
        return await _to_thread(self.claim_alert, alert_key, expires_at=expires_at)

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage`."""
        await _to_thread(self.append_usage, record)

    async def ascopes(self) -> list[tuple[str, str]]:
        """Async :meth:`scopes`."""
        return await _to_thread(self.scopes)

    async def ausage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        return await _to_thread(
            self.usage, since=since, until=until, group_by=group_by, scope=scope
        )

    async def arecords(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Async :meth:`records`."""
        return await _to_thread(self.records, since=since, until=until, limit=limit)

    async def aappend_override(self, body: str) -> int:
        """Async :meth:`append_override`."""
        return await _to_thread(self.append_override, body)

    async def aoverrides(self, *, after: int = 0) -> list[tuple[int, str]]:
        """Async :meth:`overrides`."""
        return await _to_thread(self.overrides, after=after)

    async def aserver_time(self) -> float | None:
        """Async :meth:`server_time`."""
        return self.server_time()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
