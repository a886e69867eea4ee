"""TokenBudgetCallbackHandler through real LangChain runnables: reserve, settle, refuse, under
invoke/ainvoke/stream/astream/batch/abatch, with abandoned streams, concurrency and pruning."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tracemalloc
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from langchain.agents.middleware._retry import default_retry_on
from langchain_core.exceptions import ModelError
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from tb_plugins import BudgetExceeded, BudgetGuard, BudgetRefused, LoopLimitExceeded, count_tokens
from tb_plugins.integrations.langchain import (
    BudgetExceededError,
    LoopLimitExceededError,
    TokenBudgetCallbackHandler,
    budget_scope,
)
from tb_plugins.testing.fake_chat_model import FakeChatModel

NOW = 1_800_000_000.0
PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "Tell me about {x}")])


def make_guard(budgets: list[dict[str, Any]], **policy: Any) -> BudgetGuard:
    """A memory-ledger guard at a fixed time; a roomy global budget makes spend visible."""
    budgets = [{"scope": "global", "tokens": 10**9, "window": "day"}, *budgets]
    return BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "default_output_tokens": 64,
            "budgets": budgets,
            **policy,
        },
        clock=lambda: NOW,
    )


def totals(guard: BudgetGuard, scope: str = "global") -> tuple[float, float]:
    """(spent, held) tokens on a scope's first tokens budget."""
    row = next(s for s in guard.status(scope) if s.unit == "tokens")
    return row.spent, row.reserved


def prompt_tokens(model: str = "gpt-4o") -> int:
    return count_tokens(
        model,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about x"},
        ],
    )


def record(guard: BudgetGuard, event: str) -> list[Any]:
    seen: list[Any] = []
    guard.listeners.append(lambda ev, d: seen.append(d) if ev == event else None)
    return seen


# -- enforcement in every calling style ----------------------------------------------------

MODES = ["invoke", "ainvoke", "stream", "astream", "batch", "abatch"]


async def run(chain: Any, mode: str, config: dict[str, Any], n: int = 1) -> list[Any]:
    inputs = [{"x": "x"}] * n
    if mode == "invoke":
        return [chain.invoke(i, config=config) for i in inputs]
    if mode == "ainvoke":
        return [await chain.ainvoke(i, config=config) for i in inputs]
    if mode == "stream":
        return [list(chain.stream(i, config=config)) for i in inputs]
    if mode == "astream":
        out = []
        for i in inputs:
            out.append([c async for c in chain.astream(i, config=config)])
        return out
    if mode == "batch":
        return chain.batch(inputs, config=config)
    return await chain.abatch(inputs, config=config)


@pytest.mark.parametrize("mode", MODES)
async def test_settles_exact_usage_in_every_calling_style(mode: str) -> None:
    """Each call is charged the usage the model reported, whichever way the chain is run."""
    guard = make_guard([{"scope": "global", "tokens": 100_000, "window": "day"}])
    handler = TokenBudgetCallbackHandler(guard, scopes=["team:a"])
    model = FakeChatModel(model="gpt-4o", responses=["one two three"] * 3)
    await run(PROMPT | model, mode, {"callbacks": [handler]}, n=3)
    assert model.call_count == 3
    assert totals(guard) == (3 * (prompt_tokens() + 3), 0)
    assert handler.open_runs == 0


@pytest.mark.parametrize("mode", MODES)
async def test_blocked_call_never_reaches_the_model(mode: str) -> None:
    """A call the budget cannot hold raises BudgetExceededError before the model is called."""
    guard = make_guard([{"scope": "team:a", "tokens": 50, "window": "day"}])
    denied = record(guard, "deny")
    handler = TokenBudgetCallbackHandler(guard, scopes=["team:a"])
    model = FakeChatModel(model="gpt-4o")
    with pytest.raises(BudgetExceededError) as info:
        await run(PROMPT | model, mode, {"callbacks": [handler]})
    assert model.call_count == 0
    assert len(denied) == 1 and info.value.scope == "team:a"
    assert totals(guard, "team:a") == (0, 0)
    assert handler.open_runs == 0


def test_handler_registered_in_the_model_constructor_enforces() -> None:
    """A handler passed to the model's constructor checks every call of that model."""
    guard = make_guard([{"scope": "global", "requests": 2, "window": "day"}])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", callbacks=[handler])
    model.invoke("a")
    (PROMPT | model).invoke({"x": "b"})
    with pytest.raises(BudgetExceededError):
        model.invoke("c")
    assert model.call_count == 2


def test_settles_cached_and_reasoning_tokens() -> None:
    """Cached input and reasoning tokens from usage_metadata reach the usage log."""
    guard = make_guard([])
    charges = record(guard, "settle")
    model = FakeChatModel(model="gpt-4o", cached_input_tokens=5, reasoning_tokens=7)
    msg = model.invoke("hi", config={"callbacks": [TokenBudgetCallbackHandler(guard)]})
    (event,) = charges
    assert event["charge"].cached_input_tokens == 5
    assert event["charge"].output_tokens == msg.usage_metadata["output_tokens"]
    assert guard.usage(group_by="model")[0].cached_input_tokens == 5


def test_model_error_releases_the_hold() -> None:
    """A model call that fails before answering is released: nothing spent, nothing held."""
    guard = make_guard([])
    model = FakeChatModel(model="gpt-4o", responses=[RuntimeError("down")])
    handler = TokenBudgetCallbackHandler(guard)
    with pytest.raises(RuntimeError):
        (PROMPT | model).invoke({"x": "x"}, config={"callbacks": [handler]})
    assert totals(guard) == (0, 0) and handler.open_runs == 0


# -- streams without usage, cut short ------------------------------------------------------


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_stream_without_usage_is_charged_its_estimate(mode: str) -> None:
    """A stream that reports no usage is charged its estimate (prompt + max_tokens), not zero."""
    guard = make_guard([])
    model = FakeChatModel(model="gpt-4o", stream_usage=False, max_tokens=40)
    charges = record(guard, "settle")
    await run(PROMPT | model, mode, {"callbacks": [TokenBudgetCallbackHandler(guard)]})
    (event,) = charges
    assert event["charge"].estimated
    assert totals(guard) == (prompt_tokens() + 40, 0)


def test_sync_stream_abandoned_half_way_leaves_no_hold_and_is_charged_its_estimate() -> None:
    """Breaking out of chain.stream() half way settles the call at its estimate: no hold."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", reply="a long answer " * 20)
    for i, _chunk in enumerate(
        (PROMPT | model).stream({"x": "x"}, config={"callbacks": [handler]})
    ):
        if i == 3:
            break
    gc.collect()
    assert totals(guard) == (prompt_tokens() + 64, 0)
    assert handler.open_runs == 0


async def test_async_model_stream_closed_half_way_is_charged_its_estimate_at_once() -> None:
    """Closing a model's astream() half way settles the call at its estimate at once."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", reply="a long answer " * 20)
    messages = PROMPT.invoke({"x": "x"})
    stream = model.astream(messages, config={"callbacks": [handler]})
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    assert totals(guard) == (prompt_tokens() + 64, 0)
    assert handler.open_runs == 0


def test_async_chain_stream_abandoned_half_way_is_charged_its_estimate() -> None:
    """An async chain stream left half way is charged its estimate, with no hold left, once
    Python finalizes its generators (at the latest when the event loop shuts down)."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", reply="a long answer " * 20)

    async def abandon() -> None:
        stream = (PROMPT | model).astream({"x": "x"}, config={"callbacks": [handler]})
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
        assert totals(guard) == (0, prompt_tokens() + 64)  # LangChain has not told us yet

    asyncio.run(abandon())
    assert totals(guard) == (prompt_tokens() + 64, 0)
    assert handler.open_runs == 0


async def test_cancelled_ainvoke_is_charged_its_estimate() -> None:
    """A call cancelled while the model runs is charged its estimate (the provider bills it)."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(x: Any) -> Any:
        started.set()
        await release.wait()
        return x

    model = FakeChatModel(model="gpt-4o")
    chain = RunnableLambda(lambda x: x) | model.with_config(run_name="m") | RunnableLambda(slow)
    task = asyncio.create_task(chain.ainvoke("hi", config={"callbacks": [handler]}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the model call had finished: it is settled with its usage; the root's end pruned the tree
    assert totals(guard)[1] == 0 and totals(guard)[0] > 0
    assert handler.open_runs == 0


def test_root_run_ending_settles_model_calls_left_open() -> None:
    """When a root run ends while a model run under it never reported back (e.g. an async
    generator never closed), the hold is settled at its estimate as the tree is pruned."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    root, llm = uuid.uuid4(), uuid.uuid4()
    handler.on_chain_start({}, {}, run_id=root, name="pipeline")
    handler.on_chat_model_start(
        {},
        [[*PROMPT.invoke({"x": "x"}).to_messages()]],
        run_id=llm,
        parent_run_id=root,
        metadata={"ls_model_name": "gpt-4o"},
        invocation_params={"max_tokens": 30},
    )
    assert totals(guard) == (0, prompt_tokens() + 30)
    handler.on_chain_error(GeneratorExit(), run_id=root)
    assert totals(guard) == (prompt_tokens() + 30, 0)
    assert handler.open_runs == 0


def test_failure_after_output_began_is_charged_its_estimate() -> None:
    """A stream that fails after producing output is charged its estimate, not released."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    llm = uuid.uuid4()
    handler.on_chat_model_start(
        {},
        [[*PROMPT.invoke({"x": "x"}).to_messages()]],
        run_id=llm,
        metadata={"ls_model_name": "gpt-4o"},
    )
    partial = LLMResult(generations=[[ChatGenerationChunk(message=AIMessageChunk(content="Hal"))]])
    handler.on_llm_error(ConnectionError("reset"), run_id=llm, response=partial)
    assert totals(guard) == (prompt_tokens() + 64, 0)


# -- scope path ------------------------------------------------------------------------------


def test_scope_path_has_handler_metadata_chain_and_run_scopes() -> None:
    """The path is handler scopes + team/user/tb_scopes from metadata + chain:<root name> +
    run:<root run id>."""
    guard = make_guard([])
    decisions = record(guard, "decision")
    handler = TokenBudgetCallbackHandler(guard, scopes=["org:acme"])
    chain = (PROMPT | FakeChatModel(model="gpt-4o")).with_config(run_name="qa_chain")
    run_id = uuid.uuid4()
    chain.invoke(
        {"x": "x"},
        config={
            "callbacks": [handler],
            "run_id": run_id,
            "metadata": {"user_id": "alice", "team": "search", "tb_scopes": ["feature:faq"]},
        },
    )
    assert decisions[0]["decision"].scopes == (
        "global",
        "org:acme",
        "team:search",
        "user:alice",
        "feature:faq",
        "chain:qa_chain",
        f"run:{run_id}",
    )


def test_bare_model_call_is_its_own_run_without_chain_scope() -> None:
    """A model invoked outside any chain is charged to run:<its run id> and no chain scope."""
    guard = make_guard([])
    decisions = record(guard, "decision")
    run_id = uuid.uuid4()
    FakeChatModel(model="gpt-4o").invoke(
        "hi", config={"callbacks": [TokenBudgetCallbackHandler(guard)], "run_id": run_id}
    )
    assert decisions[0]["decision"].scopes == ("global", f"run:{run_id}")


def test_calls_limit_per_run_cuts_off_a_chain_loop() -> None:
    """A run:* calls limit stops the 4th model call of a chain run with LoopLimitExceededError."""
    guard = make_guard([{"scope": "run:*", "calls": 3, "window": "total"}])
    model = FakeChatModel(model="gpt-4o")

    def loop(x: Any, config: Any) -> Any:
        for _ in range(10):
            model.invoke("again", config=config)
        return x

    handler = TokenBudgetCallbackHandler(guard)
    with pytest.raises(LoopLimitExceededError) as info:
        RunnableLambda(loop).invoke("go", config={"callbacks": [handler]})
    assert isinstance(info.value, LoopLimitExceeded)
    assert model.call_count == 3
    RunnableLambda(lambda x: model.invoke(x)).invoke("go", config={"callbacks": [handler]})
    assert model.call_count == 4  # a new root run has its own calls budget
    assert handler.open_runs == 0


# -- registration ------------------------------------------------------------------------------


async def test_budget_scope_attaches_the_handler_to_every_run_sync_and_async() -> None:
    """Inside budget_scope every run is checked, with and without async, and outside it none."""
    guard = make_guard([])
    decisions = record(guard, "decision")
    model = FakeChatModel(model="gpt-4o")
    with budget_scope(guard, ["team:a"]) as handler:
        (PROMPT | model).invoke({"x": "x"})
        await (PROMPT | model).ainvoke({"x": "x"})
    async with budget_scope(guard, ["team:b"]):
        await model.ainvoke("hi")
    model.invoke("not guarded")
    assert [d["decision"].scopes[1] for d in decisions] == ["team:a", "team:a", "team:b"]
    assert handler.open_runs == 0


def test_nested_budget_scopes_charge_once_with_both_scopes() -> None:
    """A budget_scope inside another charges each call once, to the union of their scopes."""
    guard = make_guard([])
    settled = record(guard, "settle")
    model = FakeChatModel(model="gpt-4o")

    def inner(x: Any) -> Any:
        with budget_scope(guard, ["user:bob"]):
            return model.invoke(x)

    with budget_scope(guard, ["team:a"]):
        RunnableLambda(inner).invoke("hi")
    (event,) = settled
    assert {"team:a", "user:bob"} <= set(event["decision"].scopes)


# -- errors ------------------------------------------------------------------------------------


def test_refusals_are_non_retryable_model_errors_with_their_fields() -> None:
    """The raised class is both the tb_plugins refusal and a non-retryable LangChain ModelError,
    so ModelRetryMiddleware's default retry_on says no; a plain BudgetExceeded it would retry."""
    guard = make_guard([{"scope": "team:a", "tokens": 10, "window": "day"}])
    with pytest.raises(BudgetExceededError) as info:
        FakeChatModel(model="gpt-4o").invoke(
            "hi", config={"callbacks": [TokenBudgetCallbackHandler(guard, ["team:a"])]}
        )
    err = info.value
    assert isinstance(err, BudgetExceeded) and isinstance(err, BudgetRefused)
    assert isinstance(err, ModelError) and err.is_retryable is False
    assert default_retry_on(err) is False
    plain = BudgetExceeded(
        scope="s:x", budget="b", unit="tokens", spent=1, limit=1, requested=1, resets_at=None
    )
    assert default_retry_on(plain) is True
    assert err.to_dict()["scope"] == "team:a" and err.limit == 10 and "team:a" in str(err)


# -- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["requests", "tokens"])
async def test_20_concurrent_ainvoke_admit_exactly_k(unit: str) -> None:
    """Twenty concurrent ainvoke calls against a budget that holds exactly K let exactly K
    reach the model; the others are refused before it."""
    k = 7
    model = FakeChatModel(model="gpt-4o", reply="word " * 100, max_tokens=20)
    cost = prompt_tokens() + 20  # the estimate, and exactly what each call uses
    limit = k if unit == "requests" else k * cost + cost - 1
    guard = make_guard([{"scope": "team:a", unit: limit, "window": "day"}])
    handler = TokenBudgetCallbackHandler(guard, ["team:a"])
    chain = PROMPT | model
    results = await asyncio.gather(
        *(chain.ainvoke({"x": "x"}, config={"callbacks": [handler]}) for _ in range(20)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert model.call_count == k
    assert len(refused) == 20 - k and all(isinstance(r, BudgetExceededError) for r in refused)
    assert totals(guard) == (k * cost, 0)
    assert handler.open_runs == 0


def test_batch_from_many_threads_settles_every_call_exactly() -> None:
    """A batch of 60 on 8 threads settles every call exactly and leaves the handler empty."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", reply="one two", record=0)
    (PROMPT | model).batch([{"x": "x"}] * 60, config={"callbacks": [handler], "max_concurrency": 8})
    assert totals(guard) == (60 * (prompt_tokens() + 2), 0)
    assert handler.open_runs == 0


# -- memory ----------------------------------------------------------------------------------


class _NullGuard:
    """Admits everything and keeps nothing, so only the handler's own memory is measured."""

    def check_request(self, request: Any) -> Any:
        return SimpleNamespace(model=request.model, reservation_id=request.reservation_id)

    def settle(self, decision: Any, usage: Any = None) -> None:
        return None

    def release(self, decision: Any) -> None:
        return None


_MESSAGES = [PROMPT.invoke({"x": "x"}).to_messages()]


def _one_agent_run(handler: TokenBudgetCallbackHandler, i: int) -> None:
    """The callbacks LangGraph sends for one agent run: graph, node, model, tool; every 7th
    run abandons its model call and every 11th fails in the tool."""
    messages = _MESSAGES
    root, node, llm, tool = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    handler.on_chain_start(None, {}, run_id=root, name="LangGraph")
    handler.on_chain_start(None, {}, run_id=node, parent_run_id=root, name="model")
    handler.on_chat_model_start(
        {},
        messages,
        run_id=llm,
        parent_run_id=node,
        metadata={"ls_model_name": "gpt-4o", "lc_agent_name": "a"},
    )
    if i % 7:
        handler.on_llm_end(LLMResult(generations=[]), run_id=llm)
    handler.on_chain_end({}, run_id=node)
    handler.on_tool_start(None, "q", run_id=tool, parent_run_id=root, name="search")
    if i % 11:
        handler.on_tool_end("ok", run_id=tool)
    handler.on_chain_end({}, run_id=root)


def test_memory_stays_flat_over_10000_runs() -> None:
    """Over 10,000 agent-shaped runs (some abandoned, some failing) the handler's run tree is
    pruned after each root ends: its maps end empty and its allocations do not grow."""
    handler = TokenBudgetCallbackHandler(_NullGuard())  # type: ignore[arg-type]
    for i in range(1000):
        _one_agent_run(handler, i)
    assert handler.open_runs == 0
    gc.collect()
    tracemalloc.start()
    try:
        only_handler = [tracemalloc.Filter(True, "*tb_plugins/integrations/*")]
        before = tracemalloc.take_snapshot().filter_traces(only_handler)
        for i in range(10_000):
            _one_agent_run(handler, i)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(only_handler)
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 16_384, growth
    assert handler.open_runs == 0
    assert not handler._root_of and not handler._roots and not handler._holds


def test_real_runs_leave_no_tree_entries() -> None:
    """After 300 real chain runs (invoke, stream abandoned, errors) the handler holds nothing."""
    guard = make_guard([])
    handler = TokenBudgetCallbackHandler(guard)
    model = FakeChatModel(model="gpt-4o", record=0)
    chain = RunnableLambda(lambda x: x) | PROMPT | model
    for i in range(300):
        if i % 3 == 0:
            chain.invoke({"x": "x"}, config={"callbacks": [handler]})
        elif i % 3 == 1:
            for _ in chain.stream({"x": "x"}, config={"callbacks": [handler]}):
                break
        else:
            with pytest.raises(KeyError):
                chain.invoke({"y": "no x"}, config={"callbacks": [handler]})
    gc.collect()
    assert handler.open_runs == 0
    assert totals(guard)[1] == 0


# -- packaging -----------------------------------------------------------------------------


def test_import_tb_plugins_does_not_import_langchain() -> None:
    """`import tb_plugins` loads no LangChain or LangGraph module (they are optional)."""
    code = (
        "import sys, tb_plugins, tb_plugins.engine, tb_plugins.integrations\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('langchain', 'langchain_core', 'langgraph', 'langsmith'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
