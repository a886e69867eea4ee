"""The BudgetGuard: one per process, shared by every integration.

``check`` estimates a call, walks the decision ladder against the ledger and returns a
:class:`Decision` holding a reservation (or raises :class:`~tb_plugins.errors.BudgetRefused`);
``settle`` charges what the call really used; ``release`` returns the hold. The async twins
(``acheck``, ``asettle``, ``arelease``) run the very same decision code: each flow is a generator
that yields ledger operations, and only the two small drivers differ (sync calls vs awaits).

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
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tb_plugins.alerts import Alert, AlertSink, LogSink, WebhookSink, dispatch
from tb_plugins.core.counting import Tokenizer, default_counter
from tb_plugins.core.policy import (
    LinePlan,
    Plan,
    alerts_crossed,
    downgrade_due,
    max_output_that_fits,
    refusal,
    remaining,
)
from tb_plugins.core.pricing import ModelPrice, PriceTable, Pricing
from tb_plugins.core.scopes import escape_text, normalize_scope
from tb_plugins.core.usage import (
    MAX_CALL_TOKENS,
    NANO,
    UNITS,
    Amounts,
    Limits,
    Usage,
    UsageRecord,
    UsageRow,
    amounts,
    check_count,
    nano_to_usd,
    unit_value,
    usd_to_nano,
)
from tb_plugins.core.windows import Clock, Slot, system_clock
from tb_plugins.errors import (
    BudgetRefused,
    LedgerError,
    LedgerUnavailable,
    RequestTooLarge,
    UnpricedModel,
)
from tb_plugins.ledger import Ledger, ledger_from_url
from tb_plugins.ledger.base import GroupBy, Line, LineState, ReserveResult, SettleResult, line_key
from tb_plugins.warnings import FailOpenWarning, UnpricedModelWarning

if TYPE_CHECKING:  # pydantic loads with the first policy, not with `import tb_plugins`
    from tb_plugins.config import Budget, Policy

__all__ = ["BudgetGuard", "BudgetStatus", "Charge", "Decision", "Estimate"]

logger = logging.getLogger("tb_plugins")

Action = Literal["allow", "clamp", "downgrade"]
_T = TypeVar("_T")
_Op = tuple[str, tuple[Any, ...], dict[str, Any]]
_MAX_ATTEMPTS = 6
_CLOCK_SYNC_EVERY = 60.0
_FLUSH_EVERY = 5.0
_REJECTED_MEMORY = 10_000
_HINT = "a budget is past its downgrade_at fraction"
# A run or session is over once it stops calling: its never-resetting counters may be pruned
# this long after its last charge, so per-run budgets do not grow the ledger forever.
RUN_IDLE_EXPIRY = 7 * 86400.0
_PATH_MEMORY = 4096  # validated scope paths remembered (forgotten all at once past this)
_IDLE_EXPIRY_STEP = 60.0  # the idle expiry of run:/session: lines moves on in steps this long
_EPHEMERAL_KINDS = ("run:", "session:")


def new_reservation_id() -> str:
    """A time-ordered UUID (version 7) as 32 hex digits: 48 bits of Unix milliseconds, then
    74 random bits. Ids made in time order land next to each other in a ledger's index of
    settled ids (a random uuid4 lands on a random page of it, each time)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 68) << 64
        | 0b10 << 62
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    return f"{value:032x}"


@dataclass(frozen=True)
class Estimate:
    """What a call is expected to use: the amounts held by its reservation."""

    input_tokens: int
    output_tokens: int
    usd: float | None
    exact: bool

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Decision:
    """The guard's answer for one call. Apply ``model`` and ``max_tokens`` to the request.

    Attributes:
        action: ``allow``, ``clamp`` (``max_tokens`` lowered) or ``downgrade`` (``model``
            replaced by its cheaper mapping; ``max_tokens`` may be lowered too).
        model: the model to call.
        requested_model: the model the caller asked for.
        max_tokens: the output cap to send (None: the caller set none and none is needed).
        reservation_id: the hold's id; pass the decision to ``settle`` or ``release``.
        estimate: the amounts held.
        scopes: the scope path charged (``global`` first).
        reasons: why the action differs from the request, in words.
        remaining: the least left of each limited unit over the path, after this hold.
        local: True when admitted under ``fail_open`` without a ledger hold.
    """

    action: Action
    model: str
    requested_model: str
    max_tokens: int | None
    reservation_id: str
    estimate: Estimate
    scopes: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    remaining: Mapping[str, float] = field(default_factory=dict)
    local: bool = False
    created_at: float = 0.0
    expires_at: float = 0.0
    lines: tuple[LinePlan, ...] = field(default=(), repr=False)
    plan: Plan | None = field(default=None, repr=False)
    issuer: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class Charge:
    """What :meth:`BudgetGuard.settle` charged."""

    reservation_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    usd: float | None
    estimated: bool
    applied: bool
    alerts: tuple[Alert, ...] = ()

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class BudgetStatus:
    """One limit of one budget on one scope, now."""

    scope: str
    budget: str
    window: str
    unit: str
    spent: float
    reserved: float
    limit: float
    remaining: float
    utilization: float
    window_start: float | None
    resets_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO 8601 too)."""
        iso = {
            f"{k}_iso": None
            if v is None
            else datetime.fromtimestamp(v, tz=timezone.utc).isoformat()
            for k, v in (("window_start", self.window_start), ("resets_at", self.resets_at))
        }
        return {**self.__dict__, **iso}


@dataclass
class _Pending:
    """Spend not yet in the ledger (it was unreachable); written when it is back."""

    reservation_id: str
    lines: tuple[Line, ...]
    amounts: Amounts
    record: UsageRecord


@dataclass(frozen=True, slots=True)
class _Template:
    """What a line of one scope and window needs besides the time: key, limits, budgets."""

    key: str
    window: str
    limits: Limits
    names: tuple[str | None, ...]
    budgets: tuple[Budget, ...]


class _LRU(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            if len(self) > self.size:
                self.popitem(last=False)
        return value

    def get_fresh(self, key: Any, now: float) -> Any:
        """The value stored with a validity range ``(lo, hi, value)`` if ``now`` is in it."""
        with self.lock:
            entry = self.get(key)
            if entry is None or not entry[0] <= now < entry[1]:
                return None
            self.move_to_end(key)
            return entry[2]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self[key] = value
            self.move_to_end(key)
            if len(self) > self.size:
                self.popitem(last=False)


class BudgetGuard:
    """Token budgets for every LLM call of a process, backed by a shared ledger.

    Args:
        policy: the validated policy (see :func:`tb_plugins.config.load_policy`).
        ledger: a ledger, or None to open ``policy.ledger``.
        clock: epoch seconds now; inject one in tests.
        monotonic: a clock that never steps back, for the time elapsed since the guard last
            read a shared ledger's clock (default ``time.monotonic``, or ``clock`` when a
            ``clock`` is injected).
        tokenizer: counts input tokens (default: tiktoken offline, approximations elsewhere).
        prices: a price table (default: LiteLLM's bundled map) under the policy's overrides.
        alert_sinks: callables receiving :class:`~tb_plugins.alerts.Alert`, besides the
            policy's ``alerts:`` sinks.

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
        from tb_plugins.config import UsePrice

        self.policy = policy
        self.ledger = ledger or ledger_from_url(policy.ledger, timeout=policy.ledger_timeout)
        self.clock: Clock = clock or system_clock
        self._mono: Clock = monotonic or clock or time.monotonic
        self._issuer = os.urandom(8).hex()  # marks this guard's decisions
        self.tokenizer: Tokenizer = tokenizer or default_counter()
        overrides = {
            m: ModelPrice(p.input, p.output, p.cached_input, source="policy")
            for m, p in policy.prices.items()
        }
        self.pricing = Pricing(overrides, prices)
        self._unpriced_price = (
            ModelPrice(
                policy.unpriced.use_price.input,
                policy.unpriced.use_price.output,
                policy.unpriced.use_price.cached_input,
                source="policy:unpriced",
            )
            if isinstance(policy.unpriced, UsePrice)
            else None
        )
        self.budgets: list[Budget] = policy.compiled_budgets()
        self._tz = policy.tz
        self._sinks: list[AlertSink] = []
        for spec in policy.alerts:
            if spec.log is not None:
                self._sinks.append(LogSink(spec.log))
            elif spec.webhook is not None:
                self._sinks.append(WebhookSink(spec.webhook))
        self._sinks.extend(alert_sinks)
        self._scope_templates = _LRU(16384)
        self._slots: dict[str, tuple[Slot, float, float]] = {}
        self._path_lines = _LRU(4096)
        self._paths: dict[tuple[Any, ...], tuple[str, ...]] = {}  # validated scope paths
        self._pending: list[_Pending] = []
        self._rejected: list[UsageRecord] = []
        self._pending_lock = threading.Lock()
        self._last_flush = 0.0
        self._warned_unpriced: set[str] = set()
        # A shared ledger's clock: its time at the last reading, and our monotonic time then.
        self._server_at: float | None = None
        self._server_mono = 0.0
        self._synced_at: float | None = None
        self._last_now = float("-inf")
        # Line keys last seen past a downgrade_at fraction (only those: the set stays small).
        self._hints: set[str] = set()
        self.listeners: list[Callable[[str, Mapping[str, Any]], None]] = []

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

    def add_alert_sink(self, sink: AlertSink) -> None:
        """Send future alerts to ``sink`` too."""
        self._sinks.append(sink)

    def close(self) -> None:
        """Write pending spend if the ledger is back, then close it."""
        self.flush()
        self.ledger.close()

    # -- the public calls ------------------------------------------------------------------

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
    ) -> Decision:
        """Decide one call and hold its estimate on every budget of its scope path.

        Args:
            model: the model the caller asks for.
            messages: OpenAI-style chat messages (dicts with role and content).
            max_tokens: the request's output cap, if any.
            scopes: who is charged besides ``global``, e.g. ``["team:search", "user:alice"]``.
            tools: tool definitions sent with the request (they cost input tokens).
            prompt: plain text input instead of messages (completions, embeddings).
            input_tokens: a known input count; skips counting.
            reservation_id: an id to use (e.g. the framework's call id); default a new
                time-ordered UUID (version 7, as 32 hex digits).
            adjust: False when the caller cannot change the request (a callback that only
                observes): the answer is then ``allow`` or a refusal, never clamp/downgrade.

        Returns:
            The decision: apply ``decision.model`` and ``decision.max_tokens`` to the call.

        Raises:
            BudgetExceeded: a budget has no room (``LoopLimitExceeded`` for ``calls``).
            RequestTooLarge: the request passes a per-request cap.
            UnpricedModel: no price is known and the policy says ``unpriced: deny``.
            LedgerUnavailable: the ledger is down and the policy says ``fail_closed``.
        """
        down = self._sync_clock() or self._maybe_flush()
        flow = self._check_flow(
            model,
            messages,
            max_tokens,
            scopes,
            tools,
            prompt,
            input_tokens,
            reservation_id,
            adjust,
            down,
        )
        return self._drive(flow)

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
    ) -> Decision:
        """Async :meth:`check`: the same decision, awaiting the ledger.

        A long prompt not counted before is encoded in a worker thread first (see
        :meth:`TokenCounter.aprepare <tb_plugins.core.counting.TokenCounter.aprepare>`), so
        counting does not hold up the event loop.
        """
        down = await self._async_sync_clock() or await self._amaybe_flush()
        if messages is not None and input_tokens is None:
            prepare = getattr(self.tokenizer, "aprepare", None)
            if prepare is not None:
                await prepare(model, messages, tools)
        flow = self._check_flow(
            model,
            messages,
            max_tokens,
            scopes,
            tools,
            prompt,
            input_tokens,
            reservation_id,
            adjust,
            down,
        )
        return await self._adrive(flow)

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
        return self._drive(self._settle_flow(decision, usage))

    async def asettle(self, decision: Decision, usage: Usage | None = None) -> Charge:
        """Async :meth:`settle`."""
        return await self._adrive(self._settle_flow(decision, usage))

    def release(self, decision: Decision) -> None:
        """Return the hold of a call that failed or was cancelled before using anything.
        Never raises for ledger trouble: a hold the ledger could not drop expires by itself
        after its TTL.

        Raises:
            ValueError: ``decision`` was not made by this guard.
        """
        self._drive(self._release_flow(decision))

    async def arelease(self, decision: Decision) -> None:
        """Async :meth:`release`."""
        await self._adrive(self._release_flow(decision))

    def _release_flow(self, decision: Decision) -> Generator[_Op, Any, None]:
        self._own(decision)
        if not decision.local:
            yield from self._quiet("release", (decision.reservation_id,), {"now": self.now()})

    def status(self, scope: str | None = None) -> list[BudgetStatus]:
        """Every limit of every budget on ``scope`` (or on every scope the ledger knows)."""
        now = self.now()
        plans = self._status_lines(scope, now)
        states = self.ledger.status([lp.line for lp in plans], now=now) if plans else ()
        return self._statuses(plans, states, now)

    async def astatus(self, scope: str | None = None) -> list[BudgetStatus]:
        """Async :meth:`status`."""
        now = self.now()
        plans = self._status_lines(scope, now)
        states = await self.ledger.astatus([lp.line for lp in plans], now=now) if plans else ()
        return self._statuses(plans, states, now)

    def usage(
        self,
        *,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals from the usage log, grouped by ``scope``, ``model`` or ``day`` (UTC)."""
        return self.ledger.usage(since=_ts(since), until=_ts(until), group_by=group_by, scope=scope)

    def now(self) -> float:
        """The guard's clock: the ledger server's time for shared ledgers (its last reading
        plus the monotonic time since), else the local clock; it never goes back, so a clock
        stepped back cannot reopen a window that was spent."""
        if self._server_at is not None:
            t = self._server_at + (self._mono() - self._server_mono)
        else:
            t = self.clock()
        if t < self._last_now:
            return self._last_now
        self._last_now = t
        return t

    @property
    def pending(self) -> int:
        """Settlements waiting for the ledger to come back."""
        return len(self._pending)

    @property
    def rejected(self) -> list[UsageRecord]:
        """Settlements the ledger refused (not an outage: e.g. a value out of its range).
        They are logged at ERROR and kept here, oldest first, for inspection; they are not
        retried. At most the last 10,000 are kept."""
        with self._pending_lock:
            return list(self._rejected)

    def flush(self) -> int:
        """Write spend kept while the ledger was unreachable. Returns how many were written."""
        return self._drive(self._flush_flow())[0]

    async def aflush(self) -> int:
        """Async :meth:`flush`."""
        return (await self._adrive(self._flush_flow()))[0]

    # -- scope paths and lines -------------------------------------------------------------

    def scope_path(self, scopes: Iterable[str]) -> tuple[str, ...]:
        """``global`` plus the given scopes, in order, without repeats.

        Each scope is checked by :func:`~tb_plugins.core.scopes.normalize_scope`: whitespace
        around it is dropped; an unknown kind, a control character or an over-long name is
        refused.

        Raises:
            ValueError: a scope is not ``kind:name`` of a known kind, or not printable text.
        """
        given = scopes if type(scopes) is tuple else tuple(scopes)
        try:
            known: tuple[str, ...] | None = self._paths.get(given)
        except TypeError:  # something unhashable: not a scope name
            return self._scope_path(given)
        if known is None:
            known = self._paths[given] = self._scope_path(given)
            if len(self._paths) > _PATH_MEMORY:
                self._paths.clear()
        return known

    @staticmethod
    def _scope_path(scopes: tuple[Any, ...]) -> tuple[str, ...]:
        path = ["global"]
        seen = {"global"}
        for given in scopes:
            s = normalize_scope(given)
            if s in seen:
                continue
            seen.add(s)
            path.append(s)
        return tuple(path)

    def _templates(self, scope: str) -> tuple[_Template, ...]:
        """Per scope: one entry per window with its storage key and merged limits (cached)."""

        def build() -> tuple[_Template, ...]:
            by_window: dict[str, list[Budget]] = {}
            for b in self.budgets:
                if b.matches(scope):
                    by_window.setdefault(b.window.spec, []).append(b)
            out = []
            for spec, budgets in by_window.items():
                limits: list[int | None] = [None] * len(UNITS)
                names: list[str | None] = [None] * len(UNITS)
                for b in budgets:
                    for u, lim in enumerate(b.limits):
                        current = limits[u]
                        if lim is not None and (current is None or lim < current):
                            limits[u], names[u] = lim, b.name
                merged: Limits = (limits[0], limits[1], limits[2], limits[3], limits[4], limits[5])
                out.append(
                    _Template(line_key(scope, spec), spec, merged, tuple(names), tuple(budgets))
                )
            return tuple(out)

        return self._scope_templates.get_or(scope, build)  # type: ignore[no-any-return]

    def _slot(self, budget: Budget, now: float) -> tuple[Slot, float, float]:
        """The window slot for ``now`` and the range of instants it holds for (reused until
        the bucket changes)."""
        cached = self._slots.get(budget.window.spec)
        if cached is not None and cached[1] <= now < cached[2]:
            return cached
        slot = budget.window.slot(now, self._tz)
        if slot.width:  # rolling: the bucket moves every `width` seconds
            valid = (float(slot.bucket), float(slot.bucket + slot.width))
        elif slot.resets_at is None:  # total
            valid = (float("-inf"), float("inf"))
        else:
            valid = (slot.start, slot.resets_at)
        entry = self._slots[budget.window.spec] = (slot, *valid)
        return entry

    def _lines(
        self, path: Sequence[str], now: float, *, cache: bool = True
    ) -> tuple[LinePlan, ...]:
        """The lines a call on ``path`` charges now (a call's path is reused while none of
        its windows moves on)."""
        if cache:
            lines: tuple[LinePlan, ...] | None = self._path_lines.get_fresh(path, now)
            if lines is not None:
                return lines
        lo, hi = float("-inf"), float("inf")
        out: list[LinePlan] = []
        for scope in path:
            ephemeral = scope.startswith(_EPHEMERAL_KINDS)
            for t in self._templates(scope):
                slot, start, end = self._slot(t.budgets[0], now)
                lo, hi = max(lo, start), min(hi, end)
                expires_at = slot.expires_at
                if expires_at is None and ephemeral:
                    expires_at = now + RUN_IDLE_EXPIRY
                    hi = min(hi, now + _IDLE_EXPIRY_STEP)
                line = Line(
                    key=t.key,
                    scope=scope,
                    window=t.window,
                    bucket=slot.bucket,
                    span=slot.span,
                    width=slot.width,
                    limits=t.limits,
                    expires_at=expires_at,
                )
                out.append(LinePlan.of(line, t.budgets, t.names, slot.resets_at))
        lines = tuple(out)
        if cache:
            self._path_lines.put(path, (lo, hi, lines))
        return lines

    # -- estimates -------------------------------------------------------------------------

    def _price(self, model: str) -> tuple[ModelPrice | None, bool]:
        price = self.pricing.price(model)
        if price is not None:
            return price, True
        if self.policy.unpriced == "deny":
            raise UnpricedModel(model)
        if self._unpriced_price is not None:
            return self._unpriced_price, True
        if model not in self._warned_unpriced:
            self._warned_unpriced.add(model)
            msg = (
                f"tb_plugins: model {model!r} has no known price; counting its tokens only "
                f"(usd budgets do not see it). Add it under 'prices:' in the policy."
            )
            logger.warning(msg)
            warnings.warn(msg, UnpricedModelWarning, stacklevel=4)
        return None, False

    def _plan(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        prompt: str | Sequence[str] | None,
        input_tokens: int | None,
        max_tokens: int | None,
    ) -> tuple[Plan, list[str]]:
        reasons: list[str] = []
        _check_model(model)
        if max_tokens is not None:
            check_count("max_tokens", max_tokens)
        if input_tokens is not None:
            check_count("input_tokens", input_tokens)
        else:
            if messages is not None:
                input_tokens = self.tokenizer.count_messages(model, messages, tools)
            elif prompt is not None:
                texts = [prompt] if isinstance(prompt, str) else list(prompt)
                input_tokens = sum(self.tokenizer.count_text(model, t) for t in texts)
            else:
                raise ValueError("check() needs messages, prompt or input_tokens")
            if input_tokens > MAX_CALL_TOKENS:
                check_count("the request's input tokens", input_tokens)
        caps = self.policy.request
        out = self.policy.default_output_tokens if max_tokens is None else max_tokens
        applied = max_tokens
        if caps.max_output_tokens is not None and out > caps.max_output_tokens:
            if max_tokens is not None:
                reasons.append(
                    f"max_tokens {max_tokens} above the per-request cap {caps.max_output_tokens}"
                )
            out = applied = caps.max_output_tokens
        price, priced = self._price(model)
        plan = Plan(
            model=model,
            input_tokens=input_tokens,
            output_tokens=out,
            max_tokens=applied,
            input_nano_per_token=(price.input_per_token * NANO) if price else 0.0,
            output_nano_per_token=(price.output_per_token * NANO) if price else 0.0,
            priced=priced,
            exact=self.tokenizer.is_exact(model),
        )
        return plan, reasons

    def _downgrade_model(self, model: str) -> str | None:
        table = self.policy.downgrade
        if model in table:
            return table[model]
        prefix, sep, bare = model.rpartition("/")
        if sep and bare in table:
            return f"{prefix}/{table[bare]}"
        return None

    # -- flows (pure decisions; I/O is yielded) --------------------------------------------

    def _check_flow(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None,
        max_tokens: int | None,
        scopes: Iterable[str],
        tools: Sequence[Mapping[str, Any]] | None,
        prompt: str | Sequence[str] | None,
        input_tokens: int | None,
        reservation_id: str | None,
        adjust: bool,
        down: LedgerUnavailable | None = None,
    ) -> Generator[_Op, Any, Decision]:
        now = self.now()
        path = self.scope_path(scopes)
        rid = reservation_id or new_reservation_id()
        plan, reasons = self._plan(model, messages, tools, prompt, input_tokens, max_tokens)
        action: Action = "clamp" if reasons else "allow"
        caps = self.policy.request
        if caps.max_input_tokens is not None and plan.input_tokens > caps.max_input_tokens:
            too_large = RequestTooLarge(
                scope="request",
                budget="request.max_input_tokens",
                unit="input_tokens",
                spent=0,
                limit=caps.max_input_tokens,
                requested=plan.input_tokens,
                resets_at=None,
                message=(
                    f"the request has {plan.input_tokens:,} input tokens, above the "
                    f"per-request cap of {caps.max_input_tokens:,} (request.max_input_tokens)"
                ),
            )
            yield from self._record_deny(rid, path, model, now, too_large)
            raise too_large
        lines = self._lines(path, now)
        expires_at = now + self.policy.reservation_ttl
        cheaper = self._downgrade_model(model) if adjust else None
        # A line known to be past downgrade_at starts the ladder on the cheaper model.
        hinted = bool(cheaper) and any(lp.line.key in self._hints for lp in lines)
        if hinted and cheaper:
            plan, reasons = self._replan(
                cheaper, messages, tools, prompt, input_tokens, max_tokens, _HINT
            )
            action = "downgrade"
        watch = any(lp.downgrades for lp in lines)
        if down is not None:  # seen this very call: do not wait for the ledger a second time
            return self._fail_open(down, rid, path, lines, plan, action, reasons, now)
        for _attempt in range(_MAX_ATTEMPTS):
            try:
                result: ReserveResult = yield (
                    "reserve",
                    (rid, [lp.line for lp in lines], plan.amounts()),
                    {"now": now, "expires_at": expires_at},
                )
            except LedgerUnavailable as exc:
                return self._fail_open(exc, rid, path, lines, plan, action, reasons, now)
            except LedgerError as exc:  # refused, not unreachable: never admit unchecked
                raise LedgerError(
                    f"the ledger {_safe_url(self.ledger.url)} refused the reservation ({exc}); "
                    f"the call is refused"
                ) from exc
            states = result.states
            if result.ok:
                due = None
                if watch:  # one pass: the first budget past downgrade_at, and the hints
                    for lp, st in zip(lines, states, strict=True):
                        past = downgrade_due((lp,), (st,))
                        if past is not None:
                            if due is None:
                                due = past
                            self._hints.add(lp.line.key)
                        else:
                            self._hints.discard(lp.line.key)
                if due is not None and cheaper and plan.model != cheaper:
                    yield from self._quiet("release", (rid,), {"now": now})
                    plan, reasons = self._replan(
                        cheaper, messages, tools, prompt, input_tokens, max_tokens, _past(due)
                    )
                    action = "downgrade"
                    continue
                if due is None and hinted:
                    # The hint was stale (e.g. the window reset): serve the model asked for.
                    yield from self._quiet("release", (rid,), {"now": now})
                    plan, reasons = self._plan(
                        model, messages, tools, prompt, input_tokens, max_tokens
                    )
                    action, hinted = ("clamp" if reasons else "allow"), False
                    continue
                if due is not None and hinted:
                    reasons = [_past(due) if r == _HINT else r for r in reasons]
                return self._decision(
                    rid, path, lines, plan, action, reasons, states, now, expires_at, model
                )
            # Refused: read what is left and step down the ladder.
            best, hard = max_output_that_fits(plan, lines, states)
            min_out = self.policy.min_output_tokens
            if not hard and (best is None or best >= plan.output_tokens):
                continue  # it fits now; another process took and returned room meanwhile
            if (
                adjust
                and not hard
                and best is not None
                and plan.output_tokens > 0
                and best >= min(min_out, plan.output_tokens)
            ):
                reasons.append(
                    f"max_tokens lowered from {plan.output_tokens} to {best} to fit what is left"
                )
                plan = _with_output(plan, best)
                if action == "allow":
                    action = "clamp"
                continue
            if cheaper and plan.model != cheaper:
                alt, alt_reasons = self._replan(
                    cheaper,
                    messages,
                    tools,
                    prompt,
                    input_tokens,
                    max_tokens,
                    f"only the cheaper model {cheaper!r} fits what is left",
                )
                best2, hard2 = max_output_that_fits(alt, lines, states)
                if not hard2 and (best2 is None or best2 >= min(min_out, alt.output_tokens)):
                    if best2 is not None and best2 < alt.output_tokens:
                        alt = _with_output(alt, best2)
                        alt_reasons.append(f"max_tokens lowered to {best2} to fit what is left")
                    plan, reasons, action = alt, alt_reasons, "downgrade"
                    continue
            err = refusal(plan, lines, states, min_out)
            yield from self._record_deny(rid, path, model, now, err)
            raise err
        err = refusal(plan, lines, states, self.policy.min_output_tokens)
        yield from self._record_deny(rid, path, model, now, err)
        raise err

    def _replan(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        prompt: str | Sequence[str] | None,
        input_tokens: int | None,
        max_tokens: int | None,
        why: str,
    ) -> tuple[Plan, list[str]]:
        """The original request estimated for the cheaper model (its tokenizer, its price)."""
        plan, reasons = self._plan(model, messages, tools, prompt, input_tokens, max_tokens)
        return plan, [*reasons, why]

    def _decision(
        self,
        rid: str,
        path: tuple[str, ...],
        lines: tuple[LinePlan, ...],
        plan: Plan,
        action: Action,
        reasons: list[str],
        states: Sequence[LineState],
        now: float,
        expires_at: float,
        requested_model: str,
        local: bool = False,
    ) -> Decision:
        d = Decision(
            action=action,
            model=plan.model,
            requested_model=requested_model,
            max_tokens=plan.max_tokens,
            reservation_id=rid,
            estimate=Estimate(
                plan.input_tokens,
                plan.output_tokens,
                nano_to_usd(plan.usd_nano()) if plan.priced else None,
                plan.exact,
            ),
            scopes=path,
            reasons=tuple(reasons),
            remaining=remaining(lines, states, plan.amounts()) if states else {},
            local=local,
            created_at=now,
            expires_at=expires_at,
            lines=lines,
            plan=plan,
            issuer=self._issuer,
        )
        if self.listeners:
            self._emit("decision", {"decision": d})
        return d

    def _fail_open(
        self,
        exc: LedgerUnavailable,
        rid: str,
        path: tuple[str, ...],
        lines: tuple[LinePlan, ...],
        plan: Plan,
        action: Action,
        reasons: list[str],
        now: float,
    ) -> Decision:
        if self.policy.on_ledger_error == "fail_closed":
            raise LedgerUnavailable(
                f"the ledger {_safe_url(self.ledger.url)} cannot be reached ({exc}); the call is "
                f"refused because the policy says on_ledger_error: fail_closed"
            ) from exc
        msg = (
            f"tb_plugins: ledger {_safe_url(self.ledger.url)} unreachable ({exc}); call "
            f"admitted without a budget check (fail_open); its spend is kept locally and "
            f"written when the ledger is back"
        )
        logger.error(msg)
        warnings.warn(msg, FailOpenWarning, stacklevel=4)
        return self._decision(
            rid,
            path,
            lines,
            plan,
            action,
            [*reasons, "fail_open"],
            (),
            now,
            now + self.policy.reservation_ttl,
            plan.model,
            local=True,
        )

    def _record_deny(
        self, rid: str, path: tuple[str, ...], model: str, now: float, err: BudgetRefused
    ) -> Generator[_Op, Any, None]:
        record = UsageRecord(
            ts=now,
            reservation_id=rid,
            scopes=path,
            model=model,
            requested_model=model,
            action="deny",
            extra={"error": err.to_dict()},
        )
        self._emit("deny", {"error": err, "scopes": path, "model": model})
        yield from self._quiet("append_usage", (record,), {})

    def _quiet(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Generator[_Op, Any, Any]:
        """A best-effort ledger operation: failures are logged, not raised."""
        try:
            return (yield (name, args, kwargs))
        except LedgerError as exc:
            logger.warning("tb_plugins: ledger %s failed: %s", name, exc)
            return None

    def _own(self, decision: Decision) -> None:
        if not isinstance(decision, Decision) or decision.plan is None:
            raise TypeError(
                f"settle() and release() take the Decision check() returned, got {decision!r}"
            )
        if decision.issuer != self._issuer:
            raise ValueError(
                f"decision {decision.reservation_id} was made by another BudgetGuard; settle or "
                f"release it with the guard that made it (its hold is on that guard's ledger)"
            )

    def _settle_flow(self, decision: Decision, usage: Usage | None) -> Generator[_Op, Any, Charge]:
        self._own(decision)
        now = self.now()
        plan = decision.plan
        assert plan is not None
        if usage is not None and not isinstance(usage, Usage):
            raise TypeError(f"settle() takes a tb_plugins.Usage, got {usage!r}")
        estimated = usage is None
        if usage is None:
            usage = Usage(plan.input_tokens, plan.output_tokens, model=decision.model)
        served = usage.model or decision.model
        if not served.isprintable():  # a provider's odd name is stored escaped, not refused
            served = escape_text(served)
        usd = usage.usd
        priced = usd is not None
        if usd is None:
            usd = self.pricing.cost(
                served, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
            )
            if usd is None and served != decision.model:
                usd = self.pricing.cost(
                    decision.model,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cached_input_tokens,
                )
            if usd is None and self._unpriced_price is not None:
                p = self._unpriced_price
                usd = (
                    usage.input_tokens * p.input_per_token
                    + usage.output_tokens * p.output_per_token
                )
            priced = usd is not None
        charged = amounts(
            usage.input_tokens, usage.output_tokens, usd_to_nano(usd) if usd is not None else 0
        )
        record = UsageRecord(
            ts=decision.created_at or now,
            reservation_id=decision.reservation_id,
            scopes=decision.scopes,
            model=served,
            requested_model=decision.requested_model,
            action=decision.action,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            usd=usd or 0.0,
            priced=priced,
            estimated=estimated,
            extra={"reasoning_tokens": usage.reasoning_tokens} if usage.reasoning_tokens else {},
        )
        line_list = [self._settle_line(lp, now) for lp in decision.lines]
        # Only lines with alert thresholds are read back after the settle.
        watch = [i for i, lp in enumerate(decision.lines) if lp.alerts]
        fired: list[Alert] = []
        applied = True
        pending = _Pending(decision.reservation_id, tuple(line_list), charged, record)
        try:
            if decision.local:  # the ledger was down at check: do not wait for it again
                raise LedgerUnavailable("it was unreachable when the call was checked")
            result: SettleResult = yield (
                "settle",
                (decision.reservation_id, line_list, charged, record),
                {"now": now, "watch": watch},
            )
        except LedgerUnavailable as exc:
            logger.error(
                "tb_plugins: could not record spend of %s (%s); kept locally and "
                "written when the ledger is back",
                decision.reservation_id,
                exc,
            )
            with self._pending_lock:
                self._pending.append(pending)
        except LedgerError as exc:
            applied = False
            self._reject(pending, exc)
        else:
            applied = result.applied
            if applied:
                fired = yield from self._alerts(decision.lines, result.states, charged, now)
        charge = Charge(
            reservation_id=decision.reservation_id,
            model=served,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            usd=usd,
            estimated=estimated,
            applied=applied,
            alerts=tuple(fired),
        )
        if self.listeners:
            self._emit("settle", {"decision": decision, "charge": charge})
        return charge

    def _alerts(
        self,
        lines: Sequence[LinePlan],
        states: Sequence[LineState | None],
        charged: Amounts,
        now: float,
    ) -> Generator[_Op, Any, list[Alert]]:
        fired = []
        for lp, budget, threshold, util in alerts_crossed(lines, states, charged):
            key = f"{lp.line.key}|{lp.line.bucket}|{budget.index}:{budget.name}|{threshold:g}"
            expires = None if lp.line.expires_at is None else lp.line.expires_at + 86400
            won = yield from self._quiet("claim_alert", (key,), {"expires_at": expires})
            if not won:
                continue
            alert = Alert(
                scope=lp.line.scope,
                budget=budget.name,
                window=lp.line.window,
                threshold=threshold,
                utilization=util,
                resets_at=lp.resets_at,
                ts=now,
            )
            fired.append(alert)
            dispatch(alert, self._sinks)
            self._emit("alert", {"alert": alert})
        return fired

    def _settle_line(self, lp: LinePlan, now: float) -> Line:
        """The line a settle at ``now`` charges: the one reserved, except that a rolling
        window's spend lands in the bucket of ``now`` (so a call longer than the window is
        still counted in it)."""
        line = lp.line
        if not line.width or not lp.budgets:
            return line
        slot = self._slot(lp.budgets[0], now)[0]
        if slot.bucket == line.bucket:
            return line
        return replace(line, bucket=slot.bucket, span=slot.span, expires_at=slot.expires_at)

    def _reject(self, pending: _Pending, exc: LedgerError) -> None:
        logger.error(
            "tb_plugins: the ledger refused the spend of %s (%s); it is not retried and is "
            "kept in guard.rejected: %r",
            pending.reservation_id,
            exc,
            pending.record,
        )
        with self._pending_lock:
            self._rejected.append(pending.record)
            del self._rejected[:-_REJECTED_MEMORY]

    def _flush_flow(self) -> Generator[_Op, Any, tuple[int, LedgerUnavailable | None]]:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        done = 0
        down: LedgerUnavailable | None = None
        for i, p in enumerate(batch):
            try:
                yield (
                    "settle",
                    (p.reservation_id, list(p.lines), p.amounts, p.record),
                    {"now": self.now(), "watch": ()},
                )
            except LedgerUnavailable as exc:
                with self._pending_lock:
                    self._pending[:0] = batch[i:]
                down = exc
                break
            except LedgerError as exc:  # this entry only: the others still go in
                self._reject(p, exc)
                continue
            done += 1
        if done:
            logger.warning("tb_plugins: wrote %d settlements kept while the ledger was down", done)
        return done, down

    # -- drivers ---------------------------------------------------------------------------

    def _drive(self, flow: Generator[_Op, Any, _T]) -> _T:
        send: Any = None
        exc: BaseException | None = None
        while True:
            try:
                op = flow.throw(exc) if exc is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            name, args, kwargs = op
            exc = None
            try:
                send = getattr(self.ledger, name)(*args, **kwargs)
            except Exception as e:
                exc = _ledger_error(e)

    async def _adrive(self, flow: Generator[_Op, Any, _T]) -> _T:
        send: Any = None
        exc: BaseException | None = None
        while True:
            try:
                op = flow.throw(exc) if exc is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            name, args, kwargs = op
            exc = None
            try:
                send = await getattr(self.ledger, "a" + name)(*args, **kwargs)
            except Exception as e:
                exc = _ledger_error(e)

    def _clock_due(self) -> bool:
        mono = self._mono()
        if self._synced_at is not None and 0 <= mono - self._synced_at < _CLOCK_SYNC_EVERY:
            return False
        self._synced_at = mono
        return True

    def _clock_flow(self) -> Generator[_Op, Any, LedgerUnavailable | None]:
        """Follow a shared ledger's clock: its time, read against our monotonic clock (so a
        step of the local wall clock changes nothing)."""
        before = self._mono()
        try:
            server = yield ("server_time", (), {})
        except LedgerUnavailable as exc:
            logger.debug("tb_plugins: server_time failed: %s", exc)
            return exc
        except LedgerError as exc:
            logger.debug("tb_plugins: server_time failed: %s", exc)
            return None
        if server is not None:
            self._server_mono = (before + self._mono()) / 2
            self._server_at = float(server)
        return None

    def _sync_clock(self) -> LedgerUnavailable | None:
        return self._drive(self._clock_flow()) if self._clock_due() else None

    async def _async_sync_clock(self) -> LedgerUnavailable | None:
        return await self._adrive(self._clock_flow()) if self._clock_due() else None

    def _flush_due(self) -> bool:
        if not self._pending:
            return False
        mono = self._mono()
        if 0 <= mono - self._last_flush < _FLUSH_EVERY:
            return False
        self._last_flush = mono
        return True

    def _maybe_flush(self) -> LedgerUnavailable | None:
        return self._drive(self._flush_flow())[1] if self._flush_due() else None

    async def _amaybe_flush(self) -> LedgerUnavailable | None:
        return (await self._adrive(self._flush_flow()))[1] if self._flush_due() else None

    def _emit(self, event: str, data: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event, data)
            except Exception:
                logger.exception("tb_plugins: listener %r failed", listener)

    # -- status ----------------------------------------------------------------------------

    def _status_lines(self, scope: str | None, now: float) -> tuple[LinePlan, ...]:
        if scope is not None:
            return self._lines([scope], now, cache=False)
        scopes: list[str] = []
        for b in self.budgets:
            if not b.is_pattern and b.pattern not in scopes:
                scopes.append(b.pattern)
        for s, _window in self.ledger.scopes():
            if s not in scopes and any(b.matches(s) for b in self.budgets):
                scopes.append(s)
        return self._lines(scopes, now, cache=False)

    def _statuses(
        self, plans: Sequence[LinePlan], states: Sequence[LineState], now: float
    ) -> list[BudgetStatus]:
        out = []
        for lp, st in zip(plans, states, strict=True):
            start = None
            if lp.budgets:
                start = lp.budgets[0].window.slot(now, self._tz).start
                if lp.line.window == "total":
                    start = None
            for b in lp.budgets:
                for u, lim in enumerate(b.limits):
                    if lim is None:
                        continue
                    spent = unit_value(u, st.spent[u])
                    held = unit_value(u, st.held[u])
                    limit = unit_value(u, lim)
                    out.append(
                        BudgetStatus(
                            scope=lp.line.scope,
                            budget=b.name,
                            window=lp.line.window,
                            unit=UNITS[u],
                            spent=spent,
                            reserved=held,
                            limit=limit,
                            remaining=max(limit - spent - held, 0.0),
                            utilization=((spent + held) / limit)
                            if limit
                            else (float("inf") if spent + held else 0.0),
                            window_start=start,
                            resets_at=lp.resets_at,
                        )
                    )
        return out


def _check_model(model: object) -> None:
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a model name, got {model!r}")
    if len(model) > 512:
        raise ValueError(f"model name {model[:40]!r}... is longer than 512 characters")
    if not model.isprintable() and escape_text(model) != model:
        raise ValueError(f"model name {model!r} contains a control character or lone surrogate")


def _ledger_error(exc: Exception) -> LedgerError:
    """What a ledger operation's failure means: an OSError (or a backend's own
    LedgerUnavailable) is an outage; anything else is a refusal or a bug, never read as
    "unreachable", so fail_open never admits a call the ledger refused."""
    if isinstance(exc, LedgerError):
        return exc
    err: LedgerError
    if isinstance(exc, OSError):
        err = LedgerUnavailable(f"{type(exc).__name__}: {exc}")
    else:
        err = LedgerError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _past(budget: Budget) -> str:
    return f"budget {budget.name!r} is past its downgrade_at ({budget.downgrade_at:.0%})"


def _with_output(plan: Plan, output_tokens: int) -> Plan:
    return Plan(
        model=plan.model,
        input_tokens=plan.input_tokens,
        output_tokens=output_tokens,
        max_tokens=output_tokens,
        input_nano_per_token=plan.input_nano_per_token,
        output_nano_per_token=plan.output_nano_per_token,
        priced=plan.priced,
        exact=plan.exact,
    )


def _ts(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _safe_url(url: str) -> str:
    """A ledger URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<ledger>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
