"""``on_exhausted: wait:<max>``: a refused call waits for its short window to make room, sync
and async, through the guard, the LangChain middleware and the proxy's pre-call hook; the
clock and the sleep are injected (one test waits a few real milliseconds on a real loop)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tb_plugins import BudgetExceeded, BudgetGuard, ConfigError

NOW = 1_800_000_000.0  # the start of a minute and of an hour


class FakeTime:
    """A test clock with the sleeps that advance it, recording each wait."""

    def __init__(self) -> None:
        self.t = NOW
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


def make_guard(budget: dict[str, Any], clock: FakeTime, **policy: Any) -> BudgetGuard:
    guard = BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": [], "budgets": [budget], **policy}, clock=clock
    )
    guard.sleep = clock.sleep
    guard.asleep = clock.asleep
    return guard


def call(guard: BudgetGuard, scope: str = "user:a") -> None:
    """One 50-token call (40 in, 10 out), settled at its estimate."""
    d = guard.check("gpt-4o", input_tokens=40, max_tokens=10, scopes=[scope], adjust=False)
    guard.settle(d)


ROLLING = {"scope": "user:*", "limit": "100 tokens/rolling:1m", "on_exhausted": "wait:2m"}


def test_burst_on_a_rolling_minute_is_admitted_over_time() -> None:
    """Five 50-token calls on 100 tokens/rolling:1m all go through, spread over the window."""
    clock = FakeTime()
    guard = make_guard(ROLLING, clock)
    for _ in range(5):
        call(guard)
    assert clock.sleeps, "the third call had to wait"
    assert 60 <= clock.t - NOW <= 2 * 61
    assert all(0 < s <= 120 for s in clock.sleeps)


def test_without_wait_the_same_burst_is_refused() -> None:
    """The default (deny) refuses the third call at once, without sleeping."""
    clock = FakeTime()
    guard = make_guard({**ROLLING, "on_exhausted": "deny"}, clock)
    call(guard)
    call(guard)
    with pytest.raises(BudgetExceeded) as info:
        call(guard)
    assert clock.sleeps == [] and "waiting" not in str(info.value)


def test_a_call_that_cannot_fit_within_max_is_refused_saying_it_waited() -> None:
    """A minute window resetting in 60 s with wait:5s: the call waits 5 s, then is refused."""
    clock = FakeTime()
    guard = make_guard(
        {"scope": "global", "limit": "100 tokens/minute", "on_exhausted": "wait:5s"}, clock
    )
    call(guard)
    call(guard)
    with pytest.raises(BudgetExceeded) as info:
        call(guard)
    assert clock.sleeps == [5.0]
    assert str(info.value).endswith("refused after waiting 5 s")
    assert info.value.to_dict()["message"] == str(info.value)
    assert info.value.resets_at == NOW + 60


def test_a_paced_budget_waits_until_its_allowance_admits_the_call() -> None:
    """pace: even over an hour: the call waits until the allowance grows enough, then fits."""
    clock = FakeTime()
    budget = {"scope": "global", "limit": "3600 tokens/hour", "pace": "even", "burst": 0.1,
              "on_exhausted": "wait:10m"}  # fmt: skip
    guard = make_guard(budget, clock)
    d = guard.check("gpt-4o", input_tokens=300, max_tokens=10, adjust=False)
    guard.settle(d)
    d = guard.check("gpt-4o", input_tokens=300, max_tokens=10, adjust=False)
    assert d.action == "allow"
    assert len(clock.sleeps) >= 1 and 0 < clock.t - NOW <= 600
    # 360 burst + 1 token/s: 620 tokens are allowed 260 s in
    assert clock.t - NOW == pytest.approx(260, abs=1)


def test_a_call_bigger_than_the_whole_limit_is_refused_at_once() -> None:
    """Waiting cannot help a call that needs more than the limit: no sleep."""
    clock = FakeTime()
    guard = make_guard(ROLLING, clock)
    with pytest.raises(BudgetExceeded):
        guard.check("gpt-4o", input_tokens=400, max_tokens=10, scopes=["user:a"], adjust=False)
    assert clock.sleeps == []


async def test_acheck_waits_with_the_injected_async_sleep() -> None:
    """The async twin admits the same burst over time, awaiting its sleep."""
    clock = FakeTime()
    guard = make_guard(ROLLING, clock)
    for _ in range(3):
        d = await guard.acheck("gpt-4o", input_tokens=40, max_tokens=10, scopes=["user:a"])
        await guard.asettle(d)
    assert clock.sleeps and clock.t - NOW >= 59


async def test_the_event_loop_serves_other_calls_while_one_waits() -> None:
    """On a real loop with asyncio.sleep, a waiting call lets another scope's call through and
    a ticker run; then it is refused after waiting 0.05 s."""
    clock = FakeTime()  # frozen: only the wait limit ends the wait
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "budgets": [{**ROLLING, "on_exhausted": "wait:50ms"}],
        },
        clock=clock,
    )
    call(guard)
    call(guard)
    ticks = 0
    done: list[str] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async def waiting() -> None:
        with pytest.raises(BudgetExceeded, match=r"refused after waiting 0\.05 s$"):
            await guard.acheck("gpt-4o", input_tokens=40, max_tokens=10, scopes=["user:a"])
        done.append("waited")

    async def other() -> None:
        await guard.acheck("gpt-4o", input_tokens=40, max_tokens=10, scopes=["user:b"])
        done.append("other")

    tick = asyncio.create_task(ticker())
    await asyncio.wait_for(asyncio.gather(waiting(), other()), timeout=5)
    tick.cancel()
    assert done == ["other", "waited"]
    assert ticks >= 2


@pytest.mark.parametrize(
    ("value", "window", "says"),
    [
        ("wait:11m", "minute", "at most 10m"),
        ("wait:0", "minute", "positive"),
        ("wait", "minute", "expected 'deny' or 'wait:<max>'"),
        ("sleep:30s", "minute", "expected 'deny' or 'wait:<max>'"),
        ("wait:forever", "minute", "not a duration"),
        (30, "minute", "valid string"),
        ("wait:30s", "day", "minute, hour, rolling or paced window, not 'day'"),
        ("wait:30s", "total", "not 'total'"),
    ],
)
def test_bad_on_exhausted_values_are_refused_by_the_policy(
    value: object, window: str, says: str
) -> None:
    """A malformed wait, one over 10 minutes, or one on a long window is a ConfigError."""
    with pytest.raises(ConfigError, match="field 'on_exhausted'") as info:
        BudgetGuard.from_dict(
            {"ledger": "memory://", "budgets": [
                {"scope": "global", "tokens": 100, "window": window, "on_exhausted": value}]}
        )  # fmt: skip
    assert says in str(info.value)


def test_agent_limits_only_cannot_wait() -> None:
    """on_exhausted waits on a ledger limit; a budget of agent limits only is refused."""
    with pytest.raises(ConfigError, match="on_exhausted"):
        budget = {"scope": "run:*", "tool_calls": 3, "window": "minute", "on_exhausted": "wait:5s"}
        BudgetGuard.from_dict({"ledger": "memory://", "budgets": [budget]})


async def test_langchain_middleware_async_path_waits() -> None:
    """TokenBudgetMiddleware under ainvoke: a call over a rolling minute waits, then runs."""
    from langchain.agents import create_agent

    from tb_plugins.integrations.langchain import TokenBudgetMiddleware
    from tb_plugins.testing.fake_chat_model import FakeChatModel

    clock = FakeTime()
    guard = make_guard(
        {"scope": "global", "limit": "100 tokens/rolling:1m", "on_exhausted": "wait:2m"},
        clock,
        default_output_tokens=40,
    )
    guard.settle(guard.check("gpt-4o", input_tokens=90, max_tokens=1, adjust=False))
    model = FakeChatModel(model="gpt-4o")
    agent = create_agent(model, tools=[], middleware=[TokenBudgetMiddleware(guard)])
    out = await agent.ainvoke({"messages": [("user", "hi")]})
    assert model.call_count == 1
    assert out["messages"][-1].content == "Hello from the fake model."
    assert clock.sleeps and clock.t - NOW >= 59


async def test_litellm_proxy_pre_call_hook_awaits_the_wait() -> None:
    """The proxy's async_pre_call_hook waits for room instead of answering 429."""
    from litellm.proxy._types import UserAPIKeyAuth

    from tb_plugins.integrations.litellm_proxy import TokenBudgetProxyHandler

    clock = FakeTime()
    guard = make_guard(
        {"scope": "key:*", "limit": "100 tokens/rolling:1m", "on_exhausted": "wait:2m"}, clock
    )
    guard.settle(guard.check("gpt-4o", input_tokens=90, max_tokens=1, scopes=["key:ci"]))
    handler = TokenBudgetProxyHandler(guard)
    data: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }
    auth = UserAPIKeyAuth(api_key="sk-1", key_alias="ci")
    await handler.async_pre_call_hook(auth, None, data, "completion")
    assert clock.sleeps and clock.t - NOW >= 59
    assert sum(s.reserved for s in guard.status("key:ci")) > 0  # admitted: its hold is on
