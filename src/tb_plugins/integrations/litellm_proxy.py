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
   naming the scope, budget, spend, limit and reset time. Under ``request: {on_too_long:
   trim}``, a chat conversation above ``request.max_input_tokens`` loses its oldest messages
   until it fits (see :mod:`tb_plugins.core.trim`) and the upstream receives the trimmed
   ``messages``; one that cannot fit is refused. An output cap
   (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``) that is not a whole
   number of tokens between 0 and :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` is an
   HTTP 400 (``invalid_request_error``) naming the field.
2. ``async_post_call_response_headers_hook`` tells the client ``x-tb-decision``,
   ``x-tb-model-served`` and ``x-tb-budget-remaining-tokens``.
3. ``async_log_success_event`` settles the hold with the usage the upstream reported
   (for streams, the assembled stream's usage; after a client disconnect, the proxy's
   partial-stream usage). ``async_post_call_failure_hook`` releases it; a stream that
   ends without either (a disconnect before the first chunk) is released after
   ``disconnect_grace`` seconds, and one that fails after its first chunk is charged its
   estimate.

**Client scopes are namespaced under their owner.** A scope a client adds is charged as
``<kind>:<name>@<owner>``, the owner being the key's team scope (``team:<id>``), else its key
scope (``key:<alias or hashed token>``): ``x-tb-scopes: agent:planner`` from a key of team
``search`` charges ``agent:planner@team:search``. So no tenant can spend, or be refused on,
another tenant's counters, and reports still read plainly. In the policy, ``agent:*``
matches every tenant's agents one by one; a budget for one tenant's agent is written
``agent:planner@team:search``, and ``agent:planner@*`` matches that agent of every tenant.
A client scope name must pass :func:`~tb_plugins.core.scopes.normalize_scope` and may not
contain ``@`` or a pattern character (``* ? [ ]``); others are dropped (logged at debug
level), never failing the request.

**Holds belong to the request that made them.** Each admitted request gets a random token
(``secrets.token_hex(16)``) made by the pre-call hook; its hold and its ``x-tb-*`` headers are
kept under that token, which travels in the request's LiteLLM metadata
(``metadata.tb_plugins_hold``, or ``litellm_metadata`` on the routes that use it) to the
success, failure, streaming and header hooks. The pre-call hook first deletes whatever value
the client put in that field, on every path, so only the proxy ever writes it; the token is
never sent upstream nor in a response. ``litellm_call_id`` (which a client sets with
``x-litellm-call-id``) plays no part: two requests with the same call id are two requests,
each charged.

The hooks are defined in the class body because the proxy only runs hooks a callback's own
class defines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import sys
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from tb_plugins.core.urls import redact_url
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.engine.held import HeldCalls, afinish
from tb_plugins.errors import BudgetRefused, ConfigError, LedgerUnavailable
from tb_plugins.integrations.litellm.proxy_scopes import (
    CLIENT_SCOPE_KINDS,
    SCOPES_HEADER,
    client_scopes,
    identity_scopes,
    key_priority,
    scope_owner,
)
from tb_plugins.integrations.litellm.requests import (
    apply_decision,
    reported_usage,
    request_view,
)

__all__ = [
    "CLIENT_SCOPE_KINDS",
    "HOLD_KEY",
    "SCOPES_HEADER",
    "BudgetProxyException",
    "TokenBudgetProxyHandler",
    "client_scopes",
    "guard_from_settings",
    "identity_scopes",
    "proxy_handler",
    "scope_owner",
]

logger = logging.getLogger("tb_plugins")

HOLD_KEY = "tb_plugins_hold"
"""The LiteLLM metadata field that carries an admitted request's hold token (written by the
pre-call hook only; a client's value is deleted)."""
_METADATA_FIELDS = ("litellm_metadata", "metadata")
_CAP_FIELDS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_MAX_ERROR_TEXT = 300
_HEADER_MEMORY = 65536


class BudgetProxyException(ProxyException):
    """HTTP 429 for a refused call: not retryable, the body names the budget.

    The body is OpenAI's error shape with the refusal's fields added::

        {"error": {"message": "...", "type": "budget_exceeded", "code": "429", "param": null,
                   "reason": "BudgetExceeded", "scope": "team:search", "budget": "...",
                   "unit": "tokens", "spent": 2000000, "limit": 2000000, "requested": 812,
                   "resets_at": 1767225600.0, "resets_at_iso": "2026-01-01T00:00:00+00:00"}}
    """

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


def _invalid_request(err: Exception) -> ProxyException:
    """HTTP 400 for a request the guard cannot read (e.g. ``max_tokens: -5``)."""
    text = str(err)
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + "..."
    field = next((f for f in _CAP_FIELDS if text.startswith(f + " ")), None)
    return ProxyException(
        message=f"tb_plugins: invalid request: {text}",
        type="invalid_request_error",
        param=field,
        code=400,
        headers={"x-should-retry": "false"},
    )


def decision_headers(decision: Decision) -> dict[str, str]:
    """``x-tb-decision``, ``x-tb-model-served`` and (if tokens are limited)
    ``x-tb-budget-remaining-tokens``."""
    headers = {"x-tb-decision": decision.action, "x-tb-model-served": decision.model}
    left = decision.remaining.get("tokens")
    if left is not None:
        headers["x-tb-budget-remaining-tokens"] = str(int(left))
    return headers


def _drop_hold_tokens(data: Mapping[str, Any]) -> None:
    """Delete any hold token from a request's metadata (what a client sent there)."""
    for field in _METADATA_FIELDS:
        md = data.get(field)
        if isinstance(md, dict):
            md.pop(HOLD_KEY, None)
            requester = md.get("requester_metadata")
            if isinstance(requester, dict):
                requester.pop(HOLD_KEY, None)


def _carry_hold_token(data: dict[str, Any], token: str) -> None:
    """Put ``token`` in the metadata LiteLLM keeps for itself on this route (the proxy
    uses ``litellm_metadata`` where ``metadata`` is a provider field, e.g. Responses)."""
    field = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) else "metadata"
    md = data.get(field)
    if not isinstance(md, dict):
        md = data[field] = {}
    md[HOLD_KEY] = token


def _hold_token(data: Any) -> str | None:
    """The hold token a request carries, if any."""
    if not isinstance(data, Mapping):
        return None
    for field in _METADATA_FIELDS:
        md = data.get(field)
        token = md.get(HOLD_KEY) if isinstance(md, Mapping) else None
        if isinstance(token, str):
            return token
    return None


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
    resolved = _resolve(path)
    guard = BudgetGuard.from_config(resolved)
    _announce(f"tb_plugins: policy {resolved} loaded: {_summary(guard)}")
    return guard


def _summary(guard: BudgetGuard) -> str:
    n = len(guard.planner.budgets)
    return (
        f"{n} budget{'s' if n != 1 else ''}, ledger {redact_url(guard.ledger.url)}, "
        f"{guard.policy.on_ledger_error}"
    )


def _announce(line: str) -> None:
    """One line at boot: logged at INFO, and printed to stderr when INFO goes nowhere (the
    proxy does not configure logging for its callbacks)."""
    logger.info(line)
    if not logger.isEnabledFor(logging.INFO):
        print(line, file=sys.stderr, flush=True)


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
        self._holds: HeldCalls[str] = HeldCalls()
        self._headers: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._tasks: set[asyncio.Task[bool]] = set()

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

    def _remember(self, token: str, headers: dict[str, str]) -> None:
        self._headers[token] = headers
        if len(self._headers) > _HEADER_MEMORY:  # a response that never asked for them
            self._headers.popitem(last=False)

    async def async_pre_call_hook(
        self, user_api_key_dict: UserAPIKeyAuth, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Reserve the request's estimate on its key's budgets; rewrite it or refuse it."""
        _drop_hold_tokens(data)  # first, on every path: only this hook writes a hold token
        try:
            view = request_view(call_type, data)
        except (TypeError, ValueError) as err:  # e.g. max_tokens: -5, "100", 1.5, 1e30
            raise _invalid_request(err) from err
        if view is None or not view.model:  # not budgeted here; the proxy refuses no model
            return None
        owner = scope_owner(user_api_key_dict)
        scopes = identity_scopes(user_api_key_dict) + client_scopes(data, owner=owner)
        # The priority comes from the key's server-side metadata only, never the client's.
        request = view.request(scopes, priority=key_priority(user_api_key_dict))
        sent = data.get("messages")
        if view.api == "completion" and isinstance(sent, list):  # one dict per message
            request = dataclasses.replace(request, trimmable=len(sent) == len(view.messages or ()))
        try:
            decision = await self.guard.acheck_request(request)
        except BudgetRefused as err:
            raise BudgetProxyException(err) from err
        except LedgerUnavailable as err:
            raise ProxyException(
                message=str(err), type="budget_ledger_unavailable", param=None, code=503
            ) from err
        except (TypeError, ValueError) as err:  # the request itself: a model name, a scope
            raise _invalid_request(err) from err
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
        if decision.kept_messages is not None and isinstance(sent, list):
            data["messages"] = [sent[i] for i in decision.kept_messages]  # trimmed to fit
        apply_decision(data, view, decision)
        token = secrets.token_hex(16)
        self._holds.hold(token, decision)
        self._remember(token, decision_headers(decision))
        _carry_hold_token(data, token)
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
        token = _hold_token(data)
        return None if token is None else self._headers.pop(token, None)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Settle the hold with the usage the upstream reported."""
        token = _hold_token(kwargs.get("litellm_params")) or _hold_token(kwargs)
        decision = None if token is None else self._holds.take(token)
        if decision is None:
            return
        await afinish(self.guard, decision, reported_usage(response_obj, kwargs, decision))

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> Any:
        """Release the hold of a request that failed (none if it was refused or never
        budgeted: such a request carries no token)."""
        token = _hold_token(request_data)
        await afinish(self.guard, None if token is None else self._holds.take(token), False)
        return None

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: UserAPIKeyAuth, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """Pass the stream through; if it is cut short, make sure its hold is not left over.

        A stream the upstream side breaks after output began (e.g. LiteLLM refusing the usage
        it reported) is charged its estimate: output was served, so never zero.
        """
        token = _hold_token(request_data)
        finished = begun = False
        try:
            async for item in response:
                begun = True
                yield item
            finished = True
        except Exception:
            decision = self._holds.take(token) if begun and token is not None else None
            if decision is not None:
                logger.warning("tb_plugins: stream %s failed mid-way", decision.reservation_id)
                await afinish(self.guard, decision, None)  # the stream's own error goes on
            raise
        finally:
            if not finished and token is not None and token in self._holds:
                asyncio.get_running_loop().call_later(
                    self.disconnect_grace, self._release_if_held, token
                )

    def _release_if_held(self, token: str) -> None:
        decision = self._holds.take(token)
        if decision is not None:
            task = asyncio.ensure_future(afinish(self.guard, decision, False))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


proxy_handler = TokenBudgetProxyHandler()
"""The instance named in ``litellm_settings.callbacks``."""

if "litellm.proxy.proxy_server" in sys.modules:
    proxy_handler.guard  # noqa: B018 - loaded by the proxy: a bad policy stops the boot
    from tb_plugins.integrations.litellm.metrics import expose

    expose(proxy_handler.guard)  # the budgets on the proxy's /metrics (with [metrics])
