"""LangChain and LangGraph: token budgets through a callback handler, agent middleware, and a
downgrade helper for plain chains.

Three ways to put a budget on LangChain calls, all sharing one :class:`~tb_plugins.BudgetGuard`:

* :class:`TokenBudgetCallbackHandler` reserves when a chat model (or LLM) run starts, settles
  from ``usage_metadata`` when it ends, and refuses by raising. It cannot change a request, so
  it only allows or refuses. Register it in the constructor (``ChatOpenAI(callbacks=[h])``),
  per call (``chain.invoke(x, config={"callbacks": [h]})``), or for everything in a block with
  :func:`budget_scope` (which also reaches runs LangGraph starts in its own threads and tasks).
* :class:`TokenBudgetMiddleware` for ``langchain.agents.create_agent`` applies the full decision
  ladder to each model call: the cheaper model at ``downgrade_at``, a lower ``max_tokens`` near
  the limit, and a graceful end of the agent (or an error) when a budget or the per-run
  ``calls`` limit is spent; it also refuses tool calls past a ``tool_calls`` budget (the agent
  gets a tool message saying why) and ends runs that loop (``repeats``) or last too long
  (``seconds``).
* :func:`with_budget_downgrade` does the same switch and clamp for a model in a plain chain.

Refusals are raised as :class:`BudgetRefusedError` subclasses. They are also
``langchain_core.exceptions.ModelError`` with ``is_retryable = False``, so
``ModelRetryMiddleware`` (default ``retry_on``) re-raises them at once instead of retrying and
then hiding them in an AI message.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> from tb_plugins.integrations.langchain import budget_scope
    >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "user:*", "limit": "10k tokens/day"}]})
    >>> with budget_scope(guard, scopes=["user:alice"]):
    ...     _ = FakeChatModel(model="gpt-4o-mini").invoke("hi")
    >>> guard.status("user:alice")[0].spent > 0
    True
"""

try:
    import langchain.agents  # noqa: F401
    import langgraph  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tb_plugins.integrations.langchain needs LangChain and LangGraph: "
        "pip install 'tb-plugins[langchain]'"
    ) from exc

from tb_plugins.integrations.langchain.downgrade import BudgetDowngrade, with_budget_downgrade
from tb_plugins.integrations.langchain.errors import (
    BudgetExceededError,
    BudgetRefusedError,
    LoopLimitExceededError,
    RequestTooLargeError,
    RunLimitExceededError,
    ToolLimitExceededError,
    UnpricedModelError,
)
from tb_plugins.integrations.langchain.handler import (
    BudgetScope,
    TokenBudgetCallbackHandler,
    budget_scope,
)
from tb_plugins.integrations.langchain.middleware import BudgetState, TokenBudgetMiddleware

__all__ = [
    "BudgetDowngrade",
    "BudgetExceededError",
    "BudgetRefusedError",
    "BudgetScope",
    "BudgetState",
    "LoopLimitExceededError",
    "RequestTooLargeError",
    "RunLimitExceededError",
    "TokenBudgetCallbackHandler",
    "TokenBudgetMiddleware",
    "ToolLimitExceededError",
    "UnpricedModelError",
    "budget_scope",
    "with_budget_downgrade",
]
