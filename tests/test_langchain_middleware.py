"""TokenBudgetMiddleware under the real ``create_agent``: downgrade, clamp, graceful end, raise,
loop cutoffs, retries; each test drives a real agent loop with the local FakeChatModel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRetryMiddleware
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool

from tb_plugins import BudgetExceeded, BudgetGuard, LoopLimitExceeded
from tb_plugins.integrations.langchain import (
    BudgetExceededError,
    LoopLimitExceededError,
    TokenBudgetCallbackHandler,
    TokenBudgetMiddleware,
    budget_scope,
)
from tb_plugins.testing.fake_chat_model import FakeChatModel

NOW = 1_800_000_000.0


@tool
def search(q: str) -> str:
    """Search the web."""
    return "ok"


def always_search(messages: list[BaseMessage]) -> dict[str, Any]:
    """A model that never stops calling its tool: the runaway agent loop."""
    return {"tool_calls": [{"name": "search", "args": {"q": "more"}}]}


def make_guard(budgets: list[dict[str, Any]], **policy: Any) -> BudgetGuard:
    return BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": [], "budgets": budgets, **policy}, clock=lambda: NOW
    )


def ai_messages(state: dict[str, Any]) -> list[AIMessage]:
    return [m for m in state["messages"] if isinstance(m, AIMessage)]


def assert_history_valid(messages: list[BaseMessage]) -> None:
    """Every tool call is answered by a ToolMessage and the last message calls no tool."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    for m in messages:
        if isinstance(m, AIMessage):
            assert {tc["id"] for tc in m.tool_calls} <= answered
    last = messages[-1]
    assert isinstance(last, AIMessage) and not last.tool_calls


def held(guard: BudgetGuard, scope: str) -> float:
    return sum(s.reserved for s in guard.status(scope))


def spent(guard: BudgetGuard, scope: str, unit: str = "tokens") -> float:
    return sum(s.spent for s in guard.status(scope) if s.unit == unit)


# -- downgrade, clamp, end ------------------------------------------------------------------


def ladder_agent(
    on_exhausted: str = "end",
) -> tuple[Any, FakeChatModel, FakeChatModel, BudgetGuard]:
    guard = make_guard(
        [{"scope": "team:search", "tokens": 3000, "window": "day", "downgrade_at": 0.5}],
        default_output_tokens=200,
        downgrade={"gpt-4o": "gpt-4o-mini"},
    )
    big = FakeChatModel(model="gpt-4o", responses=always_search)
    small = FakeChatModel(model="gpt-4o-mini", responses=always_search)
    middleware = TokenBudgetMiddleware(
        guard, scopes=["team:search"], models={"gpt-4o-mini": small}, on_exhausted=on_exhausted
    )
    agent = create_agent(big, tools=[search], middleware=[middleware], name="planner")
    return agent, big, small, guard


def check_ladder(big: FakeChatModel, small: FakeChatModel, guard: BudgetGuard) -> None:
    served = [c.index for c in big.calls], [c.index for c in small.calls]
    assert big.call_count >= 1 and small.call_count >= 1
    # The expensive model serves every call until downgrade_at, the cheaper one all after.
    assert max(served[0]) == big.call_count - 1
    assert all(c.max_tokens in (None, 200) for c in big.calls)
    clamped = [c.max_tokens for c in small.calls if c.max_tokens is not None]
    assert clamped and all(16 <= n < 200 for n in clamped), clamped
    assert spent(guard, "team:search") <= 3000
    assert held(guard, "team:search") == 0


def test_agent_downgrades_at_threshold_then_clamps_then_ends_gracefully() -> None:
    """An agent switches to the cheaper model at downgrade_at, is clamped near the limit, and
    ends with a final AI message naming the budget and its reset time."""
    agent, big, small, guard = ladder_agent()
    events: list[tuple[str, str, int]] = []
    guard.listeners.append(
        lambda ev, d: (
            events.append((ev, d["decision"].model, d["decision"].estimate.tokens))
            if ev == "decision"
            else events.append((ev, "", d["charge"].tokens))
            if ev == "settle"
            else None
        )
    )
    out = agent.invoke({"messages": [("user", "research tokens")]})
    models = [m.response_metadata.get("model_name") for m in ai_messages(out)[:-1]]
    first_small = models.index("gpt-4o-mini")
    assert set(models[:first_small]) == {"gpt-4o"} and set(models[first_small:]) == {"gpt-4o-mini"}
    # gpt-4o serves while less than half of the 3000 tokens is spent, gpt-4o-mini after
    total, spent_before = 0, []
    for ev, model, tokens in events:
        if ev == "settle":
            total += tokens
        else:
            spent_before.append((model, total))
    assert all((total < 1500) == (model == "gpt-4o") for model, total in spent_before)
    check_ladder(big, small, guard)
    final = out["messages"][-1]
    assert "team:search" in final.content and "resets at" in final.content
    assert final.response_metadata["finish_reason"] == "budget_exhausted"
    assert final.response_metadata["tb_plugins"]["scope"] == "team:search"
    assert_history_valid(out["messages"])


async def test_agent_ladder_is_the_same_under_ainvoke() -> None:
    """Under ainvoke the agent downgrades, clamps and ends exactly as under invoke."""
    agent, big, small, guard = ladder_agent()
    out = await agent.ainvoke({"messages": [("user", "research tokens")]})
    sync_agent, sync_big, sync_small, _ = ladder_agent()
    sync_out = sync_agent.invoke({"messages": [("user", "research tokens")]})
    assert (big.call_count, small.call_count) == (sync_big.call_count, sync_small.call_count)
    assert out["messages"][-1].content == sync_out["messages"][-1].content
    check_ladder(big, small, guard)
    assert_history_valid(out["messages"])


def test_agent_raises_when_budget_spent_with_on_exhausted_raise() -> None:
    """With on_exhausted="raise" the same agent raises BudgetExceededError after the ladder."""
    agent, big, small, guard = ladder_agent("raise")
    with pytest.raises(BudgetExceededError) as info:
        agent.invoke({"messages": [("user", "research tokens")]})
    assert isinstance(info.value, BudgetExceeded)
    assert info.value.scope == "team:search" and info.value.resets_at is not None
    check_ladder(big, small, guard)


async def test_agent_raises_under_ainvoke_with_on_exhausted_raise() -> None:
    """With on_exhausted="raise" the async agent raises BudgetExceededError too."""
    agent, big, small, guard = ladder_agent("raise")
    with pytest.raises(BudgetExceededError):
        await agent.ainvoke({"messages": [("user", "research tokens")]})
    check_ladder(big, small, guard)


def test_blocked_first_call_never_reaches_the_model() -> None:
    """When the first call does not fit, the agent ends without the model being called."""
    guard = make_guard([{"scope": "global", "tokens": 10, "window": "day"}])
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    agent = create_agent(model, tools=[search], middleware=[TokenBudgetMiddleware(guard)])
    out = agent.invoke({"messages": [("user", "hi")]})
    assert model.call_count == 0
    assert len(out["messages"]) == 2 and "global" in out["messages"][-1].content
    assert held(guard, "global") == 0


# -- loop cutoffs ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 7])
def test_loop_cutoff_after_n_calls_per_run(n: int) -> None:
    """A run:* calls limit of N ends a runaway agent after exactly N model calls per run."""
    guard = make_guard([{"scope": "run:*", "calls": n, "window": "total"}])
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    agent = create_agent(model, tools=[search], middleware=[TokenBudgetMiddleware(guard)])
    out = agent.invoke({"messages": [("user", "loop")]})
    assert model.call_count == n
    assert "calls" in out["messages"][-1].content
    assert out["messages"][-1].response_metadata["tb_plugins"]["error"] == "LoopLimitExceeded"
    assert_history_valid(out["messages"])
    agent.invoke({"messages": [("user", "loop again")]})  # a new invocation is a new run
    assert model.call_count == 2 * n


def test_loop_cutoff_raises_loop_limit_error_with_on_exhausted_raise() -> None:
    """With on_exhausted="raise" the calls cutoff raises LoopLimitExceededError."""
    guard = make_guard([{"scope": "run:*", "calls": 4, "window": "total"}])
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    middleware = TokenBudgetMiddleware(guard, on_exhausted="raise")
    agent = create_agent(model, tools=[search], middleware=[middleware])
    with pytest.raises(LoopLimitExceededError) as info:
        agent.invoke({"messages": [("user", "loop")]})
    assert isinstance(info.value, LoopLimitExceeded)
    assert model.call_count == 4


@pytest.mark.parametrize("m", [600, 1500])
async def test_loop_cutoff_at_m_tokens_per_run(m: int) -> None:
    """A run:* tokens limit of M ends the agent before a run spends more than M tokens."""
    guard = make_guard(
        [{"scope": "run:*", "tokens": m, "window": "total"}], default_output_tokens=50
    )
    seen: list[str] = []
    guard.listeners.append(
        lambda ev, d: (
            seen.extend(s for s in d["decision"].scopes if s.startswith("run:"))
            if ev == "settle"
            else None
        )
    )
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    agent = create_agent(model, tools=[search], middleware=[TokenBudgetMiddleware(guard)])
    out = await agent.ainvoke({"messages": [("user", "loop")]})
    (run,) = set(seen)
    used = spent(guard, run)
    assert 0 < used <= m
    assert model.call_count >= 2
    assert "tokens" in out["messages"][-1].content
    assert_history_valid(out["messages"])


def test_tb_run_id_metadata_shares_one_run_across_invocations() -> None:
    """metadata tb_run_id charges several invocations to one run, so its calls limit spans them."""
    guard = make_guard([{"scope": "run:*", "calls": 3, "window": "total"}])
    model = FakeChatModel(model="gpt-4o", responses=["a", "b", "c", "d"])
    agent = create_agent(model, tools=[], middleware=[TokenBudgetMiddleware(guard)])
    config = {"metadata": {"tb_run_id": "job-42"}}
    for _ in range(3):
        agent.invoke({"messages": [("user", "hi")]}, config=config)
    out = agent.invoke({"messages": [("user", "hi")]}, config=config)
    assert model.call_count == 3
    assert "run:job-42" in out["messages"][-1].content


async def test_20_concurrent_agents_against_a_budget_for_k_calls_let_exactly_k_through() -> None:
    """Twenty agents started at once against a budget that holds exactly K calls: exactly K
    model calls happen and the other agents end gracefully without calling the model."""
    k = 6
    guard = make_guard([{"scope": "team:a", "requests": k, "window": "day"}])
    model = FakeChatModel(model="gpt-4o", reply="done")
    agent = create_agent(model, tools=[], middleware=[TokenBudgetMiddleware(guard, ["team:a"])])
    outs = await asyncio.gather(
        *(agent.ainvoke({"messages": [("user", f"q{i}")]}) for i in range(20))
    )
    finals = [o["messages"][-1] for o in outs]
    assert model.call_count == k
    assert sum(m.content == "done" for m in finals) == k
    assert (
        sum(m.response_metadata.get("finish_reason") == "budget_exhausted" for m in finals)
        == 20 - k
    )


# -- settlement, errors, retries -----------------------------------------------------------


def test_settles_exact_usage_and_scope_path() -> None:
    """Each call is charged its reported usage to scopes, metadata scopes, agent and run."""
    guard = make_guard([])
    decisions: list[Any] = []
    guard.listeners.append(lambda ev, d: decisions.append(d) if ev == "settle" else None)
    model = FakeChatModel(model="gpt-4o", responses=["done"], cached_input_tokens=4)
    agent = create_agent(
        model, tools=[search], name="writer", middleware=[TokenBudgetMiddleware(guard, ["org:x"])]
    )
    out = agent.invoke(
        {"messages": [("user", "hi")]},
        config={"metadata": {"user_id": "alice", "team": "docs", "tb_scopes": ["feature:qa"]}},
    )
    (event,) = decisions
    usage = out["messages"][-1].usage_metadata
    assert event["charge"].input_tokens == usage["input_tokens"]
    assert event["charge"].output_tokens == usage["output_tokens"]
    assert event["charge"].cached_input_tokens == 4
    assert not event["charge"].estimated
    scopes = event["decision"].scopes
    assert scopes[:6] == (
        "global",
        "org:x",
        "team:docs",
        "user:alice",
        "feature:qa",
        "agent:writer",
    )
    assert scopes[6].startswith("run:") and len(scopes) == 7
    # the estimate was exact: the fake counts the prompt (tools included) as the guard does
    assert event["decision"].estimate.input_tokens == usage["input_tokens"]


def test_model_error_releases_the_hold() -> None:
    """A model call that fails is released: nothing spent, nothing held."""
    guard = make_guard([{"scope": "global", "tokens": 10_000, "window": "day"}])
    model = FakeChatModel(model="gpt-4o", responses=[RuntimeError("provider down")])
    agent = create_agent(model, tools=[], middleware=[TokenBudgetMiddleware(guard)])
    with pytest.raises(RuntimeError, match="provider down"):
        agent.invoke({"messages": [("user", "hi")]})
    assert spent(guard, "global") == 0 and held(guard, "global") == 0


@pytest.mark.parametrize("on_failure", ["continue", "error"])
def test_retry_middleware_does_not_retry_a_budget_refusal(on_failure: str) -> None:
    """ModelRetryMiddleware (default retry_on) re-raises the refusal at once: no retry, no
    refusal hidden as an AI message, no extra reservation attempts."""
    guard = make_guard([{"scope": "run:*", "calls": 2, "window": "total"}])
    denials: list[Any] = []
    guard.listeners.append(lambda ev, d: denials.append(d) if ev == "deny" else None)
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    agent = create_agent(
        model,
        tools=[search],
        middleware=[
            ModelRetryMiddleware(max_retries=3, initial_delay=0, on_failure=on_failure),
            TokenBudgetMiddleware(guard, on_exhausted="raise"),
        ],
    )
    with pytest.raises(LoopLimitExceededError):
        agent.invoke({"messages": [("user", "loop")]})
    assert model.call_count == 2
    assert len(denials) == 1


def test_retry_middleware_does_not_retry_a_handler_refusal() -> None:
    """A refusal raised by the callback handler inside an agent with ModelRetryMiddleware is
    raised to the caller once, not retried and not turned into an AI message."""
    guard = make_guard([{"scope": "global", "requests": 1, "window": "day"}])
    denials: list[Any] = []
    guard.listeners.append(lambda ev, d: denials.append(d) if ev == "deny" else None)
    model = FakeChatModel(model="gpt-4o", responses=always_search)
    agent = create_agent(
        model, tools=[search], middleware=[ModelRetryMiddleware(max_retries=3, initial_delay=0)]
    )
    handler = TokenBudgetCallbackHandler(guard)
    with pytest.raises(BudgetExceededError):
        agent.invoke({"messages": [("user", "loop")]}, config={"callbacks": [handler]})
    assert model.call_count == 1 and len(denials) == 1
    assert handler.open_runs == 0


def test_retry_middleware_still_retries_ordinary_errors() -> None:
    """Control: the same retry middleware retries a plain provider error (so the refusal's
    non-retryability is what stops it)."""
    model = FakeChatModel(model="gpt-4o", responses=[RuntimeError("flaky"), "fine"])
    agent = create_agent(
        model, tools=[], middleware=[ModelRetryMiddleware(max_retries=2, initial_delay=0)]
    )
    assert agent.invoke({"messages": [("user", "hi")]})["messages"][-1].content == "fine"
    assert model.call_count == 2


def test_handler_stands_aside_for_calls_the_middleware_guards() -> None:
    """A budget_scope handler around an agent with the middleware does not charge twice."""
    guard = make_guard([])
    settled: list[Any] = []
    guard.listeners.append(lambda ev, d: settled.append(d) if ev == "settle" else None)
    model = FakeChatModel(model="gpt-4o", responses=["done"])
    agent = create_agent(model, tools=[], middleware=[TokenBudgetMiddleware(guard)])
    with budget_scope(guard, ["team:a"]) as handler:
        agent.invoke({"messages": [("user", "hi")]})
    assert len(settled) == 1 and handler.open_runs == 0


def test_downgrade_target_missing_from_models_is_built_with_init_chat_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A downgrade target not in models= is built once with init_chat_model and reused."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    guard = make_guard([])
    middleware = TokenBudgetMiddleware(guard)
    model = middleware._model_for("gpt-4o-mini")
    assert type(model).__name__ == "ChatOpenAI" and model.model_name == "gpt-4o-mini"
    assert middleware._model_for("gpt-4o-mini") is model


def test_on_exhausted_is_validated() -> None:
    """An unknown on_exhausted value is refused when the middleware is built."""
    with pytest.raises(ValueError, match="on_exhausted"):
        TokenBudgetMiddleware(make_guard([]), on_exhausted="stop")  # type: ignore[arg-type]
