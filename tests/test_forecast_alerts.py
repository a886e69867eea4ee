"""`forecast` alerts: a budget on course to run out before it resets alerts once per window,
across processes sharing the ledger; a budget spending slowly, or idle, does not."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import make_ledger
from tb_plugins import BudgetExceeded, BudgetGuard, Usage
from tb_plugins.engine.alerting import FORECAST_CHECK_SECONDS
from tb_plugins.engine.alerts import Alert, SlackSink
from tb_plugins.ledger import Ledger

DAY = datetime(2026, 9, 22, tzinfo=timezone.utc).timestamp()  # a UTC midnight
HOUR = 3600.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, ledger: Ledger, sink: list[Alert], **budget: Any) -> BudgetGuard:
    b = {"scope": "team:a", "limit": "10k tokens/day", "alerts": [0.9], **budget}
    data: dict[str, Any] = {"ledger": "memory://", "alerts": [], "budgets": [b]}
    return BudgetGuard.from_dict(data, clock=clock, ledger=ledger, alert_sinks=[sink.append])


def spend(guard: BudgetGuard, clock: Clock, at: float, tokens: int) -> None:
    clock.t = at
    d = guard.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=["team:a"])
    guard.settle(d, Usage(input_tokens=tokens, output_tokens=0))


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_fast_linear_spend_alerts_once_with_when(backend: str, tmp_path: Path) -> None:
    """1,000 tokens an hour on a 10k/day budget runs out long before midnight: one forecast
    alert saying when (the trailing hour holds two calls at its edges: 2,000 an hour, so about
    05:00), then no more that day, and again the next day if the pace holds."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    guard = make(clock, make_ledger(backend, tmp_path), alerts)
    for h in range(4):
        spend(guard, clock, DAY + h * HOUR + 60, 1000)
    forecasts = [a for a in alerts if a.kind == "forecast"]
    assert len(forecasts) == 1
    (a,) = forecasts
    assert a.forecast_exhausted_at is not None
    assert a.ts == DAY + HOUR + 60  # the first check once the window has run an hour
    assert a.forecast_exhausted_at == DAY + HOUR + 60 + 8000 / 2000 * HOUR
    assert "will be spent by 2026-09-22 05:01 UTC" in a.message and "team:a" in a.message
    assert a.to_dict()["forecast_exhausted_at"] == a.forecast_exhausted_at
    for h in range(4, 8):
        spend(guard, clock, DAY + h * HOUR + 60, 500)
    assert len([a for a in alerts if a.kind == "forecast"]) == 1  # once per window
    for h in range(4):
        spend(guard, clock, DAY + 24 * HOUR + h * HOUR + 60, 1000)
    assert len([a for a in alerts if a.kind == "forecast"]) == 2  # the next day's window


def test_slow_spend_and_idle_spend_do_not_alert(tmp_path: Path) -> None:
    """100 tokens an hour never runs out before midnight; a burst long ago, then nothing in
    the trailing hour, has no burn rate."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    guard = make(clock, make_ledger("memory", tmp_path), alerts)
    for h in range(10):
        spend(guard, clock, DAY + h * HOUR + 60, 100)
    assert [a for a in alerts if a.kind == "forecast"] == []

    other: list[Alert] = []
    guard2 = make(clock, make_ledger("memory", tmp_path), other)
    spend(guard2, clock, DAY + 60, 2000)  # a burst in the first minute is not extrapolated
    spend(guard2, clock, DAY + 1.5 * HOUR, 10)  # and has left the trailing hour since
    assert [a for a in other if a.kind == "forecast"] == []
    guard3 = make(clock, make_ledger("memory", tmp_path), other)
    spend(guard3, clock, DAY + 60, 10)
    spend(guard3, clock, DAY + 10 * HOUR, 10)  # idle since: trailing hour has 10 tokens
    assert [a for a in other if a.kind == "forecast"] == []


def test_a_budget_without_alert_thresholds_and_total_windows_never_forecast(
    tmp_path: Path,
) -> None:
    """Forecast alerts come with `alerts:`; a `total` budget never resets, so has none."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    guard = make(clock, make_ledger("memory", tmp_path), alerts, alerts=[])
    spend(guard, clock, DAY + 60, 5000)
    guard = make(clock, make_ledger("memory", tmp_path), alerts, limit="10k tokens/total")
    spend(guard, clock, DAY + 60, 5000)
    assert alerts == []


def test_a_process_checks_a_line_at_most_every_few_minutes(tmp_path: Path) -> None:
    """Between two checks of a line's forecast the settle reads no usage log; a budget
    under 10 % used is not read at all."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    ledger = make_ledger("memory", tmp_path)
    reads: list[Any] = []
    real = ledger.usage

    def counting(**kw: Any) -> Any:
        reads.append(kw)
        return real(**kw)

    ledger.usage = counting  # type: ignore[method-assign]
    guard = make(clock, ledger, alerts)
    start = DAY + 2 * HOUR  # past the window's first hour, when forecasts begin
    spend(guard, clock, start, 1100)  # past FORECAST_MIN_UTILIZATION (10 %)
    spend(guard, clock, start + 60, 10)
    spend(guard, clock, start + FORECAST_CHECK_SECONDS, 10)
    assert len(reads) == 2
    quiet = make(clock, make_ledger("memory", tmp_path), alerts, limit="1M tokens/day")
    quiet.ledger.usage = counting  # type: ignore[method-assign]
    spend(quiet, clock, start + 2 * FORECAST_CHECK_SECONDS, 5000)  # 0.5 % used
    assert len(reads) == 2


def test_two_guards_sharing_a_ledger_alert_once(tmp_path: Path) -> None:
    """The ledger's claim makes the forecast alert once per budget per window, whichever
    process sees it first."""
    clock = Clock(DAY)
    ledger = make_ledger("sqlite", tmp_path)
    a_alerts: list[Alert] = []
    b_alerts: list[Alert] = []
    a = make(clock, ledger, a_alerts)
    b = make(clock, ledger, b_alerts)
    for h in range(4):
        spend(a, clock, DAY + h * HOUR + 60, 500)
        spend(b, clock, DAY + h * HOUR + 120, 500)
    kinds = [x.kind for x in a_alerts + b_alerts]
    assert kinds.count("forecast") == 1


def test_slack_payload_carries_the_forecast() -> None:
    """The Slack body names budget, scope, use, reset and when it runs out."""
    alert = Alert(
        scope="team:search", budget="team:* 10,000 tokens/day", window="day", threshold=0.0,
        utilization=0.4, resets_at=DAY + 24 * HOUR, ts=DAY + 4 * HOUR, kind="forecast",
        forecast_exhausted_at=DAY + 14 * HOUR + 20 * 60, unit="tokens", spent=4000.0,
        limit=10000.0,
    )  # fmt: skip
    body = SlackSink("https://hooks.slack.com/services/T/B/X").payload(alert)
    text = str(body)
    for part in ("team:search", "10,000 tokens/day", "40% used: 4,000 of 10,000 tokens",
                 "14:20 UTC", "resets 2026-09-23"):  # fmt: skip
        assert part in text


def test_real_alerts_carry_spend_and_limit(tmp_path: Path) -> None:
    """Threshold, forecast and exhausted alerts from a guard name the spend and the limit."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    guard = make(clock, make_ledger("memory", tmp_path), alerts, limit="$1/day")
    clock.t = DAY + 2 * HOUR
    d = guard.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=["team:a"])
    guard.settle(d, Usage(input_tokens=380_000, output_tokens=0))  # $0.95 of gpt-4o input
    by_kind = {a.kind: a for a in alerts}
    assert by_kind["threshold"].unit == "usd" and by_kind["threshold"].limit == 1.0
    assert "used: $0.95 of $1.00" in by_kind["threshold"].message
    assert "forecast" in by_kind
    with pytest.raises(BudgetExceeded):
        guard.check(model="gpt-4o", input_tokens=100_000, max_tokens=1, scopes=["team:a"])
    exhausted = next(a for a in alerts if a.kind == "exhausted")
    assert "of $1.00" in exhausted.message


def test_status_of_many_scopes_reads_the_log_once_and_forecasts_the_same(tmp_path: Path) -> None:
    """Forecasts for 12 users come from one usage-log read, equal to each user's own."""
    clock = Clock(DAY + 5 * HOUR)
    data: dict[str, Any] = {
        "ledger": "memory://",
        "alerts": [],
        "budgets": [{"scope": "user:*", "limit": "50k tokens/day"}],
    }
    ledger = make_ledger("memory", tmp_path)
    guard = BudgetGuard.from_dict(data, clock=clock, ledger=ledger)
    for i in range(12):
        clock.t = DAY + 5 * HOUR - 1800 + i
        d = guard.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=[f"user:u{i}"])
        guard.settle(d, Usage(input_tokens=3000 + 100 * i, output_tokens=0))
    clock.t = DAY + 5 * HOUR
    reads: list[Any] = []
    real = ledger.usage

    def counting(**kw: Any) -> Any:
        reads.append(kw)
        return real(**kw)

    ledger.usage = counting  # type: ignore[method-assign]
    together = {s.scope: s.forecast_exhausted_at for s in guard.status()}
    assert len(reads) == 1 and reads[0].get("scope") is None
    alone = {f"user:u{i}": guard.status(f"user:u{i}")[0].forecast_exhausted_at for i in range(12)}
    assert {k: v for k, v in together.items() if k != "global"} == alone
    assert all(v is not None for v in alone.values())


def test_a_rolling_window_sends_its_exhausted_alert_once_per_window_length(
    tmp_path: Path,
) -> None:
    """A rolling window's bucket moves every few seconds; its alerts are still once per
    window length, not once per bucket (a throttled call retries every second)."""
    clock = Clock(DAY)
    alerts: list[Alert] = []
    guard = make(clock, make_ledger("memory", tmp_path), alerts, limit="100 tokens/rolling:1m")
    spend(guard, clock, DAY + 1, 100)
    for i in range(2, 30):
        clock.t = DAY + i
        with pytest.raises(BudgetExceeded):
            guard.check(model="gpt-4o", input_tokens=5, max_tokens=1, scopes=["team:a"])
    assert [a.kind for a in alerts].count("exhausted") == 1
