"""API keys of the example proxy: who each key belongs to.

The proxy calls ``user_api_key_auth`` for every request (``general_settings.custom_auth``)
and tb_plugins charges the returned identity: ``key:<key_alias>``, ``user:<user_id>``,
``team:<team_id>``, ``org:<org_id>``. Nothing the client puts in its request body or
headers can change these.

The keys below are demo keys. Point ``TB_EXAMPLE_KEYS`` at a YAML file to use others::

    sk-alice: {key_alias: alice-laptop, user_id: alice, team_id: search, org_id: acme}
"""

from __future__ import annotations

import os

import yaml
from fastapi import Request
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

DEMO_KEYS: dict[str, dict[str, str]] = {
    "sk-alice": {
        "key_alias": "alice-laptop",
        "user_id": "alice",
        "team_id": "search",
        "org_id": "acme",
    },
    "sk-bob": {"key_alias": "bob-ci", "user_id": "bob", "team_id": "search", "org_id": "acme"},
    "sk-carol": {
        "key_alias": "carol-laptop",
        "user_id": "carol",
        "team_id": "research",
        "org_id": "acme",
    },
}


def _load_keys() -> dict[str, dict[str, str]]:
    path = os.environ.get("TB_EXAMPLE_KEYS")
    if not path:
        return DEMO_KEYS
    with open(path, encoding="utf-8") as f:
        return {str(k): dict(v) for k, v in (yaml.safe_load(f) or {}).items()}


KEYS = _load_keys()


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """The identity behind ``api_key``, or HTTP 401."""
    identity = KEYS.get(api_key)
    if identity is None:
        raise ProxyException(
            message="unknown API key", type="auth_error", param="api_key", code=401
        )
    return UserAPIKeyAuth(api_key=api_key, **identity)
