"""Ledger operations written once, as flows, and run by a sync and an async driver.

A backend writes each operation as a generator, a *flow*, that yields the I/O it needs one
*step* at a time and receives each step's result (or its error, thrown back in where the step
was yielded). The checks, the arguments, the decoding of the reply, the error handling and the
retries live in the flow, once. The backend adds two thin executors of one step,
:meth:`FlowLedger._step` (blocking) and :meth:`FlowLedger._astep` (awaited), and this class
gives every public method and its async twin by running the same flow with one or the other:
the pattern of the guard's own decisions (:mod:`tb_plugins.engine.drivers`) and of httpx's
``Auth.auth_flow``.
"""

from __future__ import annotations

import abc
from collections.abc import Generator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.ledger.base import GroupBy, Ledger, Line, LineState, ReserveResult, SettleResult
from tb_plugins.ledger.checks import (
    MAX_AMOUNT,
    check_after,
    check_amounts,
    check_override,
    check_record_amounts,
    check_report,
    check_text,
    check_texts,
)

__all__ = ["Flow", "FlowLedger", "Report", "Reserve", "Settle"]

T = TypeVar("T")
Flow = Generator[Any, Any, T]
"""An operation: yields steps (whatever its backend's executors take), returns the result."""


class Reserve(NamedTuple):
    """The arguments of :meth:`~tb_plugins.ledger.base.Ledger.reserve`."""

    reservation_id: str
    lines: Sequence[Line]
    amounts: Amounts
    now: float
    expires_at: float

    def checked(self, maximum: int) -> Reserve:
        """These arguments, once :func:`~tb_plugins.ledger.checks.check_amounts` and
        :func:`~tb_plugins.ledger.checks.check_texts` found them storable."""
        check_amounts(self.amounts, maximum)
        check_texts(self.reservation_id, self.lines)
        return self


class Settle(NamedTuple):
    """The arguments of :meth:`~tb_plugins.ledger.base.Ledger.settle`."""

    reservation_id: str
    lines: Sequence[Line]
    amounts: Amounts
    record: UsageRecord
    now: float
    watch: Sequence[int] | None

    def checked(self, maximum: int) -> Settle:
        """These arguments, once found storable (amounts, the record's, every name)."""
        check_amounts(self.amounts, maximum)
        check_record_amounts(self.record)
        check_texts(self.reservation_id, self.lines, self.record)
        return self


class Report(NamedTuple):
    """The arguments of :meth:`~tb_plugins.ledger.base.Ledger.usage`."""

    since: float | None
    until: float | None
    group_by: GroupBy
    scope: str | None

    def checked(self) -> Report:
        """These arguments, once :func:`~tb_plugins.ledger.checks.check_report` found them
        valid."""
        check_report(self.group_by, self.scope)
        return self


class FlowLedger(Ledger):
    """A ledger whose operations are flows: each public method checks its arguments (so no
    backend writes anything it cannot store), then it and its ``a``-prefixed twin run the same
    flow, through :meth:`_step` or :meth:`_astep`."""

    max_amount: ClassVar[int] = MAX_AMOUNT
    """The largest amount the backend stores exactly."""

    # -- what a backend provides: two executors of one step, and a flow per operation -----------

    @abc.abstractmethod
    def _step(self, step: Any) -> Any:
        """Do one step's I/O and return its result (blocking)."""

    @abc.abstractmethod
    async def _astep(self, step: Any) -> Any:
        """Do one step's I/O and return its result (awaited)."""

    @abc.abstractmethod
    def _reserve(self, op: Reserve) -> Flow[ReserveResult]:
        """The flow of :meth:`reserve`."""

    @abc.abstractmethod
    def _settle(self, op: Settle) -> Flow[SettleResult]:
        """The flow of :meth:`settle`."""

    @abc.abstractmethod
    def _release(self, reservation_id: str, now: float) -> Flow[bool]:
        """The flow of :meth:`release`."""

    @abc.abstractmethod
    def _status(self, lines: Sequence[Line], now: float) -> Flow[tuple[LineState, ...]]:
        """The flow of :meth:`status`."""

    @abc.abstractmethod
    def _scopes(self) -> Flow[list[tuple[str, str]]]:
        """The flow of :meth:`scopes`."""

    @abc.abstractmethod
    def _claim_alert(self, alert_key: str, expires_at: float | None) -> Flow[bool]:
        """The flow of :meth:`claim_alert`."""

    @abc.abstractmethod
    def _append_usage(self, record: UsageRecord) -> Flow[None]:
        """The flow of :meth:`append_usage`."""

    @abc.abstractmethod
    def _usage(self, report: Report) -> Flow[list[UsageRow]]:
        """The flow of :meth:`usage`."""

    @abc.abstractmethod
    def _records(
        self, since: float | None, until: float | None, limit: int | None
    ) -> Flow[list[UsageRecord]]:
        """The flow of :meth:`records`."""

    @abc.abstractmethod
    def _append_override(self, body: str) -> Flow[int]:
        """The flow of :meth:`append_override`."""

    @abc.abstractmethod
    def _overrides(self, after: int) -> Flow[list[tuple[int, str]]]:
        """The flow of :meth:`overrides`."""

    # -- the two drivers ---------------------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        """Run ``flow`` to its end, each step through :meth:`_step`; a step's error is thrown
        back into the flow, which may handle it (and cleans up if not)."""
        try:
            step = next(flow)
            while True:
                try:
                    result = self._step(step)
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _adrive(self, flow: Flow[T]) -> T:
        """Run ``flow`` to its end, each step through :meth:`_astep` (a cancellation is thrown
        back into the flow too, so that it returns its connection)."""
        try:
            step = next(flow)
            while True:
                try:
                    result = await self._astep(step)
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # -- the public methods: the arguments checked, then the flow run by one driver or the other

    def reserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Hold ``amounts`` on every line if every limit allows it, else change nothing.

        A reservation id that already holds is replaced (its old hold does not count against
        the new check), so a retried reserve never holds twice.
        """
        op = Reserve(reservation_id, lines, amounts, now, expires_at)
        return self._drive(self._reserve(op.checked(self.max_amount)))

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
        op = Reserve(reservation_id, lines, amounts, now, expires_at)
        return await self._adrive(self._reserve(op.checked(self.max_amount)))

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
        """Replace the hold by ``amounts`` on each line and log ``record``; idempotent by id.

        Only the ``watch`` lines (all when None) are read back; the others' states are None.
        """
        op = Settle(reservation_id, lines, amounts, record, now, watch)
        return self._drive(self._settle(op.checked(self.max_amount)))

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
        op = Settle(reservation_id, lines, amounts, record, now, watch)
        return await self._adrive(self._settle(op.checked(self.max_amount)))

    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold; True if a live (unexpired) hold was removed."""
        check_text("reservation id", reservation_id)
        return self._drive(self._release(reservation_id, now))

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release`."""
        check_text("reservation id", reservation_id)
        return await self._adrive(self._release(reservation_id, now))

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line, read in one snapshot (expired holds do not count)."""
        check_texts(lines=lines)
        return self._drive(self._status(lines, now))

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status`."""
        check_texts(lines=lines)
        return await self._adrive(self._status(lines, now))

    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair with spend, sorted."""
        return self._drive(self._scopes())

    async def ascopes(self) -> list[tuple[str, str]]:
        """Async :meth:`scopes`."""
        return await self._adrive(self._scopes())

    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True for the first claim of ``alert_key``; the claim is dropped once long expired."""
        check_text("alert key", alert_key)
        return self._drive(self._claim_alert(alert_key, expires_at))

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert`."""
        check_text("alert key", alert_key)
        return await self._adrive(self._claim_alert(alert_key, expires_at))

    def append_usage(self, record: UsageRecord) -> None:
        """Log a record with no spend (a refused call); it is never taken as a settle."""
        check_record_amounts(record)
        check_texts(record=record)
        self._drive(self._append_usage(record))

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage`."""
        check_record_amounts(record)
        check_texts(record=record)
        await self._adrive(self._append_usage(record))

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals of records with ``since <= ts < until``, grouped by scope, model or UTC day.

        ``requests`` counts settled records and ``denied`` refused ones; tokens and usd sum
        the settled records only.
        """
        return self._drive(self._usage(Report(since, until, group_by, scope).checked()))

    async def ausage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        return await self._adrive(self._usage(Report(since, until, group_by, scope).checked()))

    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """The first ``limit`` records with ``since <= ts < until``, oldest first."""
        return self._drive(self._records(since, until, limit))

    async def arecords(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Async :meth:`records`."""
        return await self._adrive(self._records(since, until, limit))

    def append_override(self, body: str) -> int:
        """Append an override change; returns its version (see
        :meth:`~tb_plugins.ledger.base.Ledger.append_override`)."""
        return self._drive(self._append_override(check_override(body)))

    async def aappend_override(self, body: str) -> int:
        """Async :meth:`append_override`."""
        return await self._adrive(self._append_override(check_override(body)))

    def overrides(self, *, after: int = 0) -> list[tuple[int, str]]:
        """The override changes after version ``after``, oldest first."""
        return self._drive(self._overrides(check_after(after)))

    async def aoverrides(self, *, after: int = 0) -> list[tuple[int, str]]:
        """Async :meth:`overrides`."""
        return await self._adrive(self._overrides(check_after(after)))
