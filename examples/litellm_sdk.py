"""Token budgets on LiteLLM SDK calls: acompletion, Router, streams and sync completion.

Runs offline against tb_plugins' fake OpenAI server on 127.0.0.1 (exact usage, no key)::

    python examples/litellm_sdk.py

It walks one policy through allow -> clamp -> downgrade -> deny, then shows a Router
downgrade served by the cheaper deployment with its own key, a stream charged its exact
usage, and ``guarded_completion`` for sync calls.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # prices offline

import asyncio

import litellm

from tb_plugins import BudgetExceeded, BudgetGuard
from tb_plugins.integrations.litellm import TokenBudgetLogger, guarded_completion
from tb_plugins.testing.fake_openai import FakeOpenAI

POLICY = {
    "ledger": "memory://",  # sqlite:///tb_ledger.db to keep the spend
    "downgrade": {"gpt-4o": "gpt-4o-mini"},
    "budgets": [
        {"scope": "user:alice", "limit": "400 tokens/day", "downgrade_at": 0.5},
        {"scope": "team:search", "limit": "100k tokens/day"},
    ],
}
HELLO = [{"role": "user", "content": "Say hello to the budget."}]


async def wait_settled(logger: TokenBudgetLogger) -> None:
    """LiteLLM reports success asynchronously; wait for it before reading the ledger."""
    for _ in range(500):
        if not logger.holds:
            return
        await asyncio.sleep(0.01)


def show(guard: BudgetGuard, scope: str) -> None:
    for st in guard.status(scope):
        print(f"    {st.budget}: {st.spent:,.0f} of {st.limit:,.0f} {st.unit} spent")


async def main() -> None:
    with FakeOpenAI() as fake:
        guard = BudgetGuard.from_dict(POLICY)
        router = litellm.Router(
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
            ]
        )
        logger = TokenBudgetLogger(guard, scopes=["team:search"], router=router)
        litellm.callbacks = [logger]  # register once per process

        print("1. Alice's calls through Router.acompletion (400 tokens/day, downgrade at 50%):")
        for max_tokens in (60, 60, 300, 60, 60, 60, 60):
            try:
                await router.acompletion(
                    model="gpt-4o",
                    messages=HELLO,
                    max_tokens=max_tokens,
                    metadata={"tb_scopes": ["user:alice"]},
                )
                await wait_settled(logger)
                served = fake.requests[-1]
                print(
                    f"   asked gpt-4o max_tokens={max_tokens}: served by {served.model} "
                    f"(key {served.api_key}) with max_tokens={served.max_tokens}, "
                    f"used {served.prompt_tokens}+{served.completion_tokens} tokens"
                )
            except BudgetExceeded as err:
                print(f"   refused: {err}")
        show(guard, "user:alice")

        print("2. A stream is charged the usage of its final chunk:")
        stream = await litellm.acompletion(
            model="openai/gpt-4o",
            messages=HELLO,
            max_tokens=25,
            stream=True,
            api_base=fake.base_url,
            api_key="sk-fake",
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await wait_settled(logger)
        served = fake.requests[-1]
        print(
            f"   {text[:50]!r}... include_usage={served.include_usage}, "
            f"charged {served.prompt_tokens + served.completion_tokens} tokens"
        )

        print("3. Sync litellm.completion goes through guarded_completion:")
        reply = guarded_completion(
            guard,
            scopes=["team:search"],
            model="openai/gpt-4o",
            messages=HELLO,
            max_tokens=20,
            api_base=fake.base_url,
            api_key="sk-fake",
        )
        print(
            f"   {reply.choices[0].message.content[:50]!r}..., "
            f"{reply.usage.total_tokens} tokens charged"
        )
        show(guard, "team:search")


if __name__ == "__main__":
    asyncio.run(main())
