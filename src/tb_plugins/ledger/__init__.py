"""Ledgers: durable, shared spend. Chosen by URL through a registry of schemes.

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("memory://")
    >>> type(ledger).__name__
    'MemoryLedger'
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from tb_plugins.errors import ConfigError
from tb_plugins.ledger.base import Ledger, Line, LineState, ReserveResult, SettleResult, line_key

__all__ = [
    "BACKENDS",
    "Ledger",
    "Line",
    "LineState",
    "ReserveResult",
    "SettleResult",
    "ledger_from_url",
    "line_key",
]

# scheme -> "module:Class"; imported only when a URL asks for it, so `import tb_plugins`
# never loads redis or psycopg.
BACKENDS: dict[str, str] = {
    "memory": "tb_plugins.ledger.memory:MemoryLedger",
    "sqlite": "tb_plugins.ledger.sqlite:SQLiteLedger",
    "redis": "tb_plugins.ledger.redis:RedisLedger",
    "rediss": "tb_plugins.ledger.redis:RedisLedger",
    "postgresql": "tb_plugins.ledger.postgres:PostgresLedger",
    "postgres": "tb_plugins.ledger.postgres:PostgresLedger",
}


def ledger_from_url(url: str, **options: Any) -> Ledger:
    """Open the ledger a URL names: ``memory://``, ``sqlite:///path.db``, ``redis://host:port/db``,
    ``rediss://…``, ``postgresql://…``.

    Raises:
        ConfigError: the scheme is unknown (the message lists the known ones).
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ConfigError(f"unknown ledger URL {url!r}: the scheme must be one of {known}")
    module_name, _, class_name = target.partition(":")
    cls: type[Ledger] = getattr(importlib.import_module(module_name), class_name)
    return cls.from_url(url, **options)
