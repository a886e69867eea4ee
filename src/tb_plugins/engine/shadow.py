"""Shadow mode: decide and record, do not enforce.

A budget in ``mode: shadow`` (or every budget, and the per-request caps, under a policy in
``mode: shadow``) is charged like any other, but its verdicts are not enforced. The guard
reserves each call with the shadow budgets' limits lifted (:func:`~tb_plugins.core.ladder.lift`),
so the ledger never refuses on them and the enforced budgets still decide the call; then
:func:`shadow_verdict` works out, from the line states that reservation returned, what the
guard would have done with every budget enforced (:func:`~tb_plugins.core.ladder.decide`).
The answer rides on :attr:`Decision.shadow <tb_plugins.engine.decision.Decision.shadow>` and
into the call's usage row (``extra["shadow"]``), where ``tb report --shadow``
(:func:`shadow_rows`) counts it and ``tb replay`` reads the request back.

A policy with no budget in shadow mode runs none of this: the check's only extra cost is one
attribute test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tb_plugins.core.ladder import decide, full_view
from tb_plugins.core.lines import LineState
from tb_plugins.core.models import bare_model
from tb_plugins.core.policy import LinePlan, Plan
from tb_plugins.core.request import Request
from tb_plugins.core.usage import UsageRecord
from tb_plugins.engine.decision import Shadow
from tb_plugins.errors import UnpricedModel

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.engine.estimate import Estimator

__all__ = ["ShadowRow", "as_asked", "shadow_rows", "shadow_verdict"]

SHADOW_ACTIONS = ("allow", "clamp", "downgrade", "deny")


def as_asked(plan: Plan, request: Request, default_output_tokens: int) -> Plan:
    """``plan`` with the output cap the request asked for (the per-request cap not applied):
    how a call goes under a policy in ``mode: shadow``."""
    out = default_output_tokens if request.max_tokens is None else request.max_tokens
    if out == plan.output_tokens and request.max_tokens == plan.max_tokens:
        return plan
    return replace(plan, output_tokens=out, max_tokens=request.max_tokens)


def shadow_verdict(
    estimator: Estimator,
    policy: Policy,
    request: Request,
    lines: Sequence[LinePlan],
    states: Sequence[LineState],
) -> Shadow | None:
    """What the guard would have decided for ``request`` with every budget of ``lines``
    enforced (and, under a policy in ``mode: shadow``, the per-request caps), given the
    states its reservation read; None when no budget of the call is in shadow mode."""
    everything = policy.mode == "shadow"
    if not everything and not any(lp.shadow is not None for lp in lines):
        return None
    plan, reasons = estimator.plan(request)  # where the enforced ladder starts
    asked = request.max_tokens
    cap = policy.request.max_input_tokens
    if everything and cap is not None and plan.input_tokens > cap:
        why = (
            f"the request has {plan.input_tokens:,} input tokens, above the per-request cap "
            f"of {cap:,} (request.max_input_tokens)"
        )
        return Shadow(
            "deny", plan.model, plan.max_tokens, (why,), "request.max_input_tokens",
            "request", "input_tokens", plan.input_tokens, asked,
        )  # fmt: skip
    cheaper = estimator.downgrade_model(request.model) if request.adjust else None
    try:
        v = decide(
            plan,
            reasons,
            (lambda: estimator.plan(request, cheaper)) if cheaper else None,
            full_view(lines),
            states,
            policy.min_output_tokens,
            adjust=request.adjust,
        )
    except UnpricedModel as err:  # the cheaper model, under unpriced: deny
        return Shadow(
            "deny", plan.model, plan.max_tokens, (str(err),), "unpriced", None, None,
            plan.input_tokens, asked,
        )  # fmt: skip
    return Shadow(
        action=v.action,
        model=v.plan.model,
        max_tokens=v.plan.max_tokens,
        reasons=v.reasons,
        budget=v.budget.name if v.budget is not None else None,
        scope=v.scope,
        unit=v.unit,
        input_tokens=plan.input_tokens,
        asked_max_tokens=asked,
    )


# -- reading it back: tb report --shadow ---------------------------------------------------


@dataclass
class ShadowRow:
    """Calls of one group with a shadow verdict, by what enforcement would have done.

    ``would_deny_tokens`` and ``would_deny_usd`` are what the calls it would have refused
    spent (they ran: shadow mode admits everything).
    """

    key: str
    requests: int = 0
    shadowed: int = 0
    would_allow: int = 0
    would_clamp: int = 0
    would_downgrade: int = 0
    would_deny: int = 0
    would_deny_tokens: int = 0
    would_deny_usd: float = 0.0

    def to_dict(self, key: str = "key") -> dict[str, Any]:
        """Every field, the group under ``key``."""
        out: dict[str, Any] = {key: self.key}
        out.update((k, v) for k, v in self.__dict__.items() if k != "key")
        return out


def shadow_rows(records: Iterable[UsageRecord], by: str = "scope") -> list[ShadowRow]:
    """The shadow verdicts of the usage log, grouped by ``scope`` (a call counts under each
    of its scopes), ``model`` (its bare name: ``openai/gpt-4o`` is ``gpt-4o``), ``day`` (UTC)
    or a scope kind (``user``, ``team``, ...).

    ``requests`` counts the calls that ran in the group; ``shadowed`` those with a verdict.
    """
    rows: dict[str, ShadowRow] = {}
    prefix = by + ":"
    for r in records:
        if r.action == "deny":
            continue
        if by == "model":
            keys: Iterable[str] = (bare_model(r.model),)
        elif by == "day":
            keys = (datetime.fromtimestamp(r.ts, tz=timezone.utc).strftime("%Y-%m-%d"),)
        elif by == "scope":
            keys = dict.fromkeys(r.scopes)
        else:
            keys = [s for s in dict.fromkeys(r.scopes) if s.startswith(prefix)]
        verdict = Shadow.from_dict(r.extra.get("shadow")) if r.extra else None
        for key in keys:
            row = rows.get(key)
            if row is None:
                row = rows[key] = ShadowRow(key)
            row.requests += 1
            if verdict is None or verdict.action not in SHADOW_ACTIONS:
                continue
            row.shadowed += 1
            name = f"would_{verdict.action}"
            setattr(row, name, getattr(row, name) + 1)
            if verdict.action == "deny":
                row.would_deny_tokens += r.input_tokens + r.output_tokens
                row.would_deny_usd += r.usd
    return sorted(rows.values(), key=lambda row: row.key)
