"""with_budget_downgrade in plain chains: the cheaper model at downgrade_at, a lower max_tokens
near the limit, refusals, streaming and batches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.prompts import ChatPromptTemplate

from tb_plugins import BudgetGuard, count_tokens
from tb_plugins.integrations.langchain import (
    BudgetExceededError,
    TokenBudgetCallbackHandler,
    with_budget_downgrade,
)
from tb_plugins.testing.fake_chat_model import FakeChatModel

PROMPT = ChatPromptTemplate.from_template("Summarize {x}")


def make_guard(tokens: int, downgrade_at: float | None = 0.5) -> BudgetGuard:
    budget: dict[str, Any] = {"scope": "team:a", "tokens": tokens, "window": "day"}
    if downgrade_at is not None:
        budget["downgrade_at"] = downgrade_at
    return BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": [], "default_output_tokens": 100,
         "downgrade": {"gpt-4o": "gpt-4o-mini"}, "budgets": [budget]},
        clock=lambda: 1_800_000_000.0,
    )  # fmt: skip


def models() -> tuple[FakeChatModel, FakeChatModel]:
    reply = "word " * 60
    return FakeChatModel(model="gpt-4o", reply=reply), FakeChatModel(
        model="gpt-4o-mini", reply=reply
    )


def spent_held(guard: BudgetGuard) -> tuple[float, float]:
    (row,) = guard.status("team:a")
    return row.spent, row.reserved


def test_chain_switches_to_cheaper_model_then_clamps_then_refuses() -> None:
    """A chain runs the big model below downgrade_at, the cheaper one above it, lowers
    max_tokens when only a little is left, and raises BudgetExceededError at the end."""
    guard = make_guard(1000)
    big, small = models()
    chain = PROMPT | with_budget_downgrade(big, small, guard, scopes=["team:a"])
    served: list[tuple[str, int]] = []
    with pytest.raises(BudgetExceededError):
        for _ in range(50):
            msg = chain.invoke({"x": "the report"})
            served.append(
                (msg.response_metadata["model_name"], msg.usage_metadata["output_tokens"])
            )
    names = [name for name, _ in served]
    first_small = names.index("gpt-4o-mini")
    assert first_small >= 1 and set(names[first_small:]) == {"gpt-4o-mini"}
    assert any(out < 60 for _, out in served[first_small:])  # clamped calls were cut short
    assert big.call_count == first_small and small.call_count == len(served) - first_small
    spent, held = spent_held(guard)
    assert spent <= 1000 and held == 0


async def test_async_stream_and_batch_settle_exactly() -> None:
    """ainvoke, astream, stream and abatch through the helper settle the reported usage."""
    guard = make_guard(100_000, downgrade_at=None)
    big, small = models()
    step = with_budget_downgrade(big.bind(max_tokens=10), small, guard, scopes=["team:a"])
    chain = PROMPT | step
    await chain.ainvoke({"x": "a"})
    [c async for c in chain.astream({"x": "a"})]
    list(chain.stream({"x": "a"}))
    await chain.abatch([{"x": "a"}, {"x": "a"}])
    per_call = count_tokens("gpt-4o", [{"role": "user", "content": "Summarize a"}]) + 10
    assert spent_held(guard) == (5 * per_call, 0)
    assert big.call_count == 5 and small.call_count == 0


def test_abandoned_stream_is_charged_its_estimate() -> None:
    """Leaving a helper stream half way charges its estimate and leaves no hold."""
    guard = make_guard(100_000, downgrade_at=None)
    big, small = models()
    chain = PROMPT | with_budget_downgrade(big, small, guard, scopes=["team:a"])
    for i, _ in enumerate(chain.stream({"x": "a"})):
        if i == 2:
            break
    per_call = count_tokens("gpt-4o", [{"role": "user", "content": "Summarize a"}]) + 100
    assert spent_held(guard) == (per_call, 0)


def test_refused_call_reaches_neither_model() -> None:
    """A call that fits neither model raises before either is called."""
    guard = make_guard(20)
    big, small = models()
    with pytest.raises(BudgetExceededError):
        (PROMPT | with_budget_downgrade(big, small, guard, ["team:a"])).invoke({"x": "a"})
    assert big.call_count == small.call_count == 0


def test_handler_on_the_same_chain_stands_aside() -> None:
    """A TokenBudgetCallbackHandler on a chain using the helper does not charge its calls twice."""
    guard = make_guard(100_000, downgrade_at=None)
    settled: list[Any] = []
    guard.listeners.append(lambda ev, d: settled.append(d) if ev == "settle" else None)
    big, small = models()
    chain = PROMPT | with_budget_downgrade(big, small, guard, ["team:a"])
    handler = TokenBudgetCallbackHandler(guard)
    chain.invoke({"x": "a"}, config={"callbacks": [handler]})
    asyncio.run(chain.ainvoke({"x": "a"}, config={"callbacks": [handler]}))
    assert len(settled) == 2 and handler.open_runs == 0


def test_rejects_what_is_not_a_chat_model() -> None:
    """The helper says clearly when it is given something other than a chat model."""
    guard = make_guard(1000)
    step = with_budget_downgrade(PROMPT, FakeChatModel(), guard)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chat models"):
        step.invoke("x")
