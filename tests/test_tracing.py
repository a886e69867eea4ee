"""OpenTelemetry: each decision, refusal and settle is recorded on the current span."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is in the [dev] extra")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tb_plugins import BudgetGuard, Usage
from tb_plugins.engine.tracing import install_tracing, record_span
from tb_plugins.errors import BudgetExceeded

POLICY: dict[str, Any] = {
    "ledger": "memory://",
    "alerts": [],
    "budgets": [
        {"scope": "team:search", "tokens": 1_000, "window": "day", "alerts": [0.5]},
        {"scope": "user:*", "limit": "300 tokens/day"},
    ],
}


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A tracer whose finished spans land in memory (its own provider: the global one is
    left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("tb-tests"), exporter
    provider.shutdown()


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_a_guard_has_the_span_listener_once() -> None:
    """A new guard records on spans (OpenTelemetry is installed); installing again adds no
    second listener."""
    guard = BudgetGuard.from_dict(POLICY)
    assert guard.listeners.count(record_span) == 1
    install_tracing(guard)
    assert guard.listeners.count(record_span) == 1


def test_decision_and_settle_set_genai_and_tb_attributes(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    """A check and its settle inside a span put the GenAI usage attributes and the tb
    decision attributes on it."""
    tracer, exporter = spans
    guard = BudgetGuard.from_dict(POLICY)
    with tracer.start_as_current_span("llm call"):
        d = guard.check(
            model="gpt-4o", input_tokens=40, max_tokens=60, scopes=["team:search", "user:ann"]
        )
        charge = guard.settle(d, Usage(40, 25, cached_input_tokens=8, model="gpt-4o-2024-08-06"))
    span = only(exporter)
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.request.model"] == "gpt-4o"
    assert attrs["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attrs["gen_ai.usage.input_tokens"] == 40
    assert attrs["gen_ai.usage.output_tokens"] == 25
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 8
    assert attrs["tb.action"] == "allow"
    assert attrs["tb.model"] == "gpt-4o"
    assert attrs["tb.scopes"] == ("global", "team:search", "user:ann")
    assert attrs["tb.reasons"] == ()
    assert attrs["tb.estimate"] == 100
    assert attrs["tb.max_tokens"] == 60
    assert attrs["tb.reservation_id"] == d.reservation_id
    assert attrs["tb.cost_usd"] == pytest.approx(charge.usd)
    assert attrs["tb.estimated"] is False
    assert span.events == ()  # decisions and settles are attributes only


def test_clamp_and_deny_are_recorded_with_their_reasons(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    """A clamped call records the lowered max_tokens and why; a refusal records `deny`, the
    budget and scope that refused, and a `tb.deny` event."""
    tracer, exporter = spans
    guard = BudgetGuard.from_dict(POLICY)
    with tracer.start_as_current_span("clamped"):
        d = guard.check(model="gpt-4o", input_tokens=100, max_tokens=500, scopes=["user:bo"])
        guard.settle(d, Usage(100, d.max_tokens or 0))
    with tracer.start_as_current_span("refused"), pytest.raises(BudgetExceeded):
        guard.check(model="gpt-4o", input_tokens=100, max_tokens=50, scopes=["user:bo"])
    clamped, refused = exporter.get_finished_spans()
    c = dict(clamped.attributes or {})
    assert c["tb.action"] == "clamp" and c["tb.max_tokens"] == 200
    assert any("max_tokens lowered" in r for r in c["tb.reasons"])  # type: ignore[union-attr]
    r = dict(refused.attributes or {})
    assert r["tb.action"] == "deny"
    assert r["tb.denied_scope"] == "user:bo"
    assert r["tb.denied_budget"] == "user:* 300 tokens/day"
    assert r["tb.scopes"] == ("global", "user:bo")
    assert "exhausted" in r["tb.reasons"][0]  # type: ignore[index]
    assert [e.name for e in refused.events] == ["tb.deny"]


async def test_async_calls_record_on_the_span_of_their_task(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    """acheck and asettle record on the span current in the task that awaits them."""
    tracer, exporter = spans
    guard = BudgetGuard.from_dict(POLICY)
    with tracer.start_as_current_span("async call"):
        d = await guard.acheck(model="gpt-4o-mini", input_tokens=10, max_tokens=10)
        await guard.asettle(d, Usage(10, 3))
    attrs = dict(only(exporter).attributes or {})
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.output_tokens"] == 3


def test_a_span_over_several_calls_keeps_each_refusal_and_alert_and_the_latest_call(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    """An agent run's span covering several calls has an event for the threshold alert a
    call crossed and one per refusal; its attributes are the last call's."""
    tracer, exporter = spans
    guard = BudgetGuard.from_dict(POLICY)
    with tracer.start_as_current_span("agent run"):
        for n in (100, 200, 300):
            d = guard.check(model="gpt-4o", input_tokens=n, max_tokens=1, scopes=["team:search"])
            guard.settle(d, Usage(n, 1))
        for _ in range(2):
            with pytest.raises(BudgetExceeded):
                guard.check(model="gpt-4o", input_tokens=900, scopes=["team:search"])
    span = only(exporter)
    names = [e.name for e in span.events]
    assert names == ["tb.alert", "tb.deny", "tb.deny"]
    alert = span.events[0]
    assert dict(alert.attributes or {})["tb.alert.scope"] == "team:search"
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.usage.input_tokens"] == 300 and attrs["tb.action"] == "deny"


def test_no_recording_span_means_nothing_is_recorded(
    spans: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    """Outside any span, or in a span that is not sampled, the guard decides as usual and
    records nothing."""
    _tracer, exporter = spans
    guard = BudgetGuard.from_dict(POLICY)
    d = guard.check(model="gpt-4o", input_tokens=5, max_tokens=5)
    guard.settle(d, Usage(5, 5))
    with trace.use_span(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)):
        guard.settle(guard.check(model="gpt-4o", input_tokens=5, max_tokens=5), Usage(5, 5))
    assert exporter.get_finished_spans() == ()
