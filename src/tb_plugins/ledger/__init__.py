"""Ledgers: durable, shared spend. Chosen by URL through a registry of schemes.

:mod:`.base` is the contract every ledger keeps; :mod:`.flow` lets a backend write each
operation once, as a flow run blocking or awaited; :mod:`.network` is what the two server
ledgers share. Each backend is a package (:mod:`.sqlite`, :mod:`.redis`, :mod:`.postgres`) of a
class module (its connections and the two executors), an operations module (one flow per
operation) and a codec (its wire format and speed tricks); :mod:`.memory` is SQLite in memory.

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("memory://")
    >>> type(ledger).__name__
    'MemoryLedger'
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping, Sequence
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

# The backend classes, in the order a scheme is looked for. Each class declares its URL schemes
# (``schemes``); a class is imported only when a lookup gets to it, so `import tb_plugins` loads
# no backend, and no driver library (redis, psycopg load when a ledger of theirs opens).
_CLASSES = (
    "tb_plugins.ledger.memory:MemoryLedger",
    "tb_plugins.ledger.sqlite:SQLiteLedger",
    "tb_plugins.ledger.redis:RedisLedger",
    "tb_plugins.ledger.postgres:PostgresLedger",
)


def _load(target: str) -> type[Ledger]:
    module_name, _, class_name = target.partition(":")
    cls: type[Ledger] = getattr(importlib.import_module(module_name), class_name)
    return cls


class _Schemes(Mapping[str, str]):
    """scheme -> ``"module:Class"``, read from the classes' ``schemes`` as lookups need them:
    a lookup imports the classes in order until one declares its scheme; listing the schemes
    imports them all."""

    def __init__(self, classes: Sequence[str]) -> None:
        self._pending = list(classes)
        self._found: dict[str, str] = {}
        self._lock = threading.Lock()

    def _read(self, scheme: str | None = None) -> dict[str, str]:
        with self._lock:
            while self._pending and (scheme is None or scheme not in self._found):
                target = self._pending[0]
                for name in _load(target).schemes:
                    self._found.setdefault(name, target)
                self._pending.pop(0)
            return self._found

    def __getitem__(self, scheme: str) -> str:
        return self._read(scheme)[scheme]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._read()))

    def __len__(self) -> int:
        return len(self._read())


BACKENDS: Mapping[str, str] = _Schemes(_CLASSES)
"""Every ledger URL scheme and the backend class that opens it, as ``"module:Class"``."""


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
    return _load(target).from_url(url, **options)
