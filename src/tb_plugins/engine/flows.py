"""The guard's flows: check (the decision ladder against the ledger), settle and release.

Each flow is a generator that yields ledger operations (see :mod:`tb_plugins.engine.drivers`)
and asks the pure rules of :mod:`tb_plugins.core.policy` what to do with the answers, so the
sync and async methods of :class:`~tb_plugins.engine.guard.BudgetGuard` share every decision.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tb_plugins.core.ladder import full_view
from tb_plugins.core.policy import (
    LinePlan,
    Plan,
    downgrade_due,
    max_output_that_fits,
    refusal,
    remaining,
)
from tb_plugins.core.request import Request
from tb_plugins.core.scopes import escape_text
from tb_plugins.core.trim import trim_messages
from tb_plugins.core.urls import redact_url
from tb_plugins.core.usage import (
    Usage,
    UsageRecord,
    amounts,
    nano_to_usd,
    usd_to_nano,
)
from tb_plugins.engine.alerting import AlertFlows
from tb_plugins.engine.alerts import Alert, AlertSink
from tb_plugins.engine.decision import (
    Action,
    Charge,
    Decision,
    Estimate,
    Shadow,
    new_reservation_id,
)
from tb_plugins.engine.drivers import Flow, quiet
from tb_plugins.engine.estimate import Estimator, with_output
from tb_plugins.engine.holds import WARM_RECORDS, WARM_SECONDS
from tb_plugins.engine.planning import LinePlanner
from tb_plugins.engine.shadow import as_asked, shadow_verdict
from tb_plugins.engine.writeback import Pending, WriteBack
from tb_plugins.errors import (
    BudgetRefused,
    LedgerError,
    LedgerUnavailable,
    RequestTooLarge,
)
from tb_plugins.ledger import Ledger
from tb_plugins.ledger.base import LineState, ReserveResult, SettleResult
from tb_plugins.warnings import FailOpenWarning

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.core.budgets import Budget

__all__ = ["Flows"]

logger = logging.getLogger("tb_plugins")
_MAX_ATTEMPTS = 6
_HINT = "a budget is past its downgrade_at fraction"


@dataclass(frozen=True, slots=True)
class _Call:
    """What one check knows of its call besides the plan: who asked, for what, when."""

    rid: str
    path: tuple[str, ...]
    model: str
    now: float
    lines: tuple[LinePlan, ...] = ()
    request: Request | None = None  # kept when the estimate is a bound (settle may count)
    kept: tuple[int, ...] | None = None  # the messages sent, when trimmed to fit
    trimmed: str = ""  # the reason that says so


class Flows(AlertFlows):
    """The flows, as methods of the guard (which provides the attributes below)."""

    policy: Policy
    ledger: Ledger
    estimator: Estimator
    planner: LinePlanner
    writeback: WriteBack
    listeners: list[Callable[[str, Mapping[str, Any]], None]]
    _sinks: list[AlertSink]
    _hints: set[str]
    _exhausted: set[str]
    _forecast_due: dict[str, float]
    _issuer: str

    def now(self) -> float:  # pragma: no cover - the guard's
        raise NotImplementedError

    # -- check -----------------------------------------------------------------------------

    def _check_flow(
        self, request: Request, down: LedgerUnavailable | None = None
    ) -> Flow[Decision]:
        now = self.now()
        path = self.planner.scope_path(request.scopes)
        rid = request.reservation_id or new_reservation_id()
        model = request.model
        call = _Call(rid, path, model, now)
        holds = self.estimator.holds
        if holds is not None and holds.claim_warm():  # once: learn from every guard's calls
            since = now - WARM_SECONDS
            holds.warm((yield from quiet("records", (), {"since": since, "limit": WARM_RECORDS})))
        shadow_all = self.policy.mode == "shadow"  # the request caps are not enforced either
        # Bound first: an upper bound of the input, counted exactly below wherever the count
        # could change the decision (a request cap, a refusal); an allow it leaves stands.
        bound = self.policy.estimate.input == "bound_first" and not shadow_all
        plan, reasons = self.estimator.plan(request, bound=bound)
        if shadow_all:
            plan, reasons = as_asked(plan, request, self.policy.default_output_tokens), []
        action: Action = "clamp" if reasons else "allow"
        caps = self.policy.request
        limit = None if shadow_all else caps.max_input_tokens
        if limit is not None and plan.bound and plan.input_tokens > limit:
            plan, reasons = self.estimator.plan(request)  # the cap is on the exact count
        kept, trimmed = None, ""
        if limit is not None and plan.input_tokens > limit and self._trims(request):
            kept = self._trim(request, limit)
            if kept is not None:
                sent = request.messages or ()
                dropped = len(sent) - len(kept)
                request = replace(request, messages=[sent[i] for i in kept])
                plan, reasons = self.estimator.plan(request)
                trimmed = (
                    f"trimmed {dropped} oldest message{'s' if dropped != 1 else ''} to fit "
                    f"request.max_input_tokens ({limit:,})"
                )
        if limit is not None and plan.input_tokens > limit:
            too_large = RequestTooLarge(
                scope="request",
                budget="request.max_input_tokens",
                unit="input_tokens",
                spent=0,
                limit=limit,
                requested=plan.input_tokens,
                resets_at=None,
                message=(
                    f"the request has {plan.input_tokens:,} input tokens, above the "
                    f"per-request cap of {limit:,} (request.max_input_tokens)"
                ),
            )
            yield from self._record_deny(call, too_large)
            raise too_large
        lines = self.planner.lines(path, now, priority=request.priority)
        call = _Call(rid, path, model, now, lines, request if plan.bound else None, kept, trimmed)
        expires_at = now + self.policy.reservation_ttl
        cheaper = self.estimator.downgrade_model(model) if request.adjust else None
        # A line known to be past downgrade_at starts the ladder on the cheaper model.
        hinted = bool(cheaper) and any(lp.line.key in self._hints for lp in lines)
        if hinted and cheaper:
            plan, reasons = self._replan(request, cheaper, _HINT)
            action = "downgrade"
        watch = any(lp.downgrades for lp in lines)
        if down is not None:  # seen this very call: do not wait for the ledger a second time
            return self._fail_open(down, call, plan, action, reasons)
        states: Sequence[LineState] = ()
        for _attempt in range(_MAX_ATTEMPTS):
            try:
                result: ReserveResult = yield (
                    "reserve",
                    (rid, [lp.line for lp in lines], plan.amounts()),
                    {"now": now, "expires_at": expires_at},
                )
            except LedgerUnavailable as exc:
                return self._fail_open(exc, call, plan, action, reasons)
            except LedgerError as exc:  # refused, not unreachable: never admit unchecked
                raise LedgerError(
                    f"the ledger {redact_url(self.ledger.url)} refused the reservation ({exc}); "
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
                    yield from quiet("release", (rid,), {"now": now})
                    plan, reasons = self._replan(request, cheaper, _past(due))
                    action = "downgrade"
                    continue
                if due is None and hinted:
                    # The hint was stale (e.g. the window reset): serve the model asked for.
                    yield from quiet("release", (rid,), {"now": now})
                    plan, reasons = self.estimator.plan(request)
                    action, hinted = ("clamp" if reasons else "allow"), False
                    continue
                if due is not None and hinted:
                    reasons = [_past(due) if r == _HINT else r for r in reasons]
                shadow = None
                if self.planner.shadow or shadow_all:  # what enforcing them all would do
                    shadow = shadow_verdict(self.estimator, self.policy, request, lines, states)
                return self._decision(call, plan, action, reasons, states, shadow=shadow)
            if plan.bound:  # the exact count may fit where the bound did not: decide on it
                plan, reasons = self.estimator.plan(request)
                continue
            # Refused: read what is left and step down the ladder.
            best, hard = max_output_that_fits(plan, lines, states)
            min_out = self.policy.min_output_tokens
            if not hard and (best is None or best >= plan.output_tokens):
                continue  # it fits now; another process took and returned room meanwhile
            if (
                request.adjust
                and not hard
                and best is not None
                and plan.output_tokens > 0
                and best >= min(min_out, plan.output_tokens)
            ):
                reasons.append(
                    f"max_tokens lowered from {plan.output_tokens} to {best} to fit what is left"
                )
                plan = with_output(plan, best)
                if action == "allow":
                    action = "clamp"
                continue
            if cheaper and plan.model != cheaper:
                alt, alt_reasons = self._replan(
                    request, cheaper, f"only the cheaper model {cheaper!r} fits what is left"
                )
                best2, hard2 = max_output_that_fits(alt, lines, states)
                if not hard2 and (best2 is None or best2 >= min(min_out, alt.output_tokens)):
                    if best2 is not None and best2 < alt.output_tokens:
                        alt = with_output(alt, best2)
                        alt_reasons.append(f"max_tokens lowered to {best2} to fit what is left")
                    plan, reasons, action = alt, alt_reasons, "downgrade"
                    continue
            break
        err = refusal(plan, lines, states, self.policy.min_output_tokens)
        yield from self._record_deny(call, err)
        yield from self._exhausted_alert(call.lines, call.now, err)
        raise err

    def _trims(self, request: Request) -> bool:
        return (
            self.policy.request.on_too_long == "trim"
            and request.trimmable
            and request.adjust
            and request.input_tokens is None
            and bool(request.messages)
        )

    def _trim(self, request: Request, limit: int) -> tuple[int, ...] | None:
        """The messages of ``request`` that fit ``limit`` (see :mod:`tb_plugins.core.trim`)."""
        tokenizer, model, tools = self.estimator.tokenizer, request.model, request.tools
        return trim_messages(
            request.messages or (), limit, lambda ms: tokenizer.count_messages(model, ms, tools)
        )

    def _input_of(self, decision: Decision) -> int:
        """The input tokens to charge a call that reported no usage: its estimate, counted
        exactly now if the check used a bound (off the hot path: such calls are rare)."""
        plan = decision.plan
        assert plan is not None
        if plan.bound and decision.request is not None:
            try:
                return self.estimator.plan(decision.request, plan.model)[0].input_tokens
            except Exception:  # the bound is still an estimate never below the count
                logger.exception("tb_plugins: counting a call's input at settle failed")
        return plan.input_tokens

    def _replan(self, request: Request, model: str, why: str) -> tuple[Plan, list[str]]:
        """The original request estimated for the cheaper model (its tokenizer, its price)."""
        plan, reasons = self.estimator.plan(request, model)
        return plan, [*reasons, why]

    def _decision(
        self,
        call: _Call,
        plan: Plan,
        action: Action,
        reasons: list[str],
        states: Sequence[LineState],
        local: bool = False,
        shadow: Shadow | None = None,
    ) -> Decision:
        now = call.now
        # A shadow budget's limits are lifted on its line: what is left is read on the view.
        lines = call.lines if shadow is None else full_view(call.lines)
        d = Decision(
            action=action,
            model=plan.model,
            requested_model=call.model,
            max_tokens=plan.max_tokens,
            reservation_id=call.rid,
            estimate=Estimate(
                plan.input_tokens,
                plan.output_tokens,
                nano_to_usd(plan.usd_nano()) if plan.priced else None,
                plan.exact,
            ),
            scopes=call.path,
            reasons=(call.trimmed, *reasons) if call.trimmed else tuple(reasons),
            remaining=remaining(lines, states, plan.amounts()) if states else {},
            local=local,
            created_at=now,
            expires_at=now + self.policy.reservation_ttl,
            lines=call.lines,
            request=call.request,
            plan=plan,
            issuer=self._issuer,
            shadow=shadow,
            kept_messages=call.kept,
        )
        if self.listeners:
            self._emit("decision", {"decision": d})
        return d

    def _fail_open(
        self, exc: LedgerUnavailable, call: _Call, plan: Plan, action: Action, reasons: list[str]
    ) -> Decision:
        if self.policy.on_ledger_error == "fail_closed":
            raise LedgerUnavailable(
                f"the ledger {redact_url(self.ledger.url)} cannot be reached ({exc}); the call "
                f"is refused because the policy says on_ledger_error: fail_closed"
            ) from exc
        msg = (
            f"tb_plugins: ledger {redact_url(self.ledger.url)} unreachable ({exc}); call "
            f"admitted without a budget check (fail_open); its spend is kept locally and "
            f"written when the ledger is back"
        )
        logger.error(msg)
        warnings.warn(msg, FailOpenWarning, stacklevel=5)
        return self._decision(call, plan, action, [*reasons, "fail_open"], (), local=True)

    def _record_deny(self, call: _Call, err: BudgetRefused) -> Flow[None]:
        record = UsageRecord(
            ts=call.now,
            reservation_id=call.rid,
            scopes=call.path,
            model=call.model,
            requested_model=call.model,
            action="deny",
            extra={"error": err.to_dict()},
        )
        self._emit("deny", {"error": err, "scopes": call.path, "model": call.model})
        yield from quiet("append_usage", (record,), {})

    # -- settle and release ----------------------------------------------------------------

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

    def _settle_flow(self, decision: Decision, usage: Usage | None) -> Flow[Charge]:
        self._own(decision)
        now = self.now()
        plan = decision.plan
        assert plan is not None
        if usage is not None and not isinstance(usage, Usage):
            raise TypeError(f"settle() takes a tb_plugins.Usage, got {usage!r}")
        estimated = usage is None
        if usage is None:  # the output cap when known: a learned hold may be below it
            output = max(plan.output_tokens, plan.max_tokens or 0)
            usage = Usage(self._input_of(decision), output, model=decision.model)
        served = usage.model or decision.model
        if not served.isprintable():  # a provider's odd name is stored escaped, not refused
            served = escape_text(served)
        usd = self.estimator.cost(usage, served, decision.model)
        if self.estimator.holds is not None and not estimated:
            self.estimator.holds.observe(decision.model, usage.output_tokens)
        extra: dict[str, Any] = {}
        if usage.reasoning_tokens:
            extra["reasoning_tokens"] = usage.reasoning_tokens
        if decision.shadow is not None:  # what enforcement would have done, for reports
            extra["shadow"] = decision.shadow.to_dict()
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
            priced=usd is not None,
            estimated=estimated,
            extra=extra,
        )
        line_list = [self.planner.settle_line(lp, now) for lp in decision.lines]
        # Only lines with alert thresholds are read back after the settle.
        watch = [i for i, lp in enumerate(decision.lines) if lp.alerts]
        fired: list[Alert] = []
        applied = True
        try:
            if decision.local:  # the ledger was down at check: do not wait for it again
                raise LedgerUnavailable("it was unreachable when the call was checked")
            result: SettleResult = yield (
                "settle",
                (decision.reservation_id, line_list, charged, record),
                {"now": now, "watch": watch},
            )
        except LedgerError as exc:  # kept for the write-back (an outage) or set aside (refused)
            entry = Pending(decision.reservation_id, tuple(line_list), charged, record)
            if isinstance(exc, LedgerUnavailable):
                self.writeback.keep(entry, exc)
            else:
                applied = False
                self.writeback.reject(entry, exc)
        else:
            applied = result.applied
            if applied:
                fired = yield from self._alerts(decision.lines, result.states, charged, now)
                if self._sinks:
                    fired += yield from self._forecast_alerts(decision.lines, result.states, now)
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

    def _release_flow(self, decision: Decision) -> Flow[None]:
        self._own(decision)
        if not decision.local:
            yield from quiet("release", (decision.reservation_id,), {"now": self.now()})


def _past(budget: Budget) -> str:
    return f"budget {budget.name!r} is past its downgrade_at ({budget.downgrade_at:.0%})"
