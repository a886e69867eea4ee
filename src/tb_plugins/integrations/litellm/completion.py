"""``guarded_completion``: sync ``litellm.completion`` under the guard (check, call, settle)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from tb_plugins.core.pacing import priority_of
from tb_plugins.core.usage import Usage
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.integrations.litellm.requests import (
    apply_decision,
    ask_stream_usage,
    request_view,
    scopes_from,
    usage_of,
)

logger = logging.getLogger("tb_plugins")


def guarded_completion(
    guard: BudgetGuard, *, scopes: Sequence[str] = (), **completion_kwargs: Any
) -> Any:
    """``litellm.completion(**completion_kwargs)`` under the guard: check, call, settle.

    Why not a callback: sync ``litellm.completion`` never runs
    ``async_pre_call_deployment_hook``, and LiteLLM catches and logs whatever a sync
    callback raises, so a callback can observe a sync call but cannot stop it or change
    its model. This wrapper decides first, applies the decision (model, ``max_tokens``,
    ``stream_options.include_usage``), calls LiteLLM, then settles the real usage or
    releases the hold if the call fails. A stream is settled when it ends; if it is closed
    early, the output already received is charged.

    Args:
        guard: the process's guard.
        scopes: who is charged (besides ``metadata["tb_scopes"]`` of the call).
        **completion_kwargs: what ``litellm.completion`` takes; pass ``model`` and
            ``messages`` by keyword.

    Raises:
        BudgetExceeded: a budget has no room; nothing was sent.

    Example:
        >>> r = guarded_completion(guard, scopes=["user:alice"], model="gpt-4o",  # doctest: +SKIP
        ...                        messages=[{"role": "user", "content": "Hi"}], max_tokens=50)
    """
    import litellm

    view = request_view("completion", completion_kwargs)
    if view is None or view.model is None:
        raise TypeError("guarded_completion() needs model= and messages= keyword arguments")
    all_scopes = [*scopes, *scopes_from(completion_kwargs.get("metadata"))]
    priority = priority_of(completion_kwargs.get("metadata"), "call metadata")
    decision = guard.check_request(view.request(all_scopes, priority=priority))
    kwargs = dict(completion_kwargs, model=decision.model)
    apply_decision(kwargs, view, decision)
    ask_stream_usage(kwargs)
    try:
        response = litellm.completion(**kwargs)
    except BaseException:
        guard.release(decision)
        raise
    if kwargs.get("stream"):
        return _SettledStream(guard, decision, response)
    guard.settle(decision, usage_of(response))
    return response


class _SettledStream:
    """A sync LiteLLM stream that settles its hold when it ends or is closed."""

    def __init__(self, guard: BudgetGuard, decision: Decision, stream: Any) -> None:
        self._guard, self._decision, self._stream = guard, decision, stream
        self._text: list[str] = []
        self._usage: Usage | None = None
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for chunk in self._stream:
                u = usage_of(chunk)
                if u is not None:
                    self._usage = u
                for choice in getattr(chunk, "choices", None) or ():
                    text = getattr(getattr(choice, "delta", None), "content", None)
                    if isinstance(text, str):
                        self._text.append(text)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Settle now: the reported usage, else the estimate's input and the output seen."""
        if self._done:
            return
        self._done = True
        usage = self._usage
        if usage is None:
            out = self._guard.tokenizer.count_text(self._decision.model, "".join(self._text))
            usage = Usage(self._decision.estimate.input_tokens, out)
        try:
            self._guard.settle(self._decision, usage)
        except Exception:
            logger.exception("tb_plugins: settling %s failed", self._decision.reservation_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
