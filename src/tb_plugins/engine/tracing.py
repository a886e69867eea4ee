"""OpenTelemetry: each decision and settle of a guard recorded on the current span.

When the ``opentelemetry`` API is installed, every :class:`~tb_plugins.engine.guard.BudgetGuard`
gets :func:`record_span` as a listener. On the span that is current when the guard decides or
settles (the application's, or the LLM call's when an instrumentation opened one), if it is
recording, it sets:

* GenAI semantic-convention attributes: ``gen_ai.request.model`` (the model asked for),
  ``gen_ai.response.model`` (the model served), ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens`` and ``gen_ai.usage.cache_read.input_tokens``;
* ``tb.*`` attributes for the decision: ``tb.action`` (``allow``, ``clamp``, ``downgrade``,
  ``deny``), ``tb.model``, ``tb.scopes``, ``tb.reasons``, ``tb.estimate`` (tokens held),
  ``tb.estimate_usd``, ``tb.max_tokens``, ``tb.reservation_id``, ``tb.fail_open``; for a
  settle ``tb.cost_usd`` and ``tb.estimated`` (no usage was reported: the estimate was
  charged); for a refusal ``tb.denied_scope`` and ``tb.denied_budget``;
* a span event for each refusal (``tb.deny``, with the same attributes) and each alert
  (``tb.alert``), so a span that covers several model calls (an agent run) keeps every one
  of them. Decisions and settles are attributes only, the latest call's (the SDK checks every
  value it is given, so they are not written twice); open a span per model call, as GenAI
  instrumentations do, to keep each call's.

Nothing is imported: a span can only be recording once the application (or its SDK) has
imported ``opentelemetry.trace``, so until then the listener returns at once, and a process
that never traces never pays the API's import. Without a recording span the cost is one
context lookup per event.

Example:
    >>> from tb_plugins.engine.tracing import record_span
    >>> record_span("decision", {})  # no recording span: nothing happens
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tb_plugins.engine.alerts import Alert
    from tb_plugins.engine.decision import Charge, Decision
    from tb_plugins.engine.guard import BudgetGuard

__all__ = ["install_tracing", "otel_installed", "record_span"]

_INSTALLED: bool | None = None


def otel_installed() -> bool:
    """Whether the OpenTelemetry API can be imported (looked up once per process)."""
    global _INSTALLED
    if _INSTALLED is None:
        try:
            _INSTALLED = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):
            _INSTALLED = False
    return _INSTALLED


def install_tracing(guard: BudgetGuard) -> None:
    """Add :func:`record_span` to ``guard.listeners`` when OpenTelemetry is installed (the
    guard does it when it is built; remove it from ``guard.listeners`` to turn it off)."""
    if otel_installed() and record_span not in guard.listeners:
        guard.listeners.append(record_span)


def record_span(event: str, data: Mapping[str, Any]) -> None:
    """A guard listener: put the event's attributes on the current span if it is recording."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if event == "decision":
        span.set_attributes(_decision(data["decision"]))
    elif event == "settle":
        span.set_attributes(_settle(data["charge"]))
    elif event == "deny":
        attrs = _deny(data)
        span.set_attributes(attrs)
        span.add_event("tb.deny", attrs)
    elif event == "alert":
        span.add_event("tb.alert", _alert(data["alert"]))


def _decision(d: Decision) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.request.model": d.requested_model,
        "tb.action": d.action,
        "tb.model": d.model,
        "tb.scopes": list(d.scopes),
        "tb.reasons": list(d.reasons),
        "tb.estimate": d.estimate.tokens,
        "tb.reservation_id": d.reservation_id,
    }
    if d.estimate.usd is not None:
        attrs["tb.estimate_usd"] = d.estimate.usd
    if d.max_tokens is not None:
        attrs["tb.max_tokens"] = d.max_tokens
    if d.local:
        attrs["tb.fail_open"] = True
    return attrs


def _settle(c: Charge) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.response.model": c.model,
        "gen_ai.usage.input_tokens": c.input_tokens,
        "gen_ai.usage.output_tokens": c.output_tokens,
        "tb.reservation_id": c.reservation_id,
        "tb.estimated": c.estimated,
    }
    if c.cached_input_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = c.cached_input_tokens
    if c.usd is not None:
        attrs["tb.cost_usd"] = c.usd
    return attrs


def _deny(data: Mapping[str, Any]) -> dict[str, Any]:
    err = data["error"]
    return {
        "gen_ai.request.model": str(data.get("model", "")),
        "tb.action": "deny",
        "tb.scopes": list(data.get("scopes", ())),
        "tb.reasons": [str(err)],
        "tb.denied_scope": str(getattr(err, "scope", "")),
        "tb.denied_budget": str(getattr(err, "budget", "")),
    }


def _alert(a: Alert) -> dict[str, Any]:
    return {
        "tb.alert.kind": a.kind,
        "tb.alert.scope": a.scope,
        "tb.alert.budget": a.budget,
        "tb.alert.window": a.window,
        "tb.alert.utilization": float(a.utilization),
    }
