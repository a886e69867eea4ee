"""The BudgetGuard: one per process, shared by every integration.

``check`` estimates a call, walks the decision ladder against the ledger and returns a
:class:`~tb_plugins.engine.decision.Decision` holding a reservation (or raises
:class:`~tb_plugins.errors.BudgetRefused`); ``settle`` charges what the call really used;
``release`` returns the hold. Every public method has an async twin (``acheck``, ``asettle``,
``arelease``, ``astatus``, ``ausage``, ``aflush``) running the very same flow
(:mod:`tb_plugins.engine.flows`); only the driver differs (:mod:`tb_plugins.engine.drivers`).

Example:
    >>> from tb_plugins import BudgetGuard, Usage
    >>> guard = BudgetGuard.from_dict({
    ...     "ledger": "memory://",
    ...     "budgets": [{"scope": "team:search", "tokens": 10_000, "window": "day"}],
    ... })
    >>> d = guard.check(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
    ...                 max_tokens=100, scopes=["team:search"])
    >>> d.action
    'allow'
    >>> guard.settle(d, Usage(input_tokens=8, output_tokens=20)).tokens
    28
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tb_plugins.core.pacing import check_priority
from tb_plugins.core.pricing import PriceTable
from tb_plugins.core.request import Request
from tb_plugins.core.scopes import KNOWN_KINDS
from tb_plugins.core.usage import Usage, UsageRecord, UsageRow
from tb_plugins.core.windows import Clock, system_clock
from tb_plugins.engine.agents import AgentChecks
from tb_plugins.engine.alerts import AlertSink, LogSink, SlackSink, WebhookSink
from tb_plugins.engine.clock import LedgerClock
from tb_plugins.engine.decision import (
    BudgetStatus,
    Charge,
    Decision,
    forecast_queries,
    statuses,
    with_forecasts,
)
from tb_plugins.engine.drivers import adrive, drive
from tb_plugins.engine.estimate import Estimator
from tb_plugins.engine.flows import Flows
from tb_plugins.engine.live import LiveBudgets
from tb_plugins.engine.throttle import Throttle
from tb_plugins.engine.writeback import WriteBack
from tb_plugins.errors import LedgerUnavailable
from tb_plugins.ledger import Ledger
from tb_plugins.ledger.base import GroupBy
from tb_plugins.ledger.deferred import open_ledger

if TYPE_CHECKING:  # pydantic loads with the first policy, not with `import tb_plugins`
    from tb_plugins.config import Policy
    from tb_plugins.counting import Tokenizer

__all__ = ["BudgetGuard", "ReportBy"]

ReportBy = Literal[
    "scope", "model", "day",
    "org", "team", "user", "key", "end_user", "feature", "chain", "agent", "run", "session",
]  # fmt: skip
"""How :meth:`BudgetGuard.usage` groups: by scope, model or day, or by the scopes of a kind."""

logger = logging.getLogger("tb_plugins")

_SINK_FLUSH_SECONDS = 2.0  # what close() waits, in all, for alert sinks to send their queues


class BudgetGuard(Flows, LiveBudgets, AgentChecks, Throttle):
    """Token budgets for every LLM call of a process, backed by a shared ledger.

    Args:
        policy: the validated policy (see :func:`tb_plugins.config.load_policy`).
        ledger: a ledger, or None to open ``policy.ledger``.
        clock: epoch seconds now; inject one in tests.
        monotonic: a clock that never steps back, for the time elapsed since the guard last
            read a shared ledger's clock (default ``time.monotonic``, or ``clock`` when a
            ``clock`` is injected).
        tokenizer: counts input tokens (default: tiktoken offline, approximations elsewhere;
            loaded on the first call that needs a count).
        prices: a price table (default: LiteLLM's bundled map) under the policy's overrides.
        alert_sinks: callables receiving :class:`~tb_plugins.engine.alerts.Alert`, besides
            the policy's ``alerts:`` sinks.

    Example:
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "budgets": [
        ...     {"scope": "user:*", "limit": "100k tokens/day"}]})
        >>> guard.check(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        ...             scopes=["user:alice"]).scopes
        ('global', 'user:alice')
    """

    def __init__(
        self,
        policy: Policy,
        ledger: Ledger | None = None,
        *,
        clock: Clock | None = None,
        monotonic: Clock | None = None,
        tokenizer: Tokenizer | None = None,
        prices: PriceTable | None = None,
        alert_sinks: Iterable[AlertSink] = (),
    ) -> None:
        self.policy = policy
        if ledger is None:
            closed = policy.on_ledger_error == "fail_closed"
            ledger = open_ledger(policy.ledger, policy.ledger_timeout, fail_closed=closed)
        self.ledger = ledger
        self.clock: Clock = clock or system_clock
        self._time = LedgerClock(self.clock, monotonic or clock)  # a test clock moves both
        self._issuer = os.urandom(8).hex()  # marks this guard's decisions
        self.estimator = Estimator(policy, tokenizer, prices)
        self.pricing = self.estimator.pricing
        budgets = policy.compiled_budgets()  # agent limits are counted in memory, not the ledger
        self._init_overrides([b for b in budgets if b.in_ledger])
        self._init_agents(budgets)
        self._sinks: list[AlertSink] = []
        for spec in policy.alerts:
            if spec.log is not None:
                self._sinks.append(LogSink(spec.log))
            elif spec.url is not None:
                options: dict[str, Any] = {}
                if spec.timeout is not None:
                    options["timeout"] = spec.timeout
                if spec.retries is not None:
                    options["retries"] = spec.retries
                sink = SlackSink if spec.slack is not None else WebhookSink
                self._sinks.append(sink(spec.url, **options))
        self._sinks.extend(alert_sinks)
        self.writeback = WriteBack()
        # Line keys last seen past a downgrade_at fraction (only those: the set stays small).
        self._hints: set[str] = set()
        self._exhausted: set[str] = set()  # exhausted-alert keys claimed from this process
        self._forecast_due: dict[str, float] = {}  # line key -> next forecast-alert check
        self.listeners: list[Callable[[str, Mapping[str, Any]], None]] = []
        from tb_plugins.engine.tracing import install_tracing  # OpenTelemetry, when installed

        install_tracing(self)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, path: str | Path, **kwargs: Any) -> BudgetGuard:
        """Build a guard from a YAML policy file (see :mod:`tb_plugins.config`)."""
        from tb_plugins.config import load_policy

        return cls(load_policy(path), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **kwargs: Any) -> BudgetGuard:
        """Build a guard from a policy dict with the file's structure."""
        from tb_plugins.config import load_policy_dict

        return cls(load_policy_dict(data), **kwargs)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that counts input tokens."""
        return self.estimator.tokenizer

    def add_alert_sink(self, sink: AlertSink) -> None:
        """Send future alerts to ``sink`` too."""
        self._sinks.append(sink)

    def close(self) -> None:
        """Write pending spend if the ledger is back, then close it.

        Alert sinks with a ``flush(timeout)`` (webhook, Slack) get a couple of seconds in all to
        send what they hold; what is still queued after that is left to their daemon threads.
        """
        try:
            self.flush()
            self.ledger.close()
        finally:
            self._flush_sinks(_SINK_FLUSH_SECONDS)

    async def aclose(self) -> None:
        """Async :meth:`close` (the alert sinks are flushed in a worker thread)."""
        import asyncio

        try:
            await self.aflush()
            await self.ledger.aclose()
        finally:
            await asyncio.to_thread(self._flush_sinks, _SINK_FLUSH_SECONDS)

    def _flush_sinks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sink in self._sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                try:
                    flush(max(0.0, deadline - time.monotonic()))
                except Exception:
                    logger.exception("tb_plugins: flushing alert sink %r failed", sink)

    # -- check -----------------------------------------------------------------------------

    def check(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        max_tokens: int | None = None,
        scopes: Iterable[str] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | Sequence[str] | None = None,
        input_tokens: int | None = None,
        reservation_id: str | None = None,
        adjust: bool = True,
        priority: str = "normal",
    ) -> Decision:
        """Decide one call and hold its estimate on every budget of its scope path.

        Args:
            model: the model the caller asks for.
            messages: OpenAI-style chat messages (dicts with role and content).
            max_tokens: the request's output cap, if any (a whole number, at most
                :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`).
            scopes: who is charged besides ``global``, e.g. ``["team:search", "user:alice"]``.
            tools: tool definitions sent with the request (they cost input tokens).
            prompt: plain text input instead of messages (completions, embeddings).
            input_tokens: a known input count; skips counting (no tokenizer is loaded).
            reservation_id: an id to use (e.g. the framework's call id); default a new
                time-ordered UUID (version 7, as 32 hex digits).
            adjust: False when the caller cannot change the request (a callback that only
                observes): the answer is then ``allow`` or a refusal, never clamp/downgrade.
            priority: ``low``, ``normal``, ``high`` or ``critical``, for budgets with
                ``stop_at`` fractions; pass it from your own code, never from a client's input.

        Returns:
            The decision: apply ``decision.model`` and ``decision.max_tokens`` to the call.

        Raises:
            BudgetExceeded: a budget has no room (``LoopLimitExceeded`` for ``calls``; its
                subclass ``RunLimitExceeded`` for a run past ``seconds`` or ended by ``repeats``).
            RequestTooLarge: the request passes a per-request cap.
            UnpricedModel: no price is known and the policy says ``unpriced: deny``.
            LedgerUnavailable: the ledger is down and the policy says ``fail_closed``.
            LedgerError: the ledger refused the reservation (never admitted, either mode).
            TypeError, ValueError: a bad model name, scope, ``max_tokens`` or
                ``input_tokens``.
        """
        request = Request(
            model, messages, max_tokens, tuple(scopes), tools, prompt, input_tokens,
            reservation_id, adjust, priority,
        )  # fmt: skip
        return self.check_request(request)

    async def acheck(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        max_tokens: int | None = None,
        scopes: Iterable[str] = (),
        tools: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | Sequence[str] | None = None,
        input_tokens: int | None = None,
        reservation_id: str | None = None,
        adjust: bool = True,
        priority: str = "normal",
    ) -> Decision:
        """Async :meth:`check`: the same decision, awaiting the ledger.

        A long prompt not counted before is encoded in a worker thread first (see
        :meth:`TokenCounter.aprepare <tb_plugins.counting.TokenCounter.aprepare>`), so
        counting does not hold up the event loop.
        """
        request = Request(
            model, messages, max_tokens, tuple(scopes), tools, prompt, input_tokens,
            reservation_id, adjust, priority,
        )  # fmt: skip
        return await self.acheck_request(request)

    def check_request(self, request: Request) -> Decision:
        """:meth:`check` for a :class:`~tb_plugins.core.request.Request` an integration built
        (a budget with ``on_exhausted: wait:<max>`` waits: :mod:`tb_plugins.engine.throttle`)."""
        return self._throttled(self._check_once, request)

    def _check_once(self, request: Request) -> Decision:
        self._precheck(request)
        down = self._sync_clock() or self._maybe_flush() or self._maybe_refresh()
        return drive(self.ledger, self._check_flow(request, down))

    async def acheck_request(self, request: Request) -> Decision:
        """Async :meth:`check_request` (waiting with :func:`asyncio.sleep`)."""
        return await self._athrottled(self._acheck_once, request)

    async def _acheck_once(self, request: Request) -> Decision:
        self._precheck(request)
        down = (
            await self._async_sync_clock()
            or await self._amaybe_flush()
            or await self._amaybe_refresh()
        )
        if request.messages is not None and request.input_tokens is None:
            prepare = getattr(self.tokenizer, "aprepare", None)
            if prepare is not None:
                await prepare(request.model, request.messages, request.tools)
        return await adrive(self.ledger, self._check_flow(request, down))

    def _precheck(self, request: Request) -> None:
        """Before any ledger I/O: a run that must end, a priority that does not exist."""
        self.check_run(request.scopes)
        if request.priority != "normal":
            check_priority(request.priority)

    # -- settle and release ----------------------------------------------------------------

    def settle(self, decision: Decision, usage: Usage | None = None) -> Charge:
        """Charge what the call really used (``usage=None``: charge the estimate, e.g. for a
        stream that ended without reporting usage). Idempotent per decision; never raises for
        ledger trouble: spend the ledger could not take is kept and written when it is back,
        and spend it refused (a value out of its range) is logged and kept in
        :attr:`rejected`.

        The call is charged to the windows it was admitted in and dated in the usage log at
        its admission (``decision.created_at``), so a call reserved at 23:59:59 and settled at
        00:00:01 is in the day before, in both the budget and the report. Rolling windows are
        the exception: their spend counts from the settle, so a call that lasted longer than
        the window is still counted in it.

        Raises:
            ValueError: ``decision`` was not made by this guard.
        """
        return drive(self.ledger, self._settle_flow(decision, usage))

    async def asettle(self, decision: Decision, usage: Usage | None = None) -> Charge:
        """Async :meth:`settle`."""
        return await adrive(self.ledger, self._settle_flow(decision, usage))

    def release(self, decision: Decision) -> None:
        """Return the hold of a call that failed or was cancelled before using anything.
        Never raises for ledger trouble: a hold the ledger could not drop expires by itself
        after its TTL.

        Raises:
            ValueError: ``decision`` was not made by this guard.
        """
        drive(self.ledger, self._release_flow(decision))

    async def arelease(self, decision: Decision) -> None:
        """Async :meth:`release`."""
        await adrive(self.ledger, self._release_flow(decision))

    # -- reading ---------------------------------------------------------------------------

    def status(self, scope: str | None = None) -> list[BudgetStatus]:
        """Every limit of every budget on ``scope`` (or on every scope the ledger knows), with
        its forecast: when it runs out at the burn rate of the last hour
        (:data:`~tb_plugins.engine.decision.FORECAST_TRAILING_SECONDS`), read from the usage
        log with one query per scope."""
        self._maybe_refresh()
        now = self.now()
        known = () if scope is not None else [s for s, _w in self.ledger.scopes()]
        plans = self.planner.status_lines(scope, known, now)
        states = self.ledger.status([lp.line for lp in plans], now=now) if plans else ()
        out = statuses(plans, states, now, self.planner.tz)
        recent = drive(self.ledger, self._recent_usage(forecast_queries(out, now)))
        return with_forecasts(out, recent, now)

    async def astatus(self, scope: str | None = None) -> list[BudgetStatus]:
        """Async :meth:`status`."""
        await self._amaybe_refresh()
        now = self.now()
        known = () if scope is not None else [s for s, _w in await self.ledger.ascopes()]
        plans = self.planner.status_lines(scope, known, now)
        states = await self.ledger.astatus([lp.line for lp in plans], now=now) if plans else ()
        out = statuses(plans, states, now, self.planner.tz)
        recent = await adrive(self.ledger, self._recent_usage(forecast_queries(out, now)))
        return with_forecasts(out, recent, now)

    def usage(
        self,
        *,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        group_by: ReportBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals from the usage log, grouped by ``scope``, ``model`` or ``day`` (UTC), or by
        the scopes of one kind (``user``, ``team``, ``key``, ``feature``, ``agent``, ...: a
        call counts under each of its scopes, so these are the per-user, per-team ... totals).

        Raises:
            ValueError: ``group_by`` is none of those.
        """
        by = _ledger_group(group_by)
        rows = self.ledger.usage(since=_ts(since), until=_ts(until), group_by=by, scope=scope)
        return _of_kind(rows, group_by)

    async def ausage(
        self,
        *,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        group_by: ReportBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        by = _ledger_group(group_by)
        rows = await self.ledger.ausage(
            since=_ts(since), until=_ts(until), group_by=by, scope=scope
        )
        return _of_kind(rows, group_by)

    def scope_path(self, scopes: Iterable[str]) -> tuple[str, ...]:
        """``global`` plus the given scopes, in order, without repeats (see
        :meth:`LinePlanner.scope_path <tb_plugins.engine.planning.LinePlanner.scope_path>`).

        Raises:
            ValueError: a scope is not ``kind:name`` of a known kind, or not printable text.
        """
        return self.planner.scope_path(scopes)

    def now(self) -> float:
        """The guard's clock: the ledger server's time for shared ledgers (its last reading
        plus the monotonic time since), else the local clock; it never goes back, so a clock
        stepped back cannot reopen a window that was spent."""
        return self._time.now()

    # -- the write-back --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Settlements waiting for the ledger to come back."""
        return len(self.writeback.pending)

    @property
    def rejected(self) -> list[UsageRecord]:
        """Settlements the ledger refused (not an outage: e.g. a value out of its range).
        They are logged at ERROR and kept here, oldest first, for inspection; they are not
        retried. At most the last 10,000 are kept."""
        with self.writeback.lock:
            return list(self.writeback.rejected)

    def flush(self) -> int:
        """Write spend kept while the ledger was unreachable. Returns how many were written."""
        return drive(self.ledger, self.writeback.flow(self.now()))[0]

    async def aflush(self) -> int:
        """Async :meth:`flush`."""
        return (await adrive(self.ledger, self.writeback.flow(self.now())))[0]

    # -- on the call path: the server's clock and the write-back, at most once per call -----

    def _sync_clock(self) -> LedgerUnavailable | None:
        return drive(self.ledger, self._time.sync_flow()) if self._time.due() else None

    async def _async_sync_clock(self) -> LedgerUnavailable | None:
        return await adrive(self.ledger, self._time.sync_flow()) if self._time.due() else None

    def _maybe_flush(self) -> LedgerUnavailable | None:
        if not self.writeback.due(self._time.mono()):
            return None
        return drive(self.ledger, self.writeback.flow(self.now()))[1]

    async def _amaybe_flush(self) -> LedgerUnavailable | None:
        if not self.writeback.due(self._time.mono()):
            return None
        return (await adrive(self.ledger, self.writeback.flow(self.now())))[1]


def _ledger_group(group_by: str) -> GroupBy:
    if group_by in ("scope", "model", "day"):
        return group_by  # type: ignore[return-value]
    if group_by in KNOWN_KINDS and group_by != "global":
        return "scope"
    kinds = ", ".join(k for k in KNOWN_KINDS if k != "global")
    raise ValueError(
        f"group_by must be 'scope', 'model', 'day' or a scope kind ({kinds}), not {group_by!r}"
    )


def _of_kind(rows: list[UsageRow], group_by: str) -> list[UsageRow]:
    if group_by in ("scope", "model", "day"):
        return rows
    prefix = group_by + ":"
    return [r for r in rows if r.key.startswith(prefix)]


def _ts(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()
