"""LiteLLM proxy plugin: token budgets per key, user, team, org and end user.

One line in the proxy's ``config.yaml`` and a policy file::

    litellm_settings:
      callbacks: ["tb_plugins.integrations.litellm_proxy.proxy_handler"]
    callback_settings:
      tb_plugins:
        config: budgets.yaml        # or set TB_PLUGINS_CONFIG=/path/to/budgets.yaml

``TB_PLUGINS_CONFIG`` wins over ``callback_settings``; a relative path is read next to the
proxy's config file (else from the working directory). A missing or bad policy stops the
proxy at boot.

What each request goes through (chat completions, ``/v1/messages``, ``/v1/responses``,
embeddings, text completions):

1. ``async_pre_call_hook`` charges the scopes of the **authenticated** key: ``key:<alias or
   hashed token>``, ``user:``, ``team:``, ``org:``, ``end_user:``. The client may add finer
   scopes only (``agent:``, ``session:``, ``feature:``) with ``metadata.tb_scopes`` or the
   ``x-tb-scopes`` header; anything else it sends is ignored. The guard's decision rewrites
   ``model`` (downgrade: the router then serves the cheaper model group with that group's
   own deployments and credentials) and ``max_tokens`` (clamp). A refusal is an HTTP 429
   with ``x-should-retry: false`` (the official OpenAI clients do not retry it) and a body
   naming the scope, budget, spend, limit and reset time.
2. ``async_post_call_response_headers_hook`` tells the client ``x-tb-decision``,
   ``x-tb-model-served`` and ``x-tb-budget-remaining-tokens``.
3. ``async_log_success_event`` settles the hold with the usage the upstream reported
   (for streams, the assembled stream's usage; after a client disconnect, the proxy's
   partial-stream usage). ``async_post_call_failure_hook`` releases it; a stream that
   ends without either (a disconnect before the first chunk) is released after
   ``disconnect_grace`` seconds.

Holds are keyed by ``litellm_call_id``. The hooks are defined in the class body because the
proxy only runs hooks a callback's own class defines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from tb_plugins.errors import BudgetRefused, ConfigError, LedgerUnavailable
from tb_plugins.guard import BudgetGuard, Decision
from tb_plugins.integrations.litellm import apply_decision, request_view, usage_of

__all__ = [
    "CLIENT_SCOPE_KINDS",
    "SCOPES_HEADER",
    "BudgetProxyException",
    "TokenBudgetProxyHandler",
    "client_scopes",
    "guard_from_settings",
    "identity_scopes",
    "proxy_handler",
]

logger = logging.getLogger("tb_plugins")

CLIENT_SCOPE_KINDS = ("agent", "session", "feature")
"""Scope kinds a client may add to its own requests; every other kind comes from auth."""
SCOPES_HEADER = "x-tb-scopes"
_MAX_CLIENT_SCOPES = 8
_MAX_SCOPE_LENGTH = 200
_HEADER_MEMORY = 65536


class BudgetProxyException(ProxyException):
    """HTTP 429 for a refused call: not retryable, the body names the budget.

    The body is OpenAI's error shape with the refusal's fields added::

        {"error": {"message": "...", "type": "budget_exceeded", "code": "429", "param": null,
                   "reason": "BudgetExceeded", "scope": "team:search", "budget": "...",
                   "unit": "tokens", "spent": 2000000, "limit": 2000000, "requested": 812,
                   "resets_at": 1767225600.0, "resets_at_iso": "2026-01-01T00:00:00+00:00"}}
    """

    tb_plugins_refusal = True

    def __init__(self, refusal: BudgetRefused) -> None:
        super().__init__(
            message=str(refusal),
            type="budget_exceeded",
            param=None,
            code=429,
            headers={"x-should-retry": "false", "x-tb-decision": "deny"},
        )
        self.refusal = refusal

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of the response body."""
        fields = self.refusal.to_dict()
        reason = fields.pop("error", type(self.refusal).__name__)
        fields.pop("message", None)
        return {**super().to_dict(), "reason": reason, **fields}


class _CallIdInFlight(ProxyException):
    tb_plugins_refusal = True


def identity_scopes(auth: UserAPIKeyAuth) -> list[str]:
    """The scopes of an authenticated key: ``org:``, ``team:``, ``user:``, ``key:``,
    ``end_user:`` (the key by its alias, else by its hashed token).

    Example:
        >>> from litellm.proxy._types import UserAPIKeyAuth
        >>> identity_scopes(UserAPIKeyAuth(api_key="sk-1", key_alias="ci", team_id="search"))
        ['team:search', 'key:ci']
    """
    out = []
    for kind, value in (("org", auth.org_id), ("team", auth.team_id), ("user", auth.user_id)):
        if value:
            out.append(f"{kind}:{value}")
    key = auth.key_alias or auth.token
    if key:
        out.append(f"key:{key}")
    if auth.end_user_id:
        out.append(f"end_user:{auth.end_user_id}")
    return out


def client_scopes(data: Mapping[str, Any]) -> list[str]:
    """The finer scopes a client asked for (``metadata.tb_scopes``, the ``x-tb-scopes``
    header), keeping only ``agent:``, ``session:`` and ``feature:`` ones.

    Example:
        >>> client_scopes({"metadata": {"tb_scopes": ["agent:planner", "team:other"]}})
        ['agent:planner']
    """
    raw: list[Any] = []
    for field in ("metadata", "litellm_metadata"):
        md = data.get(field)
        if isinstance(md, Mapping):
            value = md.get("tb_scopes")
            raw.extend(value.split(",") if isinstance(value, str) else value or ())
    request = data.get("proxy_server_request")
    headers = request.get("headers") if isinstance(request, Mapping) else None
    if isinstance(headers, Mapping):
        value = headers.get(SCOPES_HEADER)
        if isinstance(value, str):
            raw.extend(value.split(","))
    out: list[str] = []
    for item in raw:
        scope = item.strip() if isinstance(item, str) else ""
        kind, sep, name = scope.partition(":")
        if not sep or not name or kind not in CLIENT_SCOPE_KINDS or len(scope) > _MAX_SCOPE_LENGTH:
            if scope:
                logger.debug("tb_plugins: ignoring client scope %r", scope[:_MAX_SCOPE_LENGTH])
            continue
        if scope not in out:
            out.append(scope)
        if len(out) == _MAX_CLIENT_SCOPES:
            break
    return out


def decision_headers(decision: Decision) -> dict[str, str]:
    """``x-tb-decision``, ``x-tb-model-served`` and (if tokens are limited)
    ``x-tb-budget-remaining-tokens``."""
    headers = {"x-tb-decision": decision.action, "x-tb-model-served": decision.model}
    left = decision.remaining.get("tokens")
    if left is not None:
        headers["x-tb-budget-remaining-tokens"] = str(int(left))
    return headers


def _resolve(path: str) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if p.is_absolute():
        return p
    server = sys.modules.get("litellm.proxy.proxy_server")
    config_file = getattr(server, "user_config_file_path", None)
    if isinstance(config_file, str):
        beside = Path(config_file).resolve().parent / p
        if beside.exists():
            return beside
    return p


def guard_from_settings() -> BudgetGuard:
    """The guard the proxy's settings name: ``TB_PLUGINS_CONFIG``, else
    ``callback_settings: {tb_plugins: {config: ...}}`` in the proxy config.

    Raises:
        ConfigError: neither is set, or the policy file is bad.
    """
    path = os.environ.get("TB_PLUGINS_CONFIG")
    if not path:
        settings = getattr(litellm, "callback_settings", None)
        section = settings.get("tb_plugins") if isinstance(settings, Mapping) else None
        value = section.get("config") if isinstance(section, Mapping) else None
        path = value if isinstance(value, str) else None
    if not path:
        raise ConfigError(
            "tb_plugins: the proxy callback has no policy; set TB_PLUGINS_CONFIG=/path/to/"
            "budgets.yaml or add `callback_settings: {tb_plugins: {config: budgets.yaml}}` "
            "to the proxy's config.yaml"
        )
    return BudgetGuard.from_config(_resolve(path))


class TokenBudgetProxyHandler(CustomLogger):
    """The proxy callback. Use the module's :data:`proxy_handler`, or build one around a
    guard of your own (``TokenBudgetProxyHandler(guard)``) in a custom callback module.

    Args:
        guard: the guard; None reads the proxy settings on first use
            (:func:`guard_from_settings`).
        disconnect_grace: seconds to wait for the proxy's partial-usage event after a
            stream was cut before returning its hold.
    """

    def __init__(self, guard: BudgetGuard | None = None, *, disconnect_grace: float = 2.0):
        super().__init__()
        self._guard = guard
        self.disconnect_grace = disconnect_grace
        self._holds: dict[str, Decision] = {}
        self._headers: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def guard(self) -> BudgetGuard:
        """The guard (built from the proxy settings on first use)."""
        if self._guard is None:
            self._guard = guard_from_settings()
        return self._guard

    @property
    def holds(self) -> int:
        """Requests admitted whose outcome is not known yet."""
        return len(self._holds)

    def _remember(self, call_id: str, headers: dict[str, str]) -> None:
        self._headers[call_id] = headers
        if len(self._headers) > _HEADER_MEMORY:  # a response that never asked for them
            self._headers.popitem(last=False)

    async def async_pre_call_hook(
        self, user_api_key_dict: UserAPIKeyAuth, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Reserve the request's estimate on its key's budgets; rewrite it or refuse it."""
        view = request_view(call_type, data)
        call_id = data.get("litellm_call_id")
        if view is None or view.model is None or not isinstance(call_id, str):
            return None
        if call_id in self._holds:
            raise _CallIdInFlight(
                message=f"x-litellm-call-id {call_id!r} is already in use by a request in flight",
                type="invalid_request_error",
                param=None,
                code=409,
                headers={"x-should-retry": "false"},
            )
        scopes = identity_scopes(user_api_key_dict) + client_scopes(data)
        try:
            decision = await self.guard.acheck(
                view.model,
                view.messages,
                max_tokens=view.output_cap,
                scopes=scopes,
                tools=view.tools,
                prompt=view.prompt,
                input_tokens=view.input_tokens,
            )
        except BudgetRefused as err:
            self._remember(call_id, {"x-tb-decision": "deny"})
            raise BudgetProxyException(err) from err
        except LedgerUnavailable as err:
            raise ProxyException(
                message=str(err), type="budget_ledger_unavailable", param=None, code=503
            ) from err
        except Exception as exc:  # never let a request through unchecked
            logger.exception("tb_plugins: budget check failed")
            raise ProxyException(
                message=f"tb_plugins could not check the budget: {exc}",
                type="internal_server_error",
                param=None,
                code=500,
            ) from exc
        if decision.model != view.model:
            data["model"] = decision.model
        apply_decision(data, view, decision)
        self._holds[call_id] = decision
        self._remember(call_id, decision_headers(decision))
        return data

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: UserAPIKeyAuth,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        """The ``x-tb-*`` headers of this request's decision."""
        return self._headers.pop(str(data.get("litellm_call_id")), None)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Settle the hold with the usage the upstream reported."""
        call_id = str(kwargs.get("litellm_call_id"))
        decision = self._holds.get(call_id)
        if decision is None:
            return
        try:
            await self.guard.asettle(decision, usage_of(response_obj, kwargs))
        except Exception:  # accounting must never break the proxy
            logger.exception("tb_plugins: settling %s failed", decision.reservation_id)
        finally:
            self._holds.pop(call_id, None)

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> Any:
        """Release the hold of a request that failed (nothing for our own refusals)."""
        if getattr(original_exception, "tb_plugins_refusal", False):
            return None  # refused before reserving: the id may belong to another request
        call_id = str(request_data.get("litellm_call_id"))
        decision = self._holds.get(call_id)
        if decision is not None:
            await self.guard.arelease(decision)
            self._holds.pop(call_id, None)
        return None

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Pass the stream through; if it is cut short, make sure its hold is not left over."""
        finished = False
        try:
            async for item in response:
                yield item
            finished = True
        finally:
            call_id = str(request_data.get("litellm_call_id"))
            if not finished and call_id in self._holds:
                asyncio.get_running_loop().call_later(
                    self.disconnect_grace, self._release_if_held, call_id
                )

    def _release_if_held(self, call_id: str) -> None:
        decision = self._holds.pop(call_id, None)
        if decision is not None:
            task = asyncio.ensure_future(self.guard.arelease(decision))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


proxy_handler = TokenBudgetProxyHandler()
"""The instance named in ``litellm_settings.callbacks``."""

if "litellm.proxy.proxy_server" in sys.modules:
    proxy_handler.guard  # noqa: B018 - loaded by the proxy: a bad policy stops the boot
