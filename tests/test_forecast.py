"""`BudgetStatus.forecast_exhausted_at`: when a budget runs out at the burn rate of the trailing
period (the last hour, or the window so far), and `tb status` showing it in 80 columns."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import make_ledger
from tb_plugins import BudgetGuard, Usage
from tb_plugins.cli import main
from tb_plugins.core.usage import UsageRow
from tb_plugins.engine.decision import (
    FORECAST_TRAILING_SECONDS,
    BudgetStatus,
    forecast_queries,
    with_forecasts,
)
from tb_plugins.ledger import Ledger

DAY = datetime(2026, 9, 22, tzinfo=timezone.utc).timestamp()  # a UTC midnight
HOUR = 3600.0
MSGS = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, limit: str = "100k tokens/day", ledger: Ledger | None = None) -> BudgetGuard:
    budget: dict[str, Any] = {"scope": "team:a", "limit": limit}
    if "/" not in limit:
        budget = {"scope": "team:a", "tokens": limit.split()[0], "window": "total"}
    data: dict[str, Any] = {"ledger": "memory://", "alerts": [], "budgets": [budget]}
    return BudgetGuard.from_dict(data, clock=clock, ledger=ledger)


def spend(guard: BudgetGuard, clock: Clock, at: float, tokens: int) -> None:
    clock.t = at
    d = guard.check(model="gpt-4o", messages=MSGS, max_tokens=1, scopes=["team:a"])
    guard.settle(d, Usage(input_tokens=tokens, output_tokens=0))


def forecast(guard: BudgetGuard, clock: Clock, at: float, unit: str = "tokens") -> float | None:
    clock.t = at
    (s,) = [s for s in guard.status("team:a") if s.unit == unit]
    return s.forecast_exhausted_at


# The embedded ledgers only: a guard on Redis or PostgreSQL follows the server's clock, which
# a test clock cannot move hours ahead.
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_steady_rate_forecasts_the_analytic_time(backend: str, tmp_path: Path) -> None:
    """100 tokens a minute for two hours, then 88,000 of 100,000 left: the forecast is
    88,000 / (100/60) seconds on, within a second, on every embedded ledger backend."""
    ledger = make_ledger(backend, tmp_path)
    clock = Clock(DAY)
    guard = make(clock, ledger=ledger)
    start = DAY + 6 * HOUR
    for k in range(120):
        spend(guard, clock, start + 60 * k + 30, 100)
    now = start + 2 * HOUR
    assert forecast(guard, clock, now) == pytest.approx(now + 88_000 / (100 / 60), abs=1.0)


def test_a_burst_outside_the_trailing_hour_does_not_count_and_a_recent_one_does() -> None:
    """50,000 tokens five hours ago set no rate; 6,000 in the last hour do, and the forecast
    extrapolates those alone over what is left (100,000 - 56,000)."""
    clock = Clock(DAY)
    guard = make(clock)
    spend(guard, clock, DAY + 1 * HOUR, 50_000)
    assert forecast(guard, clock, DAY + 6 * HOUR) is None
    spend(guard, clock, DAY + 5.5 * HOUR, 6_000)
    now = DAY + 6 * HOUR
    assert forecast(guard, clock, now) == pytest.approx(now + 44_000 / (6_000 / HOUR), abs=1.0)


def test_no_recent_spend_forecasts_none() -> None:
    """A budget half spent hours ago and idle since is not on course to run out."""
    clock = Clock(DAY)
    guard = make(clock)
    spend(guard, clock, DAY + 1 * HOUR, 50_000)
    assert forecast(guard, clock, DAY + 3 * HOUR) is None


def test_running_out_only_after_the_reset_forecasts_none() -> None:
    """1,000 tokens an hour with 99,000 left needs 99 hours: past midnight, so None."""
    clock = Clock(DAY)
    guard = make(clock)
    spend(guard, clock, DAY + 20 * HOUR, 1_000)
    assert forecast(guard, clock, DAY + 20.5 * HOUR) is None


def test_an_exhausted_budget_forecasts_now() -> None:
    """A spent limit has already run out: its forecast is the status time itself, whether or
    not it was spent recently."""
    clock = Clock(DAY)
    guard = make(clock, "1k tokens/day")
    spend(guard, clock, DAY + 1 * HOUR, 1_000)
    assert forecast(guard, clock, DAY + 1 * HOUR + 10) == DAY + 1 * HOUR + 10
    assert forecast(guard, clock, DAY + 9 * HOUR) == DAY + 9 * HOUR


def test_a_window_younger_than_an_hour_takes_its_rate_from_the_window_so_far() -> None:
    """Ten minutes into the day, the rate is today's spend over ten minutes; yesterday's spend
    half an hour ago does not count."""
    clock = Clock(DAY)
    guard = make(clock)
    spend(guard, clock, DAY - 0.5 * HOUR, 90_000)
    spend(guard, clock, DAY + 300, 1_000)
    now = DAY + 600
    assert forecast(guard, clock, now) == pytest.approx(now + 99_000 / (1_000 / 600), abs=1.0)


def test_a_total_budget_forecasts_at_any_distance_but_only_with_a_recent_rate() -> None:
    """A `total` budget never resets: any forecast stands, however far; without spend in the
    last hour it is None."""
    clock = Clock(DAY)
    guard = make(clock, "1M tokens")
    spend(guard, clock, DAY, 1_000)
    assert forecast(guard, clock, DAY + 2 * HOUR) is None
    spend(guard, clock, DAY + 2 * HOUR, 1_000)
    now = DAY + 2.5 * HOUR
    assert forecast(guard, clock, now) == pytest.approx(now + 998_000 * HOUR / 1_000, abs=1.0)


def test_astatus_forecasts_as_status_does() -> None:
    """The async twin reads the same rate and gives the same forecast."""
    clock = Clock(DAY)
    guard = make(clock)
    spend(guard, clock, DAY + 5.5 * HOUR, 6_000)
    clock.t = DAY + 6 * HOUR
    assert asyncio.run(guard.astatus("team:a")) == guard.status("team:a")
    assert guard.status("team:a")[0].forecast_exhausted_at is not None


def status_of(unit: str, remaining: float = 1.0) -> BudgetStatus:
    return BudgetStatus(
        scope="team:a",
        budget="b",
        window="day",
        unit=unit,
        spent=100.0 - remaining,
        reserved=0.0,
        limit=100.0,
        remaining=remaining,
        utilization=(100.0 - remaining) / 100.0,
        window_start=DAY,
        resets_at=DAY + 24 * HOUR,
    )


@pytest.mark.parametrize(
    ("unit", "per_hour"),
    [
        ("tokens", 10.0),  # input 4 + output 6
        ("input_tokens", 4.0),
        ("output_tokens", 6.0),
        ("usd", 0.5),
        ("requests", 2.0),
        ("calls", 2.0),  # calls are counted from the requests of the usage row
    ],
)
def test_each_unit_takes_its_rate_from_its_field_of_the_usage_row(
    unit: str, per_hour: float
) -> None:
    """The recent spend of a limit is its unit's amount in the scope's usage row; rows of
    other scopes are ignored."""
    now = DAY + 6 * HOUR
    s = status_of(unit)
    (query,) = forecast_queries([s], now)
    assert query == ("team:a", now - FORECAST_TRAILING_SECONDS)
    row = UsageRow("team:a", 2, 0, 4, 6, 0, 0.5)
    other = UsageRow("user:x", 99, 0, 99, 99, 0, 99.0)
    (out,) = with_forecasts([s], {query: [other, row]}, now)
    assert out.forecast_exhausted_at == pytest.approx(now + 1.0 / per_hour * HOUR)


def test_to_dict_stays_json_ready_with_the_forecast() -> None:
    """`to_dict` carries the forecast in epoch seconds and ISO 8601 (None as null)."""
    s = status_of("tokens")
    assert json.loads(json.dumps(s.to_dict()))["forecast_exhausted_at_iso"] is None
    d = with_forecasts([s], {}, DAY + HOUR)[0]
    assert d.forecast_exhausted_at is None
    spent = BudgetStatus(**{**s.__dict__, "remaining": 0.0, "forecast_exhausted_at": DAY})
    assert spent.to_dict()["forecast_exhausted_at_iso"] == "2026-09-22T00:00:00+00:00"


LONG_TEAM = "team:" + "search-and-retrieval-platform-" * 3 + "emea"
LONG_USER = "user:a.very.long.user.name.from.the.identity.provider@example.com"

POLICY = f"""
ledger: sqlite:///{{db}}
alerts: []
budgets:
  - scope: {LONG_TEAM}
    tokens: 10k
    window: total
  - scope: {LONG_TEAM}
    limit: 2,000,000 output_tokens/month
  - scope: user:*
    limit: $1,000/week
  - scope: team:s
    limit: 10k tokens/day
"""


@pytest.fixture
def long_policy(tmp_path: Path) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    guard = BudgetGuard.from_config(path)
    d = guard.check(model="gpt-4o", messages=MSGS, max_tokens=10, scopes=[LONG_TEAM, LONG_USER])
    guard.settle(d, Usage(9_000, 100))
    guard.close()
    return path


def test_status_table_fits_80_columns_with_long_scope_names(
    long_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every line of `tb status` is at most 80 characters; a scope too long for its row is
    printed whole on lines of its own; each budget has a bar and, spent fast, a forecast."""
    assert main(["--config", str(long_policy), "status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), out
    assert LONG_TEAM in out.replace("\n", "") and LONG_USER in out
    total = next(line for line in lines if "10,000 tokens total" in line)
    assert "[#########-]" in total and not total.endswith(" -")  # runs out soon: a time
    assert any(line.startswith("team:s ") for line in lines)  # short names keep their row


def test_status_json_carries_the_forecast(
    long_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb status --json` has `forecast_exhausted_at` and its ISO form for each budget."""
    assert main(["--config", str(long_policy), "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (total,) = [r for r in rows if r["window"] == "total"]
    assert total["forecast_exhausted_at"] > 0 and total["forecast_exhausted_at_iso"]
    assert all("forecast_exhausted_at_iso" in r for r in rows)
