"""Who a LiteLLM proxy request charges: the scopes of its authenticated key, and the finer
scopes its client may add under the key's own budgets.

The key's scopes (``org:``, ``team:``, ``user:``, ``key:``, ``end_user:``) come from the
server-side record of the authenticated key only. A client may add ``agent:``, ``session:``
and ``feature:`` scopes (``metadata.tb_scopes`` or the ``x-tb-scopes`` header), at most
eight, each namespaced under its owner (``agent:planner@team:search``), so no tenant can spend
or exhaust another's counters.

A request's priority (for budgets with ``stop_at``) is the ``tb_priority`` of the key's
server-side metadata, else of its team's; a client cannot raise it by header or body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from litellm.proxy._types import UserAPIKeyAuth

from tb_plugins.core.pacing import DEFAULT_PRIORITY, PRIORITIES
from tb_plugins.core.scopes import normalize_scope

__all__ = [
    "CLIENT_SCOPE_KINDS",
    "SCOPES_HEADER",
    "SESSION_HEADERS",
    "client_scopes",
    "identity_scopes",
    "key_priority",
    "scope_owner",
]

logger = logging.getLogger("tb_plugins")

CLIENT_SCOPE_KINDS = ("agent", "session", "feature")
"""Scope kinds a client may add to its own requests; every other kind comes from auth."""
SCOPES_HEADER = "x-tb-scopes"
SESSION_HEADERS = ("x-litellm-session-id", "x-litellm-trace-id")
"""LiteLLM's headers naming a session (an agent run): each request's ``session:`` scope."""
_MAX_CLIENT_SCOPES = 8
_MAX_CLIENT_ITEMS = 64  # scope items read per request, whatever the client sends
_MAX_SCOPE_LENGTH = 200
_NOT_IN_CLIENT_NAMES = frozenset("@*?[]")  # the owner separator; pattern characters


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


def key_priority(auth: UserAPIKeyAuth) -> str:
    """The priority of an authenticated key's requests: ``tb_priority`` in the key's
    server-side metadata, else in its team's metadata, else ``normal`` (an unknown value is
    logged and taken as ``normal``). Nothing the client sends is read.

    Example:
        >>> from litellm.proxy._types import UserAPIKeyAuth
        >>> key_priority(UserAPIKeyAuth(api_key="sk-1", metadata={"tb_priority": "critical"}))
        'critical'
        >>> key_priority(UserAPIKeyAuth(api_key="sk-1"))
        'normal'
    """
    for source in (auth.metadata, auth.team_metadata):
        value = source.get("tb_priority") if isinstance(source, Mapping) else None
        if value is None:
            continue
        if value in PRIORITIES:
            return str(value)
        logger.warning(
            "tb_plugins: key metadata tb_priority=%r is not one of %s; using %r",
            value,
            ", ".join(PRIORITIES),
            DEFAULT_PRIORITY,
        )
        return DEFAULT_PRIORITY
    return DEFAULT_PRIORITY


def scope_owner(auth: UserAPIKeyAuth) -> str | None:
    """Whom the scopes a client adds belong to: the key's team scope, else its key scope
    (None for a key with neither, whose client scopes are then dropped).

    Example:
        >>> from litellm.proxy._types import UserAPIKeyAuth
        >>> scope_owner(UserAPIKeyAuth(api_key="sk-1", key_alias="ci", team_id="search"))
        'team:search'
        >>> scope_owner(UserAPIKeyAuth(api_key="sk-1", key_alias="ci"))
        'key:ci'
    """
    if auth.team_id:
        return f"team:{auth.team_id}"
    key = auth.key_alias or auth.token
    return f"key:{key}" if key else None


def _client_items(data: Mapping[str, Any]) -> Iterator[object]:
    for field in ("metadata", "litellm_metadata"):
        md = data.get(field)
        value = md.get("tb_scopes") if isinstance(md, Mapping) else None
        if isinstance(value, str):
            yield from value.split(",")
        elif isinstance(value, list | tuple):
            yield from value
        elif value is not None:
            logger.debug("tb_plugins: ignoring %s.tb_scopes of type %s", field, type(value))
    request = data.get("proxy_server_request")
    headers = request.get("headers") if isinstance(request, Mapping) else None
    if not isinstance(headers, Mapping):
        return
    value = headers.get(SCOPES_HEADER)
    if isinstance(value, str):
        yield from value.split(",")
    # LiteLLM's own session headers name an agent run: its `session:` scope (a `calls` or
    # token budget on `session:*` cuts off a client's looping agent). Only the explicit
    # headers: a trace id the proxy generates would make a new scope per request.
    for header in SESSION_HEADERS:
        value = headers.get(header)
        if isinstance(value, str) and value.strip():
            yield f"session:{value.strip()}"
            return


def _client_scope(item: object) -> str | None:
    """One scope a client sent, checked; None (logged) if it may not be used."""
    if not isinstance(item, str):
        logger.debug("tb_plugins: ignoring client scope of type %s", type(item))
        return None
    text = item.strip()
    if not text:
        return None
    if len(text) > _MAX_SCOPE_LENGTH:
        logger.debug("tb_plugins: ignoring a client scope of %d characters", len(text))
        return None
    try:
        scope = normalize_scope(text)
    except ValueError as err:
        logger.debug("tb_plugins: ignoring client scope: %s", err)
        return None
    kind, _, name = scope.partition(":")
    if kind not in CLIENT_SCOPE_KINDS:
        logger.debug("tb_plugins: ignoring client scope %r (not a client kind)", scope)
        return None
    if _NOT_IN_CLIENT_NAMES.intersection(name):
        logger.debug("tb_plugins: ignoring client scope %r (no @ or * ? [ ] in a name)", scope)
        return None
    return scope


def client_scopes(data: Mapping[str, Any], owner: str | None = None) -> list[str]:
    """The finer scopes a client asked for (``metadata.tb_scopes``, the ``x-tb-scopes``
    header): ``agent:``, ``session:`` and ``feature:`` ones that pass
    :func:`~tb_plugins.core.scopes.normalize_scope`, at most eight; with ``owner``, each
    namespaced as ``<kind>:<name>@<owner>``.

    Example:
        >>> client_scopes({"metadata": {"tb_scopes": ["agent:planner", "team:other"]}})
        ['agent:planner']
        >>> client_scopes({"metadata": {"tb_scopes": "agent:planner"}}, owner="team:search")
        ['agent:planner@team:search']
    """
    out: list[str] = []
    for i, item in enumerate(_client_items(data)):
        if i == _MAX_CLIENT_ITEMS or len(out) == _MAX_CLIENT_SCOPES:
            break
        scope = _client_scope(item)
        if scope is None:
            continue
        if owner is not None:
            try:
                scope = normalize_scope(f"{scope}@{owner}")
            except ValueError as err:
                logger.debug("tb_plugins: ignoring client scope: %s", err)
                continue
        if scope not in out:
            out.append(scope)
    return out
