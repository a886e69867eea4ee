"""Agents that stop early: loop detection (`repeats`), tool budgets (`tool_calls`) and time
budgets (`seconds`), through real `create_agent` graphs with the local FakeChatModel, the
middleware and the callback handler, sync and async, on an injected clock (no sleep)."""

from __future__ import annotations

import doctest
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool

import tb_plugins.engine.agents
from tb_plugins import BudgetGuard, ConfigError, LoopLimitExceeded
from tb_plugins.engine.agents import AgentTracker, normalize_arguments
from tb_plugins.errors import RunLimitExceeded, ToolLimitExceeded
from tb_plugins.integrations.langchain import (
    RunLimitExceededError,
    TokenBudgetCallbackHandler,
    TokenBudgetMiddleware,
    ToolLimitExceededError,
)
from tb_plugins.testing.fake_chat_model import FakeChatModel

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_guard(budgets: list[dict[str, Any]], clock: FakeClock | None = None) -> BudgetGuard:
    return BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": [], "budgets": budgets}, clock=clock or FakeClock()
    )


invoked: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_invocations() -> None:
    invoked.clear()


@tool
def search_web(q: str) -> str:
    """Search the web."""
    invoked["search_web"] += 1
    return f"results for {q}"


@tool
def calculator(expression: str) -> str:
    """Compute an expression."""
    invoked["calculator"] += 1
    return "42"


def always(args: dict[str, Any], name: str = "search_web") -> Callable[..., dict[str, Any]]:
    """A model that calls the same tool with the same arguments forever: a loop."""
    return lambda messages: {"tool_calls": [{"name": name, "args": args}]}


def turns(messages: list[BaseMessage]) -> int:
    return sum(1 for m in messages if isinstance(m, AIMessage))


def tool_messages(state: dict[str, Any], name: str | None = None) -> list[ToolMessage]:
    return [
        m
        for m in state["messages"]
        if isinstance(m, ToolMessage) and (name is None or m.name == name)
    ]


def assert_history_valid(messages: list[BaseMessage]) -> None:
    """Every tool call is answered by a ToolMessage and the last message calls no tool."""
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    for m in messages:
        if isinstance(m, AIMessage):
            assert {tc["id"] for tc in m.tool_calls} <= answered
    last = messages[-1]
    assert isinstance(last, AIMessage) and not last.tool_calls


def ended_by(state: dict[str, Any]) -> dict[str, Any]:
    """The refusal the final AI message reports."""
    last = state["messages"][-1]
    assert last.response_metadata["finish_reason"] == "budget_exhausted"
    info: dict[str, Any] = last.response_metadata["tb_plugins"]
    return info


def agent_with(
    guard: BudgetGuard, model: FakeChatModel, on_exhausted: str = "end", **kwargs: Any
) -> Any:
    middleware = TokenBudgetMiddleware(guard, on_exhausted=on_exhausted)  # type: ignore[arg-type]
    return create_agent(model, tools=[search_web, calculator], middleware=[middleware], **kwargs)


# -- normalisation ------------------------------------------------------------------------------


def test_near_repeats_normalise_to_the_same_text() -> None:
    """Key order, whitespace in strings and 1 vs 1.0 do not make two calls different."""
    a = {"q": "token  budgets", "page": 1, "filters": {"lang": "en", "safe": True}}
    b = {"filters": {"safe": True, "lang": " en "}, "page": 1.0, "q": "\ttoken budgets\n"}
    assert normalize_arguments(a) == normalize_arguments(b)
    assert normalize_arguments('{"page": 1, "q": "x"}') == normalize_arguments(
        {"q": "x", "page": 1}
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"q": "paris"}, {"q": "Paris"}),  # case is kept
        ({"q": "a b"}, {"q": "ab"}),  # whitespace collapsed, not removed
        ({"n": 1}, {"n": True}),  # a bool is not a number
        ({"n": 1}, {"n": "1"}),  # nor is a string
        ({"n": 1.5}, {"n": 1}),
        ({"q": "x"}, {"q": "x", "page": 2}),
    ],
)
def test_different_arguments_stay_different(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Arguments that differ in substance normalise to different texts."""
    assert normalize_arguments(a) != normalize_arguments(b)


def test_normalisation_survives_deep_nesting_and_odd_values() -> None:
    """Deeply nested, non-finite or non-JSON arguments normalise without error."""
    deep: Any = "leaf"
    for _ in range(500):
        deep = {"k": deep}
    assert normalize_arguments(deep).startswith('{"k":')
    assert normalize_arguments({"x": float("nan"), "y": object}) == normalize_arguments(
        {"y": object, "x": float("nan")}
    )
    assert normalize_arguments("not json {") == '"not json {"'


def test_module_examples_hold() -> None:
    """The examples in tb_plugins.engine.agents' docstrings hold."""
    result = doctest.testmod(tb_plugins.engine.agents)
    assert result.attempted > 0 and result.failed == 0


# -- loop detection: repeats ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_same_tool_same_arguments_ends_the_run_at_the_nth_call(n: int) -> None:
    """A model that always calls the same tool with the same arguments is stopped at its N-th
    call: the tool runs N-1 times, and a final AI message says the run was looping."""
    guard = make_guard([{"scope": "run:*", "repeats": n}])
    model = FakeChatModel(model="gpt-4o", responses=always({"q": "budgets"}))
    out = agent_with(guard, model).invoke({"messages": [("user", "loop")]})
    assert invoked["search_web"] == n - 1
    assert model.call_count == n  # the N-th call was asked for; the next model call ends it
    info = ended_by(out)
    assert info["error"] == "RunLimitExceeded" and info["unit"] == "repeats"
    assert info["limit"] == n and info["tool"] == "search_web"
    assert "same arguments" in out["messages"][-1].content
    (refused,) = [m for m in tool_messages(out) if m.status == "error"]
    assert "looping" in str(refused.content)
    assert_history_valid(out["messages"])
    assert len(guard.agents) == 0  # the run's counters went with it


def test_near_repeats_count_as_the_same_call() -> None:
    """Arguments that differ only in whitespace, key order or 1 vs 1.0 are a loop too."""
    variants = [
        {"q": "token budgets", "page": 1},
        {"page": 1.0, "q": "  token   budgets"},
        {"q": "token budgets\n", "page": 1},
    ]
    guard = make_guard([{"scope": "run:*", "repeats": 3}])
    model = FakeChatModel(
        model="gpt-4o",
        responses=lambda m: {"tool_calls": [{"name": "search_web", "args": variants[turns(m)]}]},
    )
    out = agent_with(guard, model).invoke({"messages": [("user", "loop")]})
    assert invoked["search_web"] == 2
    assert ended_by(out)["unit"] == "repeats"


def test_changing_arguments_are_not_a_loop() -> None:
    """A model that calls the same tool with new arguments each time is never stopped."""
    guard = make_guard([{"scope": "run:*", "repeats": 2}])

    def script(messages: list[BaseMessage]) -> Any:
        i = turns(messages)
        if i < 8:
            return {"tool_calls": [{"name": "search_web", "args": {"q": f"page {i}"}}]}
        return "Found it."

    model = FakeChatModel(model="gpt-4o", responses=script)
    out = agent_with(guard, model).invoke({"messages": [("user", "research")]})
    assert invoked["search_web"] == 8
    assert out["messages"][-1].content == "Found it."
    assert all(m.status == "success" for m in tool_messages(out))


def test_same_arguments_to_another_tool_are_not_a_repeat() -> None:
    """Repeats are per tool: the same arguments sent to two tools count apart."""
    guard = make_guard([{"scope": "run:*", "repeats": 2}])
    guard.check_tool(["run:r"], "search_web", {"q": "x"})
    guard.check_tool(["run:r"], "fetch_page", {"q": "x"})
    with pytest.raises(RunLimitExceeded):
        guard.check_tool(["run:r"], "search_web", {"q": "x"})


def test_repeats_raise_with_on_exhausted_raise() -> None:
    """With on_exhausted="raise" the N-th identical call raises RunLimitExceededError (a
    LoopLimitExceeded) and the tool does not run."""
    guard = make_guard([{"scope": "run:*", "repeats": 3}])
    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}))
    with pytest.raises(RunLimitExceededError) as info:
        agent_with(guard, model, on_exhausted="raise").invoke({"messages": [("user", "go")]})
    assert isinstance(info.value, LoopLimitExceeded)
    assert info.value.unit == "repeats" and info.value.tool == "search_web"
    assert invoked["search_web"] == 2


async def test_repeats_under_ainvoke() -> None:
    """The loop detector stops the agent the same way under ainvoke."""
    guard = make_guard([{"scope": "run:*", "repeats": 3}])
    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}))
    agent = agent_with(guard, model)
    out = await agent.ainvoke({"messages": [("user", "loop")]})
    assert invoked["search_web"] == 2
    assert ended_by(out)["unit"] == "repeats"
    assert_history_valid(out["messages"])
    await agent.ainvoke({"messages": [("user", "loop again")]})  # a new run starts afresh
    assert invoked["search_web"] == 4


def test_repeats_and_tokens_on_one_budget_both_hold() -> None:
    """A run:* budget with tokens and repeats keeps charging the ledger and detects loops."""
    guard = make_guard([{"scope": "run:*", "tokens": 1_000_000, "repeats": 2, "window": "total"}])
    seen: list[str] = []
    guard.listeners.append(
        lambda ev, d: (
            seen.extend(s for s in d["decision"].scopes if s.startswith("run:"))
            if ev == "settle"
            else None
        )
    )
    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}))
    out = agent_with(guard, model).invoke({"messages": [("user", "loop")]})
    assert ended_by(out)["unit"] == "repeats"
    (run,) = set(seen)
    assert next(s.spent for s in guard.status(run) if s.unit == "tokens") > 0


# -- tool budgets: tool_calls --------------------------------------------------------------------


def both_tools_then_answer(rounds: int) -> Callable[[list[BaseMessage]], Any]:
    """Each turn calls search_web and calculator with new arguments; then answers."""

    def script(messages: list[BaseMessage]) -> Any:
        i = turns(messages)
        if i < rounds:
            return {
                "tool_calls": [
                    {"name": "search_web", "args": {"q": f"query {i}"}},
                    {"name": "calculator", "args": {"expression": f"{i}+1"}},
                ]
            }
        return "Done."

    return script


def test_a_tool_past_its_budget_never_runs_and_the_agent_is_told_why() -> None:
    """With tool_calls 2 for search_web, the third call never runs the tool; the agent gets a
    tool message naming the tool, the limit and the scope; calculator still runs."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 2, "tool": "search_web"}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(4))
    out = agent_with(guard, model).invoke({"messages": [("user", "research")]})
    assert invoked == {"search_web": 2, "calculator": 4}
    searches = tool_messages(out, "search_web")
    assert [m.status for m in searches] == ["success", "success", "error", "error"]
    refused = str(searches[2].content)
    assert "'search_web' refused" in refused and "2 tool calls" in refused and "run:" in refused
    meta = searches[2].response_metadata["tb_plugins"]
    assert meta["error"] == "ToolLimitExceeded" and meta["unit"] == "tool_calls"
    assert (meta["spent"], meta["limit"], meta["tool"]) == (2, 2, "search_web")
    assert out["messages"][-1].content == "Done."  # the run went on to the model's answer
    assert_history_valid(out["messages"])


async def test_tool_budget_under_ainvoke() -> None:
    """The same refusal, before the tool runs, under ainvoke."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 2, "tool": "search_web"}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(3))
    out = await agent_with(guard, model).ainvoke({"messages": [("user", "research")]})
    assert invoked == {"search_web": 2, "calculator": 3}
    assert [m.status for m in tool_messages(out, "search_web")] == ["success", "success", "error"]


def test_overall_tool_budget_counts_every_tool() -> None:
    """tool_calls without tool counts every tool of the run: 3 calls in all."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 3}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(3))
    out = agent_with(guard, model).invoke({"messages": [("user", "research")]})
    assert sum(invoked.values()) == 3
    assert sum(1 for m in tool_messages(out) if m.status == "error") == 3


def test_tool_budget_refusal_is_a_tool_message_even_with_on_exhausted_raise() -> None:
    """A tool_calls refusal does not end the run, so on_exhausted="raise" still answers it
    with a tool message."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 1, "tool": "search_web"}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(2))
    out = agent_with(guard, model, on_exhausted="raise").invoke({"messages": [("user", "go")]})
    assert invoked == {"search_web": 1, "calculator": 2}
    assert out["messages"][-1].content == "Done."


def test_agent_tool_budget_spans_invocations() -> None:
    """tool_calls on an agent: scope count across the agent's runs (in this process)."""
    guard = make_guard([{"scope": "agent:planner", "tool_calls": 3, "tool": "calculator"}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(2))
    agent = agent_with(guard, model, name="planner")
    agent.invoke({"messages": [("user", "one")]})
    assert invoked == {"search_web": 2, "calculator": 2}
    out = agent.invoke({"messages": [("user", "two")]})
    assert invoked == {"search_web": 4, "calculator": 3}
    (refused,) = [m for m in tool_messages(out) if m.status == "error"]
    assert refused.name == "calculator" and "agent:planner" in str(refused.content)


def test_session_tool_budget_spans_invocations() -> None:
    """tool_calls on a session: scope (from run metadata) count across its runs."""
    guard = make_guard([{"scope": "session:*", "tool_calls": 5}])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(2))
    agent = agent_with(guard, model)
    config = {"metadata": {"tb_scopes": ["session:s1"]}}
    agent.invoke({"messages": [("user", "one")]}, config=config)
    out = agent.invoke({"messages": [("user", "two")]}, config=config)
    assert sum(invoked.values()) == 5
    refused = [str(m.content) for m in tool_messages(out) if m.status == "error"]
    assert len(refused) == 3 and all("session:s1" in r for r in refused)
    agent.invoke(
        {"messages": [("user", "other")]}, config={"metadata": {"tb_scopes": "session:s2"}}
    )
    assert sum(invoked.values()) == 9  # another session has its own count


def test_tool_budget_over_a_day_resets_with_the_window() -> None:
    """A tool_calls budget with window: day allows its calls again the next day."""
    clock = FakeClock()
    guard = make_guard([{"scope": "agent:*", "tool_calls": 2, "window": "day"}], clock)
    for _ in range(2):
        guard.check_tool(["agent:bot"], "search_web", {"q": "x"})
    with pytest.raises(ToolLimitExceeded) as info:
        guard.check_tool(["agent:bot"], "search_web", {"q": "y"})
    assert info.value.resets_at == NOW - NOW % 86400 + 86400
    clock.advance(86400)
    guard.check_tool(["agent:bot"], "search_web", {"q": "z"})


def test_a_refused_call_is_not_counted() -> None:
    """A call refused by one tool_calls budget is not counted by the others (all or none)."""
    guard = make_guard(
        [
            {"scope": "session:*", "tool_calls": 3},
            {"scope": "run:*", "tool_calls": 1, "tool": "search_web"},
        ]
    )
    guard.check_tool(["session:s", "run:a"], "search_web", {"q": "1"})
    for i in range(3):
        with pytest.raises(ToolLimitExceeded):
            guard.check_tool(["session:s", "run:a"], "search_web", {"q": str(i)})
    guard.check_tool(["session:s", "run:b"], "search_web", {"q": "2"})
    guard.check_tool(["session:s", "run:c"], "search_web", {"q": "3"})
    with pytest.raises(ToolLimitExceeded) as info:
        guard.check_tool(["session:s", "run:d"], "search_web", {"q": "4"})
    assert info.value.scope == "session:s"


def test_threads_admit_exactly_the_limit() -> None:
    """20 threads racing for a tool_calls budget of 7 get exactly 7 calls through."""
    guard = make_guard([{"scope": "session:*", "tool_calls": 7}])
    admitted: list[int] = []
    barrier = threading.Barrier(20)

    def call(i: int) -> None:
        barrier.wait()
        try:
            guard.check_tool(["session:shared"], "search_web", {"q": i})
            admitted.append(i)
        except ToolLimitExceeded:
            pass

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 7


# -- time budgets: seconds -----------------------------------------------------------------------


def slow_tools(clock: FakeClock, seconds: float) -> Callable[[list[BaseMessage]], Any]:
    """Each model call takes `seconds` on the clock and asks for a new search."""

    def script(messages: list[BaseMessage]) -> Any:
        clock.advance(seconds)
        return {"tool_calls": [{"name": "search_web", "args": {"q": f"q{turns(messages)}"}}]}

    return script


def test_a_run_past_its_seconds_ends_gracefully() -> None:
    """seconds: 25 with model calls of 10 s each: the third call's tool is refused (25 s gone)
    and the run ends with a final AI message naming the time budget."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": "25s"}], clock)
    model = FakeChatModel(model="gpt-4o", responses=slow_tools(clock, 10))
    out = agent_with(guard, model).invoke({"messages": [("user", "go")]})
    assert model.call_count == 3 and invoked["search_web"] == 2
    info = ended_by(out)
    assert info["error"] == "RunLimitExceeded" and info["unit"] == "seconds"
    assert info["limit"] == 25 and info["spent"] == 30
    assert "30.0 s" in out["messages"][-1].content
    assert_history_valid(out["messages"])


def test_seconds_are_checked_before_a_model_call() -> None:
    """A run whose clock passed its seconds during a tool is refused its next model call."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": 60}], clock)

    @tool
    def slow(q: str) -> str:
        """A slow tool."""
        clock.advance(61)
        return "late"

    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}, name="slow"))
    middleware = TokenBudgetMiddleware(guard)
    out = create_agent(model, tools=[slow], middleware=[middleware]).invoke(
        {"messages": [("user", "go")]}
    )
    assert model.call_count == 1
    assert ended_by(out)["unit"] == "seconds"


async def test_seconds_under_ainvoke_with_on_exhausted_raise() -> None:
    """Under ainvoke and on_exhausted="raise" a run past its seconds raises
    RunLimitExceededError."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": 15}], clock)
    model = FakeChatModel(model="gpt-4o", responses=slow_tools(clock, 10))
    agent = agent_with(guard, model, on_exhausted="raise")
    with pytest.raises(RunLimitExceededError) as info:
        await agent.ainvoke({"messages": [("user", "go")]})
    assert info.value.unit == "seconds"
    assert invoked["search_web"] == 1


def test_each_run_has_its_own_clock() -> None:
    """A new invocation is a new run with its own seconds."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": 25}], clock)
    model = FakeChatModel(model="gpt-4o", responses=slow_tools(clock, 10))
    agent = agent_with(guard, model)
    agent.invoke({"messages": [("user", "one")]})
    agent.invoke({"messages": [("user", "two")]})
    assert invoked["search_web"] == 4


def test_the_guard_refuses_model_calls_of_a_run_past_its_seconds() -> None:
    """guard.check on a run: scope is refused once the run's seconds have passed."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": 30}], clock)
    msgs = [{"role": "user", "content": "hi"}]
    guard.release(guard.check(model="gpt-4o", messages=msgs, scopes=["run:x"]))
    clock.advance(30)
    with pytest.raises(RunLimitExceeded) as info:
        guard.check(model="gpt-4o", messages=msgs, scopes=["run:x"])
    assert str(info.value) == (
        "run 'run:x' ends: it has run 30.0 s and budget 'run:* 30 seconds/total' allows 30 s. "
        "Raise 'seconds' in the policy to let runs last longer"
    )


# -- the callback handler ------------------------------------------------------------------------


def handler_agent(model: FakeChatModel) -> Any:
    return create_agent(model, tools=[search_web, calculator])


def test_handler_refuses_a_tool_in_on_tool_start() -> None:
    """The callback handler raises ToolLimitExceededError in on_tool_start: the tool never
    runs, and the refusal stops the agent (a callback cannot answer for the tool)."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 1, "tool": "search_web"}])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(3))
    with pytest.raises(ToolLimitExceededError) as info:
        handler_agent(model).invoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert isinstance(info.value, ToolLimitExceeded) and info.value.tool == "search_web"
    assert invoked["search_web"] == 1
    assert handler.open_runs == 0 and len(guard.agents) == 0


def test_handler_refuses_a_direct_tool_call() -> None:
    """A tool invoked on its own with the handler is refused before it runs."""
    guard = make_guard([{"scope": "session:*", "tool_calls": 1}])
    handler = TokenBudgetCallbackHandler(guard, scopes=["session:s"])
    search_web.invoke({"q": "a"}, config={"callbacks": [handler]})
    with pytest.raises(ToolLimitExceededError):
        search_web.invoke({"q": "b"}, config={"callbacks": [handler]})
    assert invoked["search_web"] == 1


async def test_handler_stops_a_loop_under_ainvoke() -> None:
    """Under ainvoke the handler raises RunLimitExceededError at the N-th identical call."""
    guard = make_guard([{"scope": "run:*", "repeats": 3}])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}))
    with pytest.raises(RunLimitExceededError):
        await handler_agent(model).ainvoke(
            {"messages": [("user", "go")]}, config={"callbacks": [handler]}
        )
    assert invoked["search_web"] == 2


def test_handler_checks_seconds_before_a_model_call() -> None:
    """The handler refuses, in on_chat_model_start, the model call of a run past its seconds."""
    clock = FakeClock()
    guard = make_guard([{"scope": "run:*", "seconds": 15}], clock)
    handler = TokenBudgetCallbackHandler(guard)

    @tool
    def slow(q: str) -> str:
        """A slow tool."""
        clock.advance(20)
        return "late"

    model = FakeChatModel(model="gpt-4o", responses=always({"q": "x"}, name="slow"))
    agent = create_agent(model, tools=[slow])
    with pytest.raises(RunLimitExceededError) as info:
        agent.invoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert info.value.unit == "seconds" and info.value.spent == 20
    assert model.call_count == 1


def test_handler_stands_aside_for_tools_the_middleware_checks() -> None:
    """With the middleware and the handler on one agent, each tool call is counted once."""
    guard = make_guard([{"scope": "session:*", "tool_calls": 4}])
    handler = TokenBudgetCallbackHandler(guard, scopes=["session:s"])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(2))
    middleware = TokenBudgetMiddleware(guard, scopes=["session:s"])
    agent = create_agent(model, tools=[search_web, calculator], middleware=[middleware])
    out = agent.invoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert invoked == {"search_web": 2, "calculator": 2}
    assert all(m.status == "success" for m in tool_messages(out))


async def test_handler_stands_aside_for_tools_the_middleware_checks_under_ainvoke() -> None:
    """Under ainvoke too, a tool call the middleware checked is not counted again."""
    guard = make_guard([{"scope": "session:*", "tool_calls": 4}])
    handler = TokenBudgetCallbackHandler(guard, scopes=["session:s"])
    model = FakeChatModel(model="gpt-4o", responses=both_tools_then_answer(2))
    middleware = TokenBudgetMiddleware(guard, scopes=["session:s"])
    agent = create_agent(model, tools=[search_web, calculator], middleware=[middleware])
    out = await agent.ainvoke({"messages": [("user", "go")]}, config={"callbacks": [handler]})
    assert invoked == {"search_web": 2, "calculator": 2}
    assert all(m.status == "success" for m in tool_messages(out))


# -- memory --------------------------------------------------------------------------------------


def test_tracker_is_bounded_and_forgets_ended_runs() -> None:
    """Counters are kept for a bounded number of scopes (least recently used dropped) and a
    run's go when it ends; scopes no agent budget matches are never tracked."""
    guard = make_guard([{"scope": "run:*", "repeats": 2}])
    tracker = AgentTracker(guard.agents.budgets, guard.policy.tz, max_scopes=3)
    for i in range(10):
        tracker.check_tool(("global", f"run:{i}"), "t", {}, now=NOW, mono=0.0)
    assert len(tracker) == 3
    assert tracker.end("run:9") and not tracker.end("run:0")
    tracker.check_tool(("global", "user:alice"), "t", {}, now=NOW, mono=0.0)
    assert len(tracker) == 2


def test_agent_only_budgets_write_nothing_to_the_ledger() -> None:
    """A budget of agent limits only has no ledger line: status shows nothing for the run."""
    guard = make_guard([{"scope": "run:*", "repeats": 3, "tool_calls": 10, "seconds": 60}])
    msgs = [{"role": "user", "content": "hi"}]
    guard.release(guard.check(model="gpt-4o", messages=msgs, scopes=["run:x"]))
    guard.check_tool(["run:x"], "search_web", {"q": "a"})
    assert guard.status("run:x") == []
    assert guard.agents.budgets[0].name == "run:* 10 tool_calls + 3 repeats + 60 seconds/total"


def test_policies_without_agent_limits_track_nothing() -> None:
    """Without agent limits the checks return at once and keep no state."""
    guard = make_guard([{"scope": "run:*", "calls": 3, "window": "total"}])
    guard.check_tool(["run:x"], "search_web", {"q": "a"})
    guard.check_run(["run:x"])
    assert not guard.agents.active and len(guard.agents) == 0


# -- the policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"scope": "user:*", "repeats": 3}, "field 'repeats': repeats counts within one run"),
        ({"scope": "run:*", "repeats": 1}, "field 'repeats': must be at least 2"),
        ({"scope": "run:*", "repeats": "lots"}, "field 'repeats'"),
        ({"scope": "run:*", "repeats": 10**16}, "field 'repeats'"),
        ({"scope": "team:a", "seconds": 30}, "field 'seconds': seconds counts within one run"),
        ({"scope": "run:*", "seconds": 0}, "field 'seconds': a duration must be positive"),
        ({"scope": "run:*", "seconds": "soon"}, "field 'seconds': not a duration"),
        ({"scope": "run:*", "seconds": "4000d"}, "field 'seconds': a duration must be at most"),
        ({"scope": "user:*", "tool_calls": 3}, "field 'tool_calls': the tool_calls limit applies"),
        ({"scope": "run:*", "tool_calls": 10**16}, "field 'tool_calls'"),
        ({"scope": "run:*", "tool_calls": -1}, "field 'tool_calls'"),
        (
            {"scope": "session:*", "tool_calls": 3, "window": "rolling:1h"},
            "field 'window': tool_calls are counted in memory",
        ),
        ({"scope": "run:*", "tool": "search_web"}, "field 'tool': it names the one tool"),
        (
            {"scope": "run:*", "tool": "search_web", "tool_calls": 2, "repeats": 3},
            "field 'tool': a budget for one tool limits tool_calls only; put repeats",
        ),
        ({"scope": "run:*", "tool": "", "tool_calls": 2}, "field 'tool': expected a tool's name"),
        ({"scope": "run:*", "tool": "a\nb", "tool_calls": 2}, "field 'tool'"),
        ({"scope": "run:*", "tool": "x" * 300, "tool_calls": 2}, "field 'tool'"),
        ({"scope": "run:*", "window": "total"}, "no limit given: set at least one of"),
    ],
)
def test_bad_agent_fields_are_refused(entry: dict[str, Any], message: str) -> None:
    """Each bad agent field is refused with a message naming the entry and the field."""
    with pytest.raises(ConfigError) as info:
        make_guard([entry])
    assert "budgets[0]" in str(info.value)
    assert message in str(info.value)


def test_agent_fields_read_like_other_limits() -> None:
    """Agent limits accept readable amounts and durations, need no window, and the one-line
    form takes tool_calls."""
    guard = make_guard(
        [
            {"scope": "run:*", "repeats": "3", "seconds": "1m30s"},
            {"scope": "session:*", "limit": "1k tool_calls/day"},
            {"scope": "agent:*", "tool_calls": "2k", "tool": "search_web", "window": "week"},
        ]
    )
    a, b, c = guard.agents.budgets
    assert (a.repeats, a.seconds, a.window.spec) == (3, 90.0, "total")
    assert (b.tool_calls, b.window.spec) == (1000, "day")
    assert (c.tool_calls, c.tool, c.window.spec) == (2000, "search_web", "week")


def test_refusals_carry_data_and_read_well() -> None:
    """Refusals carry scope, budget, unit, spent and limit, and say what to do."""
    guard = make_guard([{"scope": "run:*", "tool_calls": 1, "tool": "search_web"}])
    guard.check_tool(["run:r"], "search_web", {"q": 1})
    with pytest.raises(ToolLimitExceeded) as info:
        guard.check_tool(["run:r"], "search_web", {"q": 2})
    err = info.value
    assert (err.scope, err.unit, err.spent, err.limit, err.tool) == (
        "run:r",
        "tool_calls",
        1,
        1,
        "search_web",
    )
    assert err.budget == "run:* 1 tool_calls of search_web/total"
    assert str(err) == (
        "tool 'search_web' refused: budget 'run:* 1 tool_calls of search_web/total' for scope "
        "'run:r' allows 1 tool call and 1 tool call were made; this budget never resets "
        "(window: total). Go on without this tool, or raise 'tool_calls' in the policy"
    )
    assert err.to_dict()["tool"] == "search_web"
