"""``TokenBudgetLogger``: budgets on ``litellm.acompletion`` and ``Router`` calls."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger

from tb_plugins.core.pacing import priority_of
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.engine.held import HeldCalls, afinish
from tb_plugins.errors import BudgetRefused

if TYPE_CHECKING:
    from litellm.router import Router

from tb_plugins.integrations.litellm.requests import (
    NO_RETRY_STATUS,
    RequestView,
    apply_decision,
    ask_stream_usage,
    chat_messages,
    reported_usage,
    request_view,
    scopes_from,
)

logger = logging.getLogger("tb_plugins")


class TokenBudgetLogger(CustomLogger):
    """Budgets on async LiteLLM calls (``acompletion``, ``aembedding``, ``aresponses``,
    ``Router``), streams included.

    Args:
        guard: the process's :class:`~tb_plugins.BudgetGuard`.
        scopes: scopes charged for every call, e.g. ``["team:search"]``; a call adds its
            own with ``metadata={"tb_scopes": ["user:alice", "agent:planner"]}``.
        router: the ``Router`` whose calls may be downgraded to a cheaper model group (the
            downgrade targets in the policy are model group names).

    Example:
        >>> logger = TokenBudgetLogger(guard, scopes=["team:search"])   # doctest: +SKIP
        >>> litellm.callbacks = [logger]                                 # doctest: +SKIP
        >>> await litellm.acompletion(model="gpt-4o", messages=msgs,      # doctest: +SKIP
        ...     metadata={"tb_scopes": ["user:alice"]})
    """

    def __init__(
        self, guard: BudgetGuard, scopes: Sequence[str] = (), *, router: Router | None = None
    ) -> None:
        super().__init__()
        self.guard = guard
        self.scopes = tuple(scopes)
        self.router = router
        self._holds: HeldCalls[str] = HeldCalls()

    @property
    def holds(self) -> int:
        """Calls checked whose outcome is not known yet."""
        return len(self._holds)

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Check the call against its budgets and apply the decision (or raise the refusal)."""
        view = request_view(call_type, kwargs)
        call_id = kwargs.get("litellm_call_id")
        if view is None or not isinstance(call_id, str):
            return None
        log_obj = kwargs.get("litellm_logging_obj")
        metadata = kwargs.get("metadata") if isinstance(kwargs.get("metadata"), Mapping) else {}
        group = metadata.get("model_group") if isinstance(metadata, Mapping) else None
        model = group if isinstance(group, str) and group else view.model
        adjust = True
        if model is None:  # passed positionally: visible, but cannot be rewritten
            model, adjust = getattr(log_obj, "model", None), False
        messages = view.messages
        if messages is not None and not messages and "messages" not in kwargs:
            messages = chat_messages(getattr(log_obj, "messages", None))
        if not isinstance(model, str):
            return None
        scopes = [
            *self.scopes,
            *scopes_from(metadata),
            *scopes_from(kwargs.get("litellm_metadata")),
        ]
        # The application sets this metadata (in the SDK no remote client is in between).
        priority = priority_of(metadata, "call metadata")
        decision = await self._check(view, model, messages, scopes, adjust, priority)
        if decision.model != model:
            if isinstance(group, str) and group:
                swapped = await self._swap_deployment(kwargs, decision.model, messages)
            else:
                kwargs["model"] = decision.model
                swapped = True
            if not swapped:  # no cheaper deployment to go to: decide without the downgrade
                await self.guard.arelease(decision)
                decision = await self._check(view, model, messages, scopes, False, priority)
        apply_decision(kwargs, view, decision)
        if view.api in ("completion", "text_completion"):
            ask_stream_usage(kwargs)
        # A caller reusing a call id in flight would orphan the earlier hold: return it.
        await afinish(self.guard, self._holds.hold(call_id, decision), False)
        return kwargs

    async def _check(
        self,
        view: RequestView,
        model: str,
        messages: list[dict[str, Any]] | None,
        scopes: list[str],
        adjust: bool,
        priority: str,
    ) -> Decision:
        try:
            request = view.request(
                scopes, model=model, messages=messages, adjust=adjust, priority=priority
            )
            return await self.guard.acheck_request(request)
        except BudgetRefused as err:
            err.status_code = NO_RETRY_STATUS  # type: ignore[attr-defined]
            raise

    async def _swap_deployment(
        self, kwargs: dict[str, Any], group: str, messages: list[dict[str, Any]] | None
    ) -> bool:
        """Point a Router call at a deployment of ``group``, with its own credentials."""
        router = self.router
        if router is None or not router.get_model_list(model_name=group):
            logger.warning(
                "tb_plugins: cannot downgrade to model group %r (%s); the call keeps its model",
                group,
                "pass router= to TokenBudgetLogger" if router is None else "no such group",
            )
            return False
        dep = await router.async_get_available_deployment(
            model=group, request_kwargs={}, messages=messages
        )
        metadata = dict(kwargs.get("metadata") or {})
        old_id = (metadata.get("model_info") or {}).get("id")
        old = router.get_deployment(model_id=old_id) if old_id else None
        if old is not None:
            for key in old.litellm_params.model_dump(exclude_none=True):
                kwargs.pop(key, None)
        params = dict(dep["litellm_params"])
        kwargs.update(params)
        kwargs.pop("client", None)  # the Router's cached client carries the old credentials
        kwargs["model_info"] = dep.get("model_info", {})
        metadata.update(
            model_group=group,
            deployment=params.get("model"),
            model_info=kwargs["model_info"],
            api_base=params.get("api_base"),
            deployment_model_name=dep.get("model_name"),
        )
        kwargs["metadata"] = metadata
        return True

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Settle the call's hold with the usage LiteLLM reports."""
        decision = self._holds.take(str(kwargs.get("litellm_call_id")))
        if decision is None:
            return
        await afinish(self.guard, decision, reported_usage(response_obj, kwargs, decision))

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Release the hold of a call that failed."""
        await afinish(self.guard, self._holds.take(str(kwargs.get("litellm_call_id"))), False)
