"""LiteLLM SDK integration: budgets on ``litellm.acompletion``, ``Router`` and sync calls.

``TokenBudgetLogger`` is a LiteLLM ``CustomLogger``. Register it once and every async call is
checked before it leaves the process::

    import litellm
    from tb_plugins import BudgetGuard
    from tb_plugins.integrations.litellm import TokenBudgetLogger

    guard = BudgetGuard.from_config("budgets.yaml")
    litellm.callbacks = [TokenBudgetLogger(guard, scopes=["team:search"])]
    await litellm.acompletion(model="gpt-4o", messages=[...], max_tokens=500)

* ``async_pre_call_deployment_hook`` (run by LiteLLM's async wrapper right before the
  provider call) reserves the estimate and applies the decision: a lower ``max_tokens``, the
  cheaper model, and ``stream_options.include_usage`` on streams (where the provider takes
  it) so the usage is exact. A refusal raises the guard's own
  :class:`~tb_plugins.errors.BudgetExceeded`, with ``status_code = 400`` so a ``Router``
  neither retries it nor cools the deployment down.
* ``async_log_success_event`` settles the hold with the usage LiteLLM reports (for a stream:
  the assembled stream's usage); ``async_log_failure_event`` releases it. Holds are keyed by
  ``litellm_call_id``.
* With a ``Router``, pass ``router=`` and a downgrade switches the call to a deployment of the
  cheaper model group, with that deployment's own ``litellm_params`` (key, base URL, version).
  Router calls are checked under their model group name, so ``downgrade:`` maps group names.

Register the logger once per process: LiteLLM copies ``litellm.callbacks`` into its success
and failure lists on first use, so a logger swapped in later would check calls but never hear
how they ended. To change the guard, set ``logger.guard``.

Sync ``litellm.completion`` never runs the deployment hook and swallows exceptions raised by
sync callbacks, so no callback can stop it: use :func:`guarded_completion` instead.

Importing this module imports LiteLLM (seconds); ``import tb_plugins`` never does.
"""

from tb_plugins.integrations.litellm.completion import guarded_completion
from tb_plugins.integrations.litellm.logger import TokenBudgetLogger
from tb_plugins.integrations.litellm.requests import (
    RequestView,
    apply_decision,
    ask_stream_usage,
    request_view,
    usage_of,
)

__all__ = [
    "RequestView",
    "TokenBudgetLogger",
    "apply_decision",
    "ask_stream_usage",
    "guarded_completion",
    "request_view",
    "usage_of",
]
