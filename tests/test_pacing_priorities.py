"""Pacing (``pace: even`` + ``burst``) and priorities (``stop_at``): effective limits made per
call at plan time, on an injected clock, with the ledger unchanged."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from typing import Any

import pytest
from litellm.proxy._types import UserAPIKeyAuth

from tb_plugins import BudgetGuard, Usage
from tb_plugins.core.pacing import allowance
from tb_plugins.errors import BudgetExceeded, ConfigError
from tb_plugins.integrations.langchain.adapters import metadata_priority
from tb_plugins.integrations.litellm.proxy_scopes import key_priority
from tb_plugins.integrations.litellm_proxy import TokenBudgetProxyHandler

DAY = 86400.0
MIDNIGHT = 100 * DAY  # 1970-04-11 00:00 UTC


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def guard_for(budget: dict[str, Any], clock: Clock) -> BudgetGuard:
    return BudgetGuard.from_dict(
        {"ledger": "memory://", "budgets": [{"scope": "team:a", "window": "day", **budget}]},
        clock=clock,
    )


def spend_until_refused(guard: BudgetGuard, priority: str = "normal") -> tuple[int, Exception]:
    """Calls of 400 input + up to 100 output tokens until one is refused: tokens charged."""
    spent = 0
    while True:
        try:
            d = guard.check(
                "gpt-4o", input_tokens=400, max_tokens=100, scopes=["team:a"], priority=priority
            )
        except BudgetExceeded as err:
            return spent, err
        out = d.max_tokens if d.max_tokens is not None else 100
        spent += guard.settle(d, Usage(400, out)).tokens


def test_paced_spend_follows_the_allowance_through_the_day() -> None:
    """A caller that spends as fast as it may, every 20 minutes through a day, stays under
    limit x (elapsed share + burst) and within one call of it."""
    clock = Clock(MIDNIGHT)
    guard = guard_for({"tokens": 24_000, "pace": "even", "burst": 0.1}, clock)
    total = 0
    for step in range(72):
        clock.t = MIDNIGHT + step * 1200
        got, _ = spend_until_refused(guard)
        total += got
        allowed = allowance(24_000, 1.0, 0.1, elapsed=clock.t - MIDNIGHT, length=DAY)
        assert total <= allowed
        assert total >= allowed - 500  # the paced allowance is used up to one call
    assert total <= 24_000
    assert guard.status("team:a")[0].spent == total


def test_refusal_says_when_the_allowance_admits_the_call() -> None:
    """A paced refusal's resets_at is the first second the allowance covers spent + needed:
    the same call is refused a second before and admitted then."""
    clock = Clock(MIDNIGHT + 3600)
    guard = guard_for({"tokens": 24_000, "pace": "even", "burst": 0.1}, clock)
    spend_until_refused(guard)
    with pytest.raises(BudgetExceeded) as info:
        guard.check("gpt-4o", input_tokens=400, max_tokens=16, scopes=["team:a"])
    err = info.value
    assert err.resets_at is not None and clock.t < err.resets_at < MIDNIGHT + DAY
    assert "allowance admits it at" in str(err)
    needed = err.spent + err.requested
    assert allowance(24_000, 1.0, 0.1, elapsed=err.resets_at - MIDNIGHT, length=DAY) >= needed
    assert allowance(24_000, 1.0, 0.1, elapsed=err.resets_at - 1 - MIDNIGHT, length=DAY) < needed
    clock.t = err.resets_at - 1
    with pytest.raises(BudgetExceeded):
        guard.check("gpt-4o", input_tokens=400, max_tokens=16, scopes=["team:a"])
    clock.t = err.resets_at
    assert guard.check("gpt-4o", input_tokens=400, max_tokens=16, scopes=["team:a"])


def test_low_priority_stops_first_and_critical_uses_the_rest() -> None:
    """Under one team budget, low calls stop at 60 %, normal at 90 %, critical at the limit;
    a low refusal waits for the window to reset."""
    clock = Clock(MIDNIGHT + 600)
    guard = guard_for({"tokens": 10_000, "stop_at": {"low": 0.6, "normal": 0.9}}, clock)
    low, err = spend_until_refused(guard, "low")
    assert 6_000 - 500 <= low <= 6_000
    assert isinstance(err, BudgetExceeded) and err.resets_at == MIDNIGHT + DAY
    normal, _ = spend_until_refused(guard, "normal")
    assert 9_000 - 500 <= low + normal <= 9_000
    critical, _ = spend_until_refused(guard, "critical")
    assert 10_000 - 500 <= low + normal + critical <= 10_000
    status = guard.status("team:a")[0]
    assert status.limit == 10_000  # status shows the budget, not a priority's share


def test_priorities_share_a_paced_allowance() -> None:
    """Paced and with stop_at, a low call may use its fraction of the paced allowance."""
    clock = Clock(MIDNIGHT + DAY / 2)
    guard = guard_for({"tokens": 10_000, "pace": "even", "stop_at": {"low": 0.5}}, clock)
    low, _ = spend_until_refused(guard, "low")
    assert 2_500 - 500 <= low <= 2_500
    rest, _ = spend_until_refused(guard)
    assert 5_000 - 500 <= low + rest <= 5_000


def test_a_policy_without_pacing_plans_the_same_cached_lines() -> None:
    """No pace and no stop_at: the planner hands back its cached lines as they are."""
    guard = guard_for({"tokens": 10_000}, Clock(MIDNIGHT))
    path = guard.planner.scope_path(["team:a"])
    lines = guard.planner.lines(path, MIDNIGHT)
    assert guard.planner.lines(path, MIDNIGHT + 1, priority="low") is lines


def test_priority_must_be_a_known_one() -> None:
    """guard.check refuses a priority it does not know."""
    guard = guard_for({"tokens": 10_000, "stop_at": {"low": 0.5}}, Clock(MIDNIGHT))
    with pytest.raises(ValueError, match="priority"):
        guard.check("gpt-4o", input_tokens=1, max_tokens=1, scopes=["team:a"], priority="urgent")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"pace": "even", "window": "total"}, "pace"),
        ({"pace": "even", "window": "rolling:1h"}, "pace"),
        ({"burst": 0.1}, "burst"),
        ({"pace": "even", "burst": 1.0}, "burst"),
        ({"stop_at": {"urgent": 0.5}}, "urgent"),
        ({"stop_at": {"low": 1.5}}, "low"),
    ],
)
def test_bad_pace_or_stop_at_is_refused(extra: dict[str, Any], field: str) -> None:
    """Pacing needs a calendar window; burst needs pace; stop_at takes known priorities and
    fractions."""
    with pytest.raises(ConfigError, match=field):
        guard_for({"tokens": 1000, **extra}, Clock(MIDNIGHT))


def test_langchain_priority_comes_from_run_metadata() -> None:
    """Run metadata tb_priority (set by the app) names the priority; absent or unknown is
    normal."""
    assert metadata_priority({"tb_priority": "critical"}) == "critical"
    assert metadata_priority({}) == "normal"
    assert metadata_priority({"tb_priority": "top"}) == "normal"


def test_proxy_priority_comes_from_the_key_metadata_only() -> None:
    """The proxy reads tb_priority from the key's, then its team's, server-side metadata."""
    assert key_priority(UserAPIKeyAuth(api_key="sk", metadata={"tb_priority": "low"})) == "low"
    team = UserAPIKeyAuth(api_key="sk", team_metadata={"tb_priority": "critical"})
    assert key_priority(team) == "critical"
    assert key_priority(UserAPIKeyAuth(api_key="sk")) == "normal"


async def test_proxy_client_cannot_raise_its_priority() -> None:
    """A client that sends a priority header, body field and metadata is still held to its
    key's priority (normal: stop at 50 %); a key whose metadata says critical is not."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "budgets": [
                {"scope": "key:*", "tokens": 1000, "window": "day", "stop_at": {"normal": 0.5}}
            ],
        }
    )
    handler = TokenBudgetProxyHandler(guard)

    def request() -> dict[str, Any]:
        return {
            "model": "gpt-4o",
            "max_tokens": 600,
            "messages": [{"role": "user", "content": "hello"}],
            "priority": "critical",
            "tb_priority": "critical",
            "metadata": {"tb_priority": "critical"},
            "proxy_server_request": {
                "headers": {"x-tb-priority": "critical", "tb_priority": "critical"},
                "body": {"tb_priority": "critical"},
            },
        }

    plain = UserAPIKeyAuth(api_key="sk-plain", key_alias="plain")
    data = request()
    out = await handler.async_pre_call_hook(plain, None, data, "acompletion")
    assert (out or data)["max_tokens"] < 500  # clamped to the normal share, not raised
    trusted = UserAPIKeyAuth(
        api_key="sk-crit", key_alias="crit", metadata={"tb_priority": "critical"}
    )
    data = request()
    out = await handler.async_pre_call_hook(trusted, None, data, "acompletion")
    assert (out or data)["max_tokens"] == 600


def test_langchain_run_metadata_sets_the_priority() -> None:
    """Through a real LangChain model, run metadata tb_priority=low stops the call at its
    share while the same call with critical priority goes on."""
    from tb_plugins.integrations.langchain import BudgetExceededError, TokenBudgetCallbackHandler
    from tb_plugins.testing.fake_chat_model import FakeChatModel

    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "default_output_tokens": 64,
            "budgets": [
                {"scope": "team:a", "tokens": 150, "window": "day", "stop_at": {"low": 0.2}}
            ],
        },
        clock=Clock(MIDNIGHT),
    )
    handler = TokenBudgetCallbackHandler(guard, scopes=["team:a"])
    model = FakeChatModel(model="gpt-4o", responses=["ok"] * 2)
    with pytest.raises(BudgetExceededError):
        model.invoke("hi", {"callbacks": [handler], "metadata": {"tb_priority": "low"}})
    assert model.call_count == 0
    model.invoke("hi", {"callbacks": [handler], "metadata": {"tb_priority": "critical"}})
    assert model.call_count == 1
