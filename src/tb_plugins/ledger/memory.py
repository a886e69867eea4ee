"""A private, in-process ledger: the SQLite engine on an in-memory database.

Nothing is shared between processes, and each ``memory://`` open is a new, empty ledger. Use
it for tests, notebooks and single-process scripts; it has exactly the semantics of
:class:`~tb_plugins.ledger.sqlite.SQLiteLedger` because it is that code.

Example:
    >>> from tb_plugins.ledger.memory import MemoryLedger
    >>> ledger = MemoryLedger.from_url("memory://")
    >>> ledger.claim_alert("team:search|day|0.8", expires_at=None)
    True
    >>> ledger.claim_alert("team:search|day|0.8", expires_at=None)
    False
"""

from __future__ import annotations

from typing import Any

from tb_plugins.errors import ConfigError
from tb_plugins.ledger.sqlite import SQLiteLedger

__all__ = ["MemoryLedger"]


class MemoryLedger(SQLiteLedger):
    """One in-memory SQLite database behind one connection, shared by threads under a lock."""

    schemes = ("memory",)

    def __init__(self) -> None:
        super().__init__(":memory:", url="memory://")

    @classmethod
    def from_url(cls, url: str = "memory://", **options: Any) -> MemoryLedger:
        """Open a new, empty ledger for ``memory://`` (``timeout`` is accepted and unused)."""
        unknown = sorted(set(options) - {"timeout"})
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for ledger {url!r}; known: timeout")
        return cls()
