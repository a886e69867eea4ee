"""Trimming over-long conversations (``request: {on_too_long: trim}``) and checking in with a
person when a run's budget is spent (``TokenBudgetMiddleware(on_exhausted="interrupt")``),
through the real ``create_agent`` with the local FakeChatModel, and trimming on the real LiteLLM
proxy with the fake OpenAI upstream recording what it receives."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from tb_plugins import BudgetGuard, RequestTooLarge
from tb_plugins.core.request import Request
from tb_plugins.core.trim import tool_units, trim_messages
from tb_plugins.engine import Decision
from tb_plugins.integrations.langchain import TokenBudgetMiddleware
from tb_plugins.integrations.langchain.interrupts import INTERRUPT_KIND, extension
from tb_plugins.testing.fake_chat_model import FakeChatModel
from tb_plugins.testing.fake_openai import FakeOpenAI
from test_litellm_proxy import EXAMPLE, keys_table, start_proxy, stop, wait_ready

NOW = 1_800_000_000.0
LONG = "lorem ipsum dolor sit amet " * 40  # about 200 tokens


@tool
def search(q: str) -> str:
    """Search the web."""
    return "ok"


def make_guard(budgets: list[dict[str, Any]] = (), **policy: Any) -> BudgetGuard:  # type: ignore[assignment]
    return BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": [], "budgets": list(budgets), **policy},
        clock=lambda: NOW,
    )


def decisions(guard: BudgetGuard) -> list[Decision]:
    seen: list[Decision] = []
    guard.listeners.append(
        lambda event, data: seen.append(data["decision"]) if event == "decision" else None
    )
    return seen


def words(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(str(m.get("content") or "").split()) + 1 for m in messages)


def assert_pairs_whole(messages: Sequence[Mapping[str, Any]]) -> None:
    """Every tool result has its call in the list, and every call all its results."""
    calls = {
        c["id"] for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ()
    }
    results = {m["tool_call_id"] for m in messages if m.get("role") == "tool"}
    assert calls == results


def history() -> list[dict[str, Any]]:
    """system, an old exchange, a tool pair, another old exchange, a tool pair, latest user."""
    return [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": "old question " + LONG},
        {"role": "assistant", "content": "old answer " + LONG},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "search", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "r1 " + LONG},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "user", "content": "middle question " + LONG},
        {"role": "assistant", "content": "middle answer"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c3", "type": "function", "function": {"name": "search", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": "r3"},
        {"role": "user", "content": "latest question"},
    ]


# -- the pure algorithm ---------------------------------------------------------------------


def test_tool_units_keep_a_call_with_all_its_results() -> None:
    """An assistant tool call and every tool message answering it form one unit."""
    assert tool_units(history()) == [[0], [1], [2], [3, 4, 5], [6], [7], [8, 9], [10]]


def test_trim_drops_oldest_first_keeping_system_latest_user_and_tool_pairs() -> None:
    """The oldest units go first, as few as fit; system, the latest user turn and whole tool
    pairs stay, and a pair is dropped with its results, never split."""
    msgs = history()
    full = words(msgs)
    kept = trim_messages(msgs, full - 1, words)
    # One message had to go, and the cut goes on to the next user turn: the conversation
    # still opens with the user after the system message.
    assert kept == (0, 6, 7, 8, 9, 10)
    kept = trim_messages(msgs, 60, words)
    assert kept is not None
    out = [msgs[i] for i in kept]
    assert out[0]["role"] == "system" and out[-1]["content"] == "latest question"
    assert_pairs_whole(out)
    assert words(out) <= 60
    assert 4 not in kept and 3 not in kept  # the long tool pair went whole


def test_trim_never_opens_with_the_assistant() -> None:
    """Whatever the limit, the first kept message after the system ones is a user message."""
    msgs = history()
    for limit in range(0, words(msgs) + 1, 7):
        kept = trim_messages(msgs, limit, words)
        if kept is not None:
            assert msgs[kept[1]]["role"] == "user", limit
            assert_pairs_whole([msgs[i] for i in kept])


def test_trim_returns_none_when_the_pinned_messages_do_not_fit() -> None:
    """A conversation whose system messages and latest user turn alone pass the limit cannot
    be trimmed."""
    msgs = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    assert trim_messages(msgs, 10, words) is None


# -- the guard ------------------------------------------------------------------------------


def test_guard_refuses_by_default_and_trims_only_when_asked() -> None:
    """``on_too_long`` defaults to refuse; with ``trim`` a trimmable request is cut and the
    decision says which messages to send and why; an untrimmable one is still refused."""
    msgs = history()
    refuse = make_guard(request={"max_input_tokens": 120})
    with pytest.raises(RequestTooLarge):
        refuse.check_request(Request("gpt-4o", msgs, trimmable=True))
    guard = make_guard(request={"max_input_tokens": 120, "on_too_long": "trim"})
    with pytest.raises(RequestTooLarge):  # the caller cannot send fewer messages
        guard.check_request(Request("gpt-4o", msgs))
    d = guard.check_request(Request("gpt-4o", msgs, trimmable=True))
    assert d.kept_messages is not None and d.kept_messages[0] == 0
    dropped = len(msgs) - len(d.kept_messages)
    assert d.reasons[0] == (
        f"trimmed {dropped} oldest messages to fit request.max_input_tokens (120)"
    )
    assert d.estimate.input_tokens <= 120
    assert_pairs_whole([msgs[i] for i in d.kept_messages])
    tiny = make_guard(request={"max_input_tokens": 5, "on_too_long": "trim"})
    with pytest.raises(RequestTooLarge):
        tiny.check_request(Request("gpt-4o", msgs, trimmable=True))


def test_policy_rejects_an_unknown_on_too_long() -> None:
    """``request.on_too_long`` is refuse or trim."""
    from tb_plugins.errors import ConfigError

    with pytest.raises(ConfigError, match="on_too_long"):
        make_guard(request={"on_too_long": "truncate"})


# -- the middleware: trimming ---------------------------------------------------------------


def lc_history() -> list[BaseMessage]:
    call = {"name": "search", "args": {"q": "x"}, "id": "c1", "type": "tool_call"}
    return [
        HumanMessage("old question " + LONG),
        AIMessage("old answer " + LONG),
        AIMessage("", tool_calls=[call]),
        ToolMessage("r1 " + LONG, tool_call_id="c1"),
        HumanMessage("latest question"),
    ]


def test_middleware_sends_the_model_the_trimmed_conversation() -> None:
    """Under ``on_too_long: trim`` the model receives the system prompt, the latest user turn
    and whole tool pairs only, the decision says so, and the agent's state keeps everything."""
    guard = make_guard(request={"max_input_tokens": 150, "on_too_long": "trim"})
    seen = decisions(guard)
    model = FakeChatModel(model="gpt-4o", responses=["short answer"])
    agent = create_agent(
        model, tools=[search], system_prompt="you are terse",
        middleware=[TokenBudgetMiddleware(guard)],
    )  # fmt: skip
    state = agent.invoke({"messages": lc_history()})
    sent = model.calls[-1].messages
    assert sent[0] == {"role": "system", "content": "you are terse"}
    assert sent[-1]["content"] == "latest question"
    assert all("old" not in str(m.get("content")) for m in sent)
    assert_pairs_whole(sent)
    assert seen[-1].reasons[0].startswith("trimmed ")
    assert "request.max_input_tokens (150)" in seen[-1].reasons[0]
    assert len(state["messages"]) == 6 and state["messages"][-1].content == "short answer"


def test_middleware_refuses_a_conversation_that_cannot_fit() -> None:
    """A conversation whose pinned messages pass the cap ends the agent with the refusal."""
    guard = make_guard(request={"max_input_tokens": 20, "on_too_long": "trim"})
    model = FakeChatModel(model="gpt-4o", responses=["never"])
    agent = create_agent(model, tools=[search], middleware=[TokenBudgetMiddleware(guard)])
    state = agent.invoke({"messages": [*lc_history()[:-1], HumanMessage("latest " + LONG)]})
    last = state["messages"][-1]
    assert "request.max_input_tokens" in last.content
    assert last.response_metadata["tb_plugins"]["error"] == "RequestTooLarge"
    assert model.calls == []


# -- the middleware: interrupt --------------------------------------------------------------


def searching_agent(guard: BudgetGuard, *, checkpointer: Any = None) -> tuple[Any, FakeChatModel]:
    script = [
        {"tool_calls": [{"name": "search", "args": {"q": "a"}}]},
        {"tool_calls": [{"name": "search", "args": {"q": "b"}}]},
        {"tool_calls": [{"name": "search", "args": {"q": "c"}}]},
        "all done",
    ]
    model = FakeChatModel(model="gpt-4o", responses=script)
    agent = create_agent(
        model, tools=[search], checkpointer=checkpointer, name="researcher",
        middleware=[TokenBudgetMiddleware(guard, on_exhausted="interrupt")],
    )  # fmt: skip
    return agent, model


def run_scope(agent: Any, config: dict[str, Any]) -> str:
    return "run:" + agent.get_state(config).values["tb_run_id"]


def test_interrupted_run_resumes_with_an_extension_and_finishes() -> None:
    """A run past its ``calls`` pauses with an interrupt naming the budget; resuming with
    ``{"extend": "2 calls"}`` raises that run's limit (an override on ``run:<id>`` with its
    reason in the history) and the agent finishes; other runs keep the file's limit."""
    guard = make_guard([{"scope": "run:*", "calls": 2, "window": "total"}])
    agent, model = searching_agent(guard, checkpointer=InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "t1"}}
    out = agent.invoke({"messages": [("user", "research")]}, config)
    (pause,) = out["__interrupt__"]
    run = run_scope(agent, config)
    assert pause.value["type"] == INTERRUPT_KIND
    assert {k: pause.value[k] for k in ("scope", "unit", "spent", "limit")} == {
        "scope": run, "unit": "calls", "spent": 2, "limit": 2,
    }  # fmt: skip
    assert pause.value["budget"].startswith("run:*")
    assert len(model.calls) == 2
    out = agent.invoke(Command(resume={"extend": "2 calls"}), config)
    assert "__interrupt__" not in out
    assert out["messages"][-1].content == "all done"
    assert len(model.calls) == 4
    (change,) = guard.budget_history(run)
    assert change.change.scope == run and change.change.window == "total"
    assert change.change.reason is not None
    assert change.change.reason.startswith("extended at interrupt: +2 calls for " + run)
    assert [s.limit for s in guard.status(run) if s.unit == "calls"] == [4]
    assert [b.scope for b in guard.budgets() if b.source == "override"] == [run]
    # A new run has the file's two calls again.
    model.reset()
    other: dict[str, Any] = {"configurable": {"thread_id": "t2"}}
    out = agent.invoke({"messages": [("user", "again")]}, other)
    assert out["__interrupt__"][0].value["limit"] == 2


@pytest.mark.parametrize("answer", [{"extend": None}, "stop", {"other": 1}])
def test_resuming_without_an_extension_ends_the_run_gracefully(answer: Any) -> None:
    """Any answer but an extension ends the run with the usual final message."""
    guard = make_guard([{"scope": "run:*", "calls": 1, "window": "total"}])
    agent, _ = searching_agent(guard, checkpointer=InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "t"}}
    assert agent.invoke({"messages": [("user", "go")]}, config)["__interrupt__"]
    out = agent.invoke(Command(resume=answer), config)
    last = out["messages"][-1]
    assert "__interrupt__" not in out
    assert last.content.startswith("I have to stop here")
    assert last.response_metadata["finish_reason"] == "budget_exhausted"
    assert not last.tool_calls
    assert guard.budget_history() == []


def test_an_extension_too_small_ends_the_run() -> None:
    """An extension that still leaves no room for the call ends the run, with it recorded."""
    guard = make_guard([{"scope": "run:*", "tokens": 10, "window": "total"}])
    agent, model = searching_agent(guard, checkpointer=InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "t"}}
    out = agent.invoke({"messages": [("user", "go")]}, config)
    assert out["__interrupt__"][0].value["unit"] == "tokens"
    out = agent.invoke(Command(resume={"extend": "5 tokens"}), config)
    assert out["messages"][-1].content.startswith("I have to stop here")
    assert len(guard.budget_history()) == 1
    assert model.calls == []


def test_other_refusals_end_the_run_without_an_interrupt() -> None:
    """A spent budget of another scope (here the team's) cannot be extended per run: the
    agent ends as with ``on_exhausted="end"``."""
    guard = make_guard([{"scope": "team:search", "tokens": 10, "window": "day"}])
    model = FakeChatModel(model="gpt-4o", responses=["hi"])
    agent = create_agent(
        model, tools=[search], checkpointer=InMemorySaver(),
        middleware=[TokenBudgetMiddleware(guard, ["team:search"], on_exhausted="interrupt")],
    )  # fmt: skip
    out = agent.invoke({"messages": [("user", "go")]}, {"configurable": {"thread_id": "t"}})
    assert "__interrupt__" not in out
    assert out["messages"][-1].content.startswith("I have to stop here")


def test_interrupt_mode_without_a_checkpointer_is_a_clear_error() -> None:
    """Interrupts cannot be resumed without a checkpointer: the run is refused at its start."""
    guard = make_guard([{"scope": "run:*", "calls": 1, "window": "total"}])
    agent, _ = searching_agent(guard)
    with pytest.raises(ValueError, match="needs a checkpointer"):
        agent.invoke({"messages": [("user", "go")]})


def test_async_interrupt_and_extension() -> None:
    """The async path pauses and resumes the same way."""
    guard = make_guard([{"scope": "run:*", "calls": 2, "window": "total"}])
    agent, _ = searching_agent(guard, checkpointer=InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "a"}}

    async def main() -> dict[str, Any]:
        out = await agent.ainvoke({"messages": [("user", "go")]}, config)
        assert out["__interrupt__"][0].value["unit"] == "calls"
        result: dict[str, Any] = await agent.ainvoke(Command(resume={"extend": "5 calls"}), config)
        return result

    assert asyncio.run(main())["messages"][-1].content == "all done"
    assert len(guard.budget_history()) == 1


def test_extension_amounts() -> None:
    """Readable amounts in the budget's unit; a bare number is in that unit; others refused."""
    assert extension({"extend": "5k tokens"}, "tokens") == 5000
    assert extension({"extend": 3}, "calls") == 3
    assert extension({"extend": "$1.5"}, "usd") == 1.5
    with pytest.raises(ValueError, match="in calls"):
        extension({"extend": "5k tokens"}, "calls")
    with pytest.raises(ValueError, match="expected an amount"):
        extension({"extend": "lots"}, "tokens")


# -- the LiteLLM proxy: trimming ------------------------------------------------------------


@pytest.fixture(scope="module")
def trim_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeOpenAI]]:
    """One real proxy under a policy that trims, upstream the fake OpenAI server."""
    tmp = tmp_path_factory.mktemp("trim-proxy")
    fake = FakeOpenAI().start()
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    for entry in config["model_list"]:
        entry["litellm_params"]["api_base"] = fake.base_url
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(EXAMPLE / "custom_auth.py", tmp / "custom_auth.py")
    (tmp / "keys.yaml").write_text(yaml.safe_dump(keys_table()))
    budgets = tmp / "budgets.yaml"
    policy = {
        "ledger": f"sqlite:///{tmp / 'ledger.db'}",
        "request": {"max_input_tokens": 150, "on_too_long": "trim"},
        "budgets": [{"scope": "key:*", "tokens": 1_000_000, "window": "day"}],
    }
    budgets.write_text(yaml.safe_dump(policy))
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(16),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TB_PLUGINS_CONFIG": str(budgets),
        "TB_EXAMPLE_KEYS": str(tmp / "keys.yaml"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    proxy = start_proxy(tmp / "config.yaml", env, Path(tmp / "proxy.log"))
    try:
        wait_ready(proxy)
        yield proxy.url, fake
    finally:
        stop(proxy)
        fake.stop()


@pytest.mark.slow
def test_proxy_sends_the_upstream_exactly_the_trimmed_conversation(
    trim_proxy: tuple[str, FakeOpenAI],
) -> None:
    """Through the real proxy, the upstream receives the conversation the guard trimmed
    (system, the latest user turn, whole tool pairs) and an untrimmable one is refused."""
    import openai

    url, fake = trim_proxy
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-apis", max_retries=0)
    msgs = history()
    guard = make_guard(request={"max_input_tokens": 150, "on_too_long": "trim"})
    expected = guard.check_request(Request("gpt-4o", msgs, max_tokens=10, trimmable=True))
    assert expected.kept_messages is not None and len(expected.kept_messages) < len(msgs)
    before = len(fake.requests)
    client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=10)  # type: ignore[arg-type]
    (served,) = fake.requests[before:]
    assert served.messages == [msgs[i] for i in expected.kept_messages]
    assert served.prompt_tokens <= 150
    too_long = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError, match=r"request\.max_input_tokens"):
        client.chat.completions.create(model="gpt-4o", messages=too_long, max_tokens=10)  # type: ignore[arg-type]
    assert len(fake.requests) == before + 1
