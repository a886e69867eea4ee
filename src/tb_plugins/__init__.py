"""tb_plugins: token budgets for LLM applications.

Count tokens before and after every model call, charge each call to every budget on its scope
path (global, org, team, user, key, end user, feature, chain, agent, run), keep the spend in a
ledger many processes share, and allow, clamp, downgrade or refuse each call.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://",
    ...     "budgets": [{"scope": "global", "limit": "1M tokens/day"}]})
    >>> guard.check(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).action
    'allow'

Integrations live in their own modules and are imported by path:
``tb_plugins.integrations.langchain``, ``tb_plugins.integrations.litellm``,
``tb_plugins.integrations.litellm_proxy``.
"""

from tb_plugins.core.usage import Usage
from tb_plugins.counting import count_tokens
from tb_plugins.engine import BudgetGuard, BudgetStatus, Charge, Decision, Estimate
from tb_plugins.errors import (
    BudgetExceeded,
    BudgetRefused,
    ConfigError,
    LedgerError,
    LedgerUnavailable,
    LoopLimitExceeded,
    RequestTooLarge,
    TokenBudgetError,
    UnpricedModel,
)
from tb_plugins.ledger import ledger_from_url

__version__ = "0.1.0"

__all__ = [
    "BudgetExceeded",
    "BudgetGuard",
    "BudgetRefused",
    "BudgetStatus",
    "Charge",
    "ConfigError",
    "Decision",
    "Estimate",
    "LedgerError",
    "LedgerUnavailable",
    "LoopLimitExceeded",
    "RequestTooLarge",
    "TokenBudgetError",
    "UnpricedModel",
    "Usage",
    "__version__",
    "count_tokens",
    "ledger_from_url",
]
