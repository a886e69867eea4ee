"""Refusals raised inside LangChain as errors its retry middleware does not retry."""

from __future__ import annotations

import logging

from langchain_core.exceptions import ModelError

from tb_plugins.errors import (
    BudgetExceeded,
    BudgetRefused,
    LoopLimitExceeded,
    RequestTooLarge,
    RunLimitExceeded,
    ToolLimitExceeded,
    UnpricedModel,
)

logger = logging.getLogger("tb_plugins")

# -- refusals LangChain will not retry ---------------------------------------------------------


class BudgetRefusedError(BudgetRefused, ModelError):
    """A budget refusal raised inside LangChain. ``ModelError`` with ``is_retryable = False``:
    ``ModelRetryMiddleware``'s default ``retry_on`` re-raises it at once (it never retries it
    nor turns it into an AI message). Catch it as the tb_plugins class or as this one."""

    is_retryable = False


class BudgetExceededError(BudgetExceeded, BudgetRefusedError):
    """:class:`~tb_plugins.BudgetExceeded`, raised inside LangChain."""


class LoopLimitExceededError(LoopLimitExceeded, BudgetExceededError):
    """:class:`~tb_plugins.LoopLimitExceeded` (the per-run ``calls`` cutoff) inside LangChain."""


class ToolLimitExceededError(ToolLimitExceeded, LoopLimitExceededError):
    """:class:`~tb_plugins.errors.ToolLimitExceeded` (a ``tool_calls`` budget) inside
    LangChain: raised by the callback handler's ``on_tool_start``, so the tool never runs."""


class RunLimitExceededError(RunLimitExceeded, LoopLimitExceededError):
    """:class:`~tb_plugins.errors.RunLimitExceeded` (``repeats`` or ``seconds``: the run must
    end) inside LangChain."""


class RequestTooLargeError(RequestTooLarge, BudgetExceededError):
    """:class:`~tb_plugins.RequestTooLarge`, raised inside LangChain."""


class UnpricedModelError(UnpricedModel, BudgetRefusedError):
    """:class:`~tb_plugins.UnpricedModel`, raised inside LangChain."""


_LC_ERRORS: dict[type[BudgetRefused], type[BudgetRefusedError]] = {
    ToolLimitExceeded: ToolLimitExceededError,
    RunLimitExceeded: RunLimitExceededError,
    LoopLimitExceeded: LoopLimitExceededError,
    RequestTooLarge: RequestTooLargeError,
    BudgetExceeded: BudgetExceededError,
    UnpricedModel: UnpricedModelError,
    BudgetRefused: BudgetRefusedError,
}


def _lc_error(err: BudgetRefused) -> BudgetRefusedError:
    """The same refusal (same fields and message) as its LangChain-safe subclass."""
    if isinstance(err, BudgetRefusedError):
        return err
    cls = next(_LC_ERRORS[t] for t in type(err).__mro__ if t in _LC_ERRORS)
    new = cls.__new__(cls)
    new.__dict__.update(err.__dict__)
    new.args = err.args
    return new.with_traceback(err.__traceback__)
