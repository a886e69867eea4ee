"""The callback handler and middleware inside LangGraph: a two-agent graph whose usage per
chain and per agent shows in `tb report`, run-level cutoffs, and registration that survives
LangGraph's threads and tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph

from tb_plugins import BudgetGuard
from tb_plugins.cli import main
from tb_plugins.integrations.langchain import (
    BudgetExceededError,
    LoopLimitExceededError,
    TokenBudgetCallbackHandler,
    TokenBudgetMiddleware,
    budget_scope,
)
from tb_plugins.testing.fake_chat_model import FakeChatModel

POLICY = """\
ledger: sqlite:///{db}
alerts: []
default_output_tokens: 200
budgets:
  - scope: global
    tokens: 1_000_000
    window: day
  - scope: agent:*
    tokens: 100_000
    window: day
  - scope: run:*
    calls: 10
    window: total
"""


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    return f"notes on {topic}"


def researcher_script(messages: list[BaseMessage]) -> Any:
    """Two lookups, then an answer."""
    if sum(1 for m in messages if m.type == "tool") < 2:
        return {"tool_calls": [{"name": "lookup", "args": {"topic": "budgets"}}]}
    return "Budgets cap spend per scope."


def build_graph(
    researcher: FakeChatModel, writer: FakeChatModel, middleware: list[Any] | None = None
) -> Any:
    research = create_agent(
        researcher, tools=[lookup], name="researcher", middleware=middleware or []
    )
    write = create_agent(writer, tools=[], name="writer", middleware=middleware or [])
    graph = StateGraph(MessagesState)
    graph.add_node("researcher", research)
    graph.add_node("writer", write)
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", "writer")
    graph.add_edge("writer", END)
    return graph.compile(name="research_pipeline")


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    return path


def report(policy: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["--config", str(policy), "report", "--by", "scope", "--json"]) == 0
    return {row["scope"]: row for row in json.loads(capsys.readouterr().out)}


def usage_by_agent(messages: list[BaseMessage]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in messages:
        if isinstance(m, AIMessage) and m.usage_metadata:
            out[m.name or ""] = out.get(m.name or "", 0) + m.usage_metadata["total_tokens"]
    return out


@pytest.mark.parametrize("registration", ["budget_scope", "config"])
def test_two_agent_graph_usage_per_chain_and_agent_shows_in_tb_report(
    registration: str, policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each agent's calls are charged to agent:<name>, all of them to chain:<graph name> and
    the team, and `tb report --by scope` shows exactly the tokens the models reported."""
    guard = BudgetGuard.from_config(policy)
    researcher = FakeChatModel(model="gpt-4o", responses=researcher_script)
    writer = FakeChatModel(model="gpt-4o-mini", reply="A short summary for the reader.")
    graph = build_graph(researcher, writer)
    state = {"messages": [("user", "Explain token budgets")]}
    if registration == "budget_scope":
        with budget_scope(guard, ["team:search"]) as handler:
            out = graph.invoke(state)
    else:
        handler = TokenBudgetCallbackHandler(guard, ["team:search"])
        out = graph.invoke(state, config={"callbacks": [handler]})
    guard.close()
    assert handler.open_runs == 0
    used = usage_by_agent(out["messages"])
    rows = report(policy, capsys)
    assert rows["agent:researcher"]["requests"] == 3
    assert rows["agent:researcher"]["tokens"] == used["researcher"]
    assert rows["agent:writer"]["requests"] == 1
    assert rows["agent:writer"]["tokens"] == used["writer"]
    for scope in ("chain:research_pipeline", "team:search", "global"):
        assert rows[scope]["requests"] == 4
        assert rows[scope]["tokens"] == used["researcher"] + used["writer"]
    (run,) = [s for s in rows if s.startswith("run:")]  # one graph invocation, one run
    assert rows[run]["requests"] == 4


async def test_two_agent_graph_under_astream_is_charged_the_same(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Streaming the graph's messages asynchronously charges the same calls to the same scopes."""
    guard = BudgetGuard.from_config(policy)
    graph = build_graph(
        FakeChatModel(model="gpt-4o", responses=researcher_script),
        FakeChatModel(model="gpt-4o-mini", reply="A short summary for the reader."),
    )
    async with budget_scope(guard, ["team:search"]) as handler:
        chunks = [
            c
            async for c in graph.astream(
                {"messages": [("user", "Explain token budgets")]}, stream_mode="messages"
            )
        ]
    guard.close()
    assert chunks and handler.open_runs == 0
    rows = report(policy, capsys)
    assert rows["agent:researcher"]["requests"] == 3 and rows["agent:writer"]["requests"] == 1
    assert rows["chain:research_pipeline"]["tokens"] == (
        rows["agent:researcher"]["tokens"] + rows["agent:writer"]["tokens"]
    )


def test_calls_limit_spans_both_agents_of_one_graph_run(policy: Path) -> None:
    """run:<root id> is the whole graph invocation: its calls limit counts both agents' calls."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "budgets": [{"scope": "run:*", "calls": 3, "window": "total"}],
        }
    )
    researcher = FakeChatModel(model="gpt-4o", responses=researcher_script)
    writer = FakeChatModel(model="gpt-4o-mini")
    graph = build_graph(researcher, writer)
    with budget_scope(guard), pytest.raises(LoopLimitExceededError):
        graph.invoke({"messages": [("user", "go")]})
    assert (researcher.call_count, writer.call_count) == (3, 0)


def test_handler_reaches_models_called_inside_nodes_without_config() -> None:
    """A node that calls a model without passing config is still checked (LangGraph carries
    the callbacks in a context variable)."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "budgets": [{"scope": "global", "requests": 1, "window": "day"}],
        }
    )
    model = FakeChatModel(model="gpt-4o")

    def node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("a", node)
    graph.add_node("b", node)
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", END)
    compiled = graph.compile()
    handler = TokenBudgetCallbackHandler(guard)
    with pytest.raises(BudgetExceededError):
        compiled.invoke({"messages": [("user", "hi")]}, config={"callbacks": [handler]})
    assert model.call_count == 1 and handler.open_runs == 0


def test_middleware_agents_in_a_graph_share_a_run_via_tb_run_id() -> None:
    """With the middleware, metadata tb_run_id charges both agents of a graph to one run."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "budgets": [{"scope": "run:*", "calls": 3, "window": "total"}],
        }
    )
    researcher = FakeChatModel(model="gpt-4o", responses=researcher_script)
    writer = FakeChatModel(model="gpt-4o-mini")
    graph = build_graph(researcher, writer, middleware=[TokenBudgetMiddleware(guard)])
    out = graph.invoke(
        {"messages": [("user", "go")]}, config={"metadata": {"tb_run_id": "ticket-7"}}
    )
    assert (researcher.call_count, writer.call_count) == (3, 0)
    # the researcher used the run's 3 calls, so the writer's first call ends it gracefully
    finals = [
        m for m in out["messages"] if m.response_metadata.get("finish_reason") == "budget_exhausted"
    ]
    assert len(finals) == 1 and "run:ticket-7" in finals[0].content
