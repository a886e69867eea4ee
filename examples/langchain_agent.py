"""Token budgets on a LangChain agent: middleware for create_agent, a handler for chains.

Runs offline against tb_plugins' fake OpenAI server on 127.0.0.1 (exact usage, no key)::

    python examples/langchain_agent.py

For real calls, drop the fake server and the ``base_url``/``api_key`` arguments and set
``OPENAI_API_KEY``. The agent below answers a few questions under a small team budget: it is
downgraded to gpt-4o-mini past 60 %, clamped near the limit, and ends gracefully when the
budget is spent; then a plain chain is refused by the callback handler.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # prices offline

from langchain.agents import create_agent
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tb_plugins import BudgetExceeded, BudgetGuard
from tb_plugins.integrations.langchain import TokenBudgetCallbackHandler, TokenBudgetMiddleware
from tb_plugins.testing.fake_openai import FakeOpenAI

POLICY = {
    "ledger": "memory://",  # sqlite:///tb_ledger.db to keep the spend across runs
    "downgrade": {"gpt-4o": "gpt-4o-mini"},
    "alerts": [{"log": "warning"}],
    "budgets": [
        {
            "scope": "team:research",
            "limit": "900 tokens/day",
            "alerts": [0.5, 0.8],
            "downgrade_at": 0.6,
        },
        {"scope": "run:*", "calls": 6, "window": "total"},  # agent-loop cutoff
    ],
}


@tool
def lookup(topic: str) -> str:
    """Look a topic up in the team wiki."""
    return f"The wiki says: {topic} are agreed per team and per day."


def main() -> None:
    server = FakeOpenAI().start()  # a local stand-in for api.openai.com
    guard = BudgetGuard.from_dict(POLICY)

    def chat(model: str) -> ChatOpenAI:
        settings = {"base_url": server.base_url, "api_key": "sk-local", "max_tokens": 120}
        return ChatOpenAI(model=model, **settings)  # type: ignore[arg-type]

    agent = create_agent(
        chat("gpt-4o"),
        tools=[lookup],
        name="researcher",
        middleware=[
            TokenBudgetMiddleware(
                guard,
                scopes=["team:research", "user:ann"],
                models={"gpt-4o-mini": chat("gpt-4o-mini")},
            ),
        ],
    )
    for i in range(6):
        server.script(tool_calls=[{"name": "lookup", "arguments": {"topic": "budgets"}}])
        before = len(server.requests)
        result = agent.invoke({"messages": [("user", f"Question {i}: how do budgets work?")]})
        last = result["messages"][-1]
        served = [r.model for r in server.requests[before:]]
        print(f"run {i}: served by {served}; answer: {str(last.content)[:70]!r}")
        if last.response_metadata.get("finish_reason") == "budget_exhausted":
            break

    # A plain chain under the callback handler: it allows or refuses (it cannot downgrade).
    handler = TokenBudgetCallbackHandler(guard, scopes=["team:research"])
    chain = ChatPromptTemplate.from_template("Summarise: {text}") | chat("gpt-4o")
    try:
        chain.invoke({"text": "the quarter"}, config={"callbacks": [handler]})
    except BudgetExceeded as exc:
        print("chain refused:", exc)

    for st in guard.status("team:research"):
        print(f"{st.budget}: {st.spent:,.0f} of {st.limit:,.0f} {st.unit} spent")
    server.stop()


if __name__ == "__main__":
    main()
