"""The guard's time: a shared ledger's clock, followed on a monotonic clock, never stepping back.

Guards that share a Redis or PostgreSQL ledger agree on window boundaries by reading the
server's time (about once a minute) and adding the monotonic time elapsed since, so a step of
the host's wall clock changes nothing. A local ledger (memory, SQLite) has no clock of its
own; the guard then uses the local clock. Either way :meth:`LedgerClock.now` never returns less
than it did before, so a clock stepped back cannot reopen a spent window.
"""

from __future__ import annotations

import logging
import time

from tb_plugins.core.windows import Clock
from tb_plugins.engine.drivers import Flow
from tb_plugins.errors import LedgerError, LedgerUnavailable

__all__ = ["SYNC_EVERY", "LedgerClock"]

logger = logging.getLogger("tb_plugins")
SYNC_EVERY = 60.0
"""Seconds between two readings of a shared ledger's clock."""


class LedgerClock:
    """The time a guard decides at.

    Args:
        clock: epoch seconds now (the local wall clock; inject one in tests).
        monotonic: a clock that never steps back (default ``time.monotonic``).
    """

    def __init__(self, clock: Clock, monotonic: Clock | None = None):
        self.clock = clock
        self.mono: Clock = monotonic or time.monotonic
        self._server_at: float | None = None
        self._server_mono = 0.0
        self._synced_at: float | None = None
        self._last = float("-inf")

    def now(self) -> float:
        """Epoch seconds: the server's at its last reading plus the monotonic time since,
        else the local clock; never less than a time returned before."""
        if self._server_at is not None:
            t = self._server_at + (self.mono() - self._server_mono)
        else:
            t = self.clock()
        if t < self._last:
            return self._last
        self._last = t
        return t

    def due(self) -> bool:
        """Whether the server's clock should be read now (and mark it as read)."""
        mono = self.mono()
        if self._synced_at is not None and 0 <= mono - self._synced_at < SYNC_EVERY:
            return False
        self._synced_at = mono
        return True

    def sync_flow(self) -> Flow[LedgerUnavailable | None]:
        """Read the server's clock; return the outage if the ledger did not answer."""
        before = self.mono()
        try:
            server = yield ("server_time", (), {})
        except LedgerUnavailable as exc:
            logger.debug("tb_plugins: server_time failed: %s", exc)
            return exc
        except LedgerError as exc:
            logger.debug("tb_plugins: server_time failed: %s", exc)
            return None
        if server is not None:
            self._server_mono = (before + self.mono()) / 2
            self._server_at = float(server)
        return None
