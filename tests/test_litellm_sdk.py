"""The LiteLLM SDK integration: TokenBudgetLogger on acompletion and Router, guarded_completion.

Real LiteLLM calls against the fake OpenAI server on 127.0.0.1 (exact usage), guards on the
memory ledger.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import litellm
import pytest
import pytest_asyncio

from tb_plugins import BudgetExceeded, BudgetGuard, Usage, count_tokens
from tb_plugins.integrations.litellm import (
    TokenBudgetLogger,
    guarded_completion,
    request_view,
    usage_of,
)
from tb_plugins.testing.fake_openai import FakeOpenAI

# LiteLLM's background logging worker belongs to the event loop that first used it, as in an
# application; the async tests share one loop so success events keep flowing.
same_loop = pytest.mark.asyncio(loop_scope="module")

MESSAGES = [{"role": "user", "content": "Hello there"}]
PROMPT = count_tokens("gpt-4o", MESSAGES)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def guard() -> BudgetGuard:
    return BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "downgrade": {"gpt-4o": "gpt-4o-mini"},
            "budgets": [
                {"scope": "user:alice", "tokens": 10_000, "window": "day"},
                {"scope": "user:small", "tokens": 100, "window": "day"},
                {"scope": "user:broke", "tokens": 5, "window": "day"},
                {
                    "scope": "team:thrifty",
                    "tokens": 100_000,
                    "window": "day",
                    "downgrade_at": 0.001,
                },
            ],
        }
    )


def spend(guard: BudgetGuard, scope: str, tokens: int) -> None:
    """Put ``tokens`` of settled spend on ``scope`` (to pass a downgrade_at threshold)."""
    d = guard.check("gpt-4o", MESSAGES, max_tokens=tokens, scopes=[scope])
    guard.settle(d, Usage(input_tokens=0, output_tokens=tokens))


def spent(guard: BudgetGuard, scope: str) -> tuple[float, float]:
    st = next(s for s in guard.status(scope) if s.unit == "tokens")
    return st.spent, st.reserved


@pytest.fixture(scope="module")
def registered() -> Iterator[TokenBudgetLogger]:
    """One logger registered for the module, as an application registers it once: LiteLLM
    copies ``litellm.callbacks`` into its success/failure lists on first use."""
    saved = list(litellm.callbacks)
    tb = TokenBudgetLogger(BudgetGuard.from_dict({"ledger": "memory://"}))
    litellm.callbacks = [tb]
    try:
        yield tb
    finally:
        litellm.logging_callback_manager.remove_callback_from_all_lists(tb)
        litellm.callbacks = saved


@pytest_asyncio.fixture(loop_scope="module")
async def logger(
    registered: TokenBudgetLogger, guard: BudgetGuard
) -> AsyncIterator[TokenBudgetLogger]:
    """The registered logger, on this test's guard."""
    registered.guard, registered.router = guard, None
    yield registered
    await drained(registered)


async def drained(tb: TokenBudgetLogger, timeout: float = 10.0) -> None:
    """Wait until LiteLLM's (asynchronous) success/failure events have reached the logger."""
    deadline = asyncio.get_running_loop().time() + timeout
    while tb.holds and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert tb.holds == 0, "a hold was neither settled nor released"


def direct(fake: FakeOpenAI, **kwargs: Any) -> dict[str, Any]:
    return {"api_base": fake.base_url, "api_key": "sk-fake", "messages": MESSAGES, **kwargs}


def router(fake: FakeOpenAI) -> litellm.Router:
    return litellm.Router(
        model_list=[
            {
                "model_name": "gpt-4o",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": fake.base_url,
                    "api_key": "sk-big",
                },
            },
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": fake.base_url,
                    "api_key": "sk-small",
                },
            },
        ],
        num_retries=2,
    )


# -- acompletion ---------------------------------------------------------------------------


@same_loop
async def test_acompletion_is_charged_its_exact_usage(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """An allowed acompletion is settled with the usage the provider reported."""
    r = await litellm.acompletion(
        model="openai/gpt-4o", max_tokens=20, metadata={"tb_scopes": ["user:alice"]}, **direct(fake)
    )
    await drained(logger)
    assert r.usage.total_tokens == PROMPT + 20
    assert spent(guard, "user:alice") == (PROMPT + 20, 0)


@same_loop
async def test_acompletion_priority_comes_from_the_app_s_metadata(
    fake: FakeOpenAI, logger: TokenBudgetLogger
) -> None:
    """`metadata={"tb_priority": "low"}` (set by the application) makes a call low priority:
    it stops at its `stop_at` share while a normal call goes on."""
    budget = {"scope": "team:p", "tokens": 1000, "window": "day", "stop_at": {"low": 0.1}}
    shared = BudgetGuard.from_dict({"ledger": "memory://", "budgets": [budget]})
    logger.guard = shared
    spend(shared, "team:p", 200)
    with pytest.raises(BudgetExceeded):
        await litellm.acompletion(
            model="openai/gpt-4o", max_tokens=20,
            metadata={"tb_scopes": ["team:p"], "tb_priority": "low"}, **direct(fake),
        )  # fmt: skip
    r = await litellm.acompletion(
        model="openai/gpt-4o", max_tokens=20, metadata={"tb_scopes": ["team:p"]}, **direct(fake)
    )
    assert r.usage.completion_tokens == 20
    await drained(logger)


@same_loop
async def test_acompletion_max_tokens_is_clamped_to_what_is_left(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A call asking for more than its budget has left goes out with a lower max_tokens."""
    before = len(fake.requests)
    await litellm.acompletion(
        model="openai/gpt-4o",
        max_tokens=500,
        metadata={"tb_scopes": ["user:small"]},
        **direct(fake),
    )
    await drained(logger)
    assert fake.requests[before].max_tokens == 100 - PROMPT


@same_loop
async def test_acompletion_downgrade_calls_the_cheaper_model(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """Past downgrade_at, acompletion(model="openai/gpt-4o") is sent as openai/gpt-4o-mini."""
    spend(guard, "team:thrifty", 200)
    before = len(fake.requests)
    r = await litellm.acompletion(
        model="openai/gpt-4o",
        max_tokens=10,
        metadata={"tb_scopes": ["team:thrifty"]},
        **direct(fake),
    )
    await drained(logger)
    assert fake.requests[before].model == "gpt-4o-mini"
    assert r.model == "gpt-4o-mini"


@same_loop
async def test_acompletion_refused_raises_budget_exceeded_and_sends_nothing(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A call over budget raises BudgetExceeded naming the scope; nothing reaches the provider."""
    before = len(fake.requests)
    with pytest.raises(BudgetExceeded) as caught:
        await litellm.acompletion(
            model="openai/gpt-4o",
            max_tokens=10,
            metadata={"tb_scopes": ["user:broke"]},
            **direct(fake),
        )
    assert caught.value.scope == "user:broke"
    assert len(fake.requests) == before
    assert spent(guard, "user:broke") == (0, 0)


@same_loop
async def test_acompletion_stream_gets_include_usage_and_is_charged_exactly(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A stream is sent with stream_options.include_usage and settled with the final usage."""
    before = len(fake.requests)
    stream = await litellm.acompletion(
        model="openai/gpt-4o",
        max_tokens=15,
        stream=True,
        metadata={"tb_scopes": ["user:alice"]},
        **direct(fake),
    )
    async for _ in stream:
        pass
    await drained(logger)
    served = fake.requests[before]
    assert served.include_usage
    assert spent(guard, "user:alice") == (served.prompt_tokens + served.completion_tokens, 0)


@same_loop
async def test_failed_acompletion_releases_its_hold(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A call the provider fails is released: no hold, no charge."""
    fake.script(fail=500, times=None)
    try:
        with pytest.raises(litellm.InternalServerError):
            await litellm.acompletion(
                model="openai/gpt-4o",
                max_tokens=10,
                num_retries=0,
                metadata={"tb_scopes": ["user:alice"]},
                **direct(fake),
            )
    finally:
        fake.reset()
    await drained(logger)
    assert spent(guard, "user:alice") == (0, 0)


@same_loop
async def test_aembedding_is_charged_its_input_tokens(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """An embedding call holds and is charged its input tokens only."""
    r = await litellm.aembedding(
        model="openai/text-embedding-3-small",
        input=["one two", "three"],
        api_base=fake.base_url,
        api_key="sk-fake",
        metadata={"tb_scopes": ["user:alice"]},
    )
    await drained(logger)
    assert spent(guard, "user:alice") == (r.usage.prompt_tokens, 0)


# -- Router --------------------------------------------------------------------------------


@same_loop
async def test_router_allows_and_settles(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """Router.acompletion within budget is served by the deployment asked for and settled."""
    logger.router = rt = router(fake)
    before = len(fake.requests)
    await rt.acompletion(
        model="gpt-4o", messages=MESSAGES, max_tokens=10, metadata={"tb_scopes": ["user:alice"]}
    )
    await drained(logger)
    assert (fake.requests[before].model, fake.requests[before].api_key) == ("gpt-4o", "sk-big")
    assert spent(guard, "user:alice") == (PROMPT + 10, 0)


@same_loop
async def test_router_downgrade_uses_the_cheaper_deployment_and_its_credentials(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A downgraded Router call goes to the gpt-4o-mini deployment with that deployment's key."""
    logger.router = rt = router(fake)
    spend(guard, "team:thrifty", 200)
    before = len(fake.requests)
    await rt.acompletion(
        model="gpt-4o", messages=MESSAGES, max_tokens=10, metadata={"tb_scopes": ["team:thrifty"]}
    )
    await drained(logger)
    served = fake.requests[before]
    assert (served.model, served.api_key) == ("gpt-4o-mini", "sk-small")


@same_loop
async def test_router_without_router_argument_keeps_the_model(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A logger that does not know the Router cannot switch deployments: the call is allowed
    on the model asked for rather than sent to the cheaper model with the wrong credentials."""
    rt = router(fake)
    spend(guard, "team:thrifty", 200)
    before = len(fake.requests)
    await rt.acompletion(
        model="gpt-4o", messages=MESSAGES, max_tokens=10, metadata={"tb_scopes": ["team:thrifty"]}
    )
    await drained(logger)
    assert (fake.requests[before].model, fake.requests[before].api_key) == ("gpt-4o", "sk-big")


@same_loop
async def test_router_refusal_is_not_retried_nor_cools_the_deployment_down(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A refused Router call raises once (num_retries=2 is not used) and the deployment still
    serves the next caller."""
    logger.router = rt = router(fake)
    checks: list[str] = []
    guard.listeners.append(lambda event, data: checks.append(event))
    before = len(fake.requests)
    with pytest.raises(BudgetExceeded):
        await rt.acompletion(
            model="gpt-4o", messages=MESSAGES, max_tokens=10, metadata={"tb_scopes": ["user:broke"]}
        )
    assert checks.count("deny") == 1
    assert len(fake.requests) == before
    await rt.acompletion(
        model="gpt-4o", messages=MESSAGES, max_tokens=10, metadata={"tb_scopes": ["user:alice"]}
    )
    assert fake.requests[before].model == "gpt-4o"


@same_loop
async def test_router_stream_is_charged_its_reported_usage(
    fake: FakeOpenAI, guard: BudgetGuard, logger: TokenBudgetLogger
) -> None:
    """A streamed Router call is settled with the usage of the provider's final chunk."""
    logger.router = rt = router(fake)
    before = len(fake.requests)
    stream = await rt.acompletion(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        metadata={"tb_scopes": ["user:alice"]},
    )
    async for _ in stream:
        pass
    await drained(logger)
    served = fake.requests[before]
    assert served.include_usage
    assert spent(guard, "user:alice") == (served.prompt_tokens + served.completion_tokens, 0)


# -- guarded_completion (sync) -------------------------------------------------------------


def test_guarded_completion_checks_calls_and_settles(fake: FakeOpenAI, guard: BudgetGuard) -> None:
    """Sync guarded_completion clamps max_tokens to the budget and charges the real usage."""
    before = len(fake.requests)
    r = guarded_completion(
        guard, scopes=["user:small"], model="openai/gpt-4o", max_tokens=500, **direct(fake)
    )
    assert fake.requests[before].max_tokens == 100 - PROMPT
    assert spent(guard, "user:small") == (r.usage.total_tokens, 0)


def test_guarded_completion_refuses_before_calling(fake: FakeOpenAI, guard: BudgetGuard) -> None:
    """Sync guarded_completion raises BudgetExceeded and never calls the provider."""
    before = len(fake.requests)
    with pytest.raises(BudgetExceeded):
        guarded_completion(
            guard, scopes=["user:broke"], model="openai/gpt-4o", max_tokens=10, **direct(fake)
        )
    assert len(fake.requests) == before


def test_guarded_completion_downgrades(fake: FakeOpenAI, guard: BudgetGuard) -> None:
    """Sync guarded_completion sends the cheaper model past downgrade_at."""
    spend(guard, "team:thrifty", 200)
    before = len(fake.requests)
    guarded_completion(
        guard, scopes=["team:thrifty"], model="openai/gpt-4o", max_tokens=10, **direct(fake)
    )
    assert fake.requests[before].model == "gpt-4o-mini"


def test_guarded_completion_stream_settles_when_it_ends(
    fake: FakeOpenAI, guard: BudgetGuard
) -> None:
    """A sync stream through guarded_completion is charged its reported usage at its end."""
    before = len(fake.requests)
    for _ in guarded_completion(
        guard,
        scopes=["user:alice"],
        model="openai/gpt-4o",
        max_tokens=12,
        stream=True,
        **direct(fake),
    ):
        pass
    served = fake.requests[before]
    assert served.include_usage
    assert spent(guard, "user:alice") == (served.prompt_tokens + served.completion_tokens, 0)


def test_guarded_completion_releases_on_failure(fake: FakeOpenAI, guard: BudgetGuard) -> None:
    """A failed sync call leaves no hold and no charge."""
    fake.script(fail=500, times=None)
    try:
        with pytest.raises(litellm.InternalServerError):
            guarded_completion(
                guard,
                scopes=["user:alice"],
                model="openai/gpt-4o",
                max_tokens=10,
                num_retries=0,
                **direct(fake),
            )
    finally:
        fake.reset()
    assert spent(guard, "user:alice") == (0, 0)


# -- pieces --------------------------------------------------------------------------------


def test_request_view_reads_every_budgeted_api() -> None:
    """Chat, Responses, Anthropic messages and embeddings requests are read for the guard;
    other calls are not budgeted."""
    chat = request_view(
        "acompletion", {"model": "m", "max_completion_tokens": 7, "messages": MESSAGES}
    )
    assert chat is not None and (chat.max_tokens, chat.max_tokens_key) == (
        7,
        "max_completion_tokens",
    )
    resp = request_view(
        "aresponses",
        {"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 30},
    )
    assert resp is not None and resp.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    msgs = request_view(
        "anthropic_messages", {"model": "m", "system": "s", "max_tokens": 9, "messages": MESSAGES}
    )
    assert msgs is not None and msgs.messages is not None and msgs.messages[0]["role"] == "system"
    emb = request_view("aembedding", {"model": "m", "input": [[1, 2, 3], [4]]})
    assert emb is not None and (emb.input_tokens, emb.output_cap) == (4, 0)
    assert request_view("aimage_generation", {"model": "m"}) is None


def test_usage_of_reads_openai_responses_and_anthropic_shapes() -> None:
    """Usage is read from chat (prompt/completion), Responses and Anthropic (input/output,
    cache reads added) shapes."""
    chat = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
        }
    }
    assert usage_of(chat) == Usage(10, 5, cached_input_tokens=4)
    anthropic = {"usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 7}}
    assert usage_of(anthropic) == Usage(10, 2)
    assert usage_of(
        {}, {"standard_logging_object": {"prompt_tokens": 1, "completion_tokens": 2}}
    ) == Usage(1, 2)
    assert usage_of({}) is None
