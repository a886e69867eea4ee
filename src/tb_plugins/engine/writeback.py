"""Spend the ledger has not taken yet: kept while it is unreachable and written back, exactly
once, when it answers; spend it refused is kept apart for inspection, never retried."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from tb_plugins.core.usage import Amounts, UsageRecord
from tb_plugins.engine.drivers import Flow
from tb_plugins.errors import LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import Line

__all__ = ["FLUSH_EVERY", "Pending", "WriteBack"]

logger = logging.getLogger("tb_plugins")
FLUSH_EVERY = 5.0
"""Seconds between two write-back attempts made on the call path."""
_REJECTED_MEMORY = 10_000


@dataclass
class Pending:
    """One settle not yet in the ledger."""

    reservation_id: str
    lines: tuple[Line, ...]
    amounts: Amounts
    record: UsageRecord


class WriteBack:
    """The settles waiting for the ledger, and the ones it refused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: list[Pending] = []
        self.rejected: list[UsageRecord] = []
        self._last = float("-inf")

    def keep(self, entry: Pending, exc: LedgerUnavailable) -> None:
        """Keep ``entry`` until the ledger answers."""
        logger.error(
            "tb_plugins: could not record spend of %s (%s); kept locally and "
            "written when the ledger is back",
            entry.reservation_id,
            exc,
        )
        with self.lock:
            self.pending.append(entry)

    def reject(self, entry: Pending, exc: LedgerError) -> None:
        """Log ``entry`` as refused by the ledger and keep its record for inspection."""
        logger.error(
            "tb_plugins: the ledger refused the spend of %s (%s); it is not retried and is "
            "kept in guard.rejected: %r",
            entry.reservation_id,
            exc,
            entry.record,
        )
        with self.lock:
            self.rejected.append(entry.record)
            del self.rejected[:-_REJECTED_MEMORY]

    def due(self, mono: float) -> bool:
        """Whether a write-back should be tried on the call path now (and mark it tried)."""
        if not self.pending or 0 <= mono - self._last < FLUSH_EVERY:
            return False
        self._last = mono
        return True

    def flow(self, now: float) -> Flow[tuple[int, LedgerUnavailable | None]]:
        """Write the pending settles in order; stop at an outage (the rest stays pending),
        set aside an entry the ledger refuses. Returns (written, the outage if any)."""
        with self.lock:
            batch, self.pending = self.pending, []
        done = 0
        down: LedgerUnavailable | None = None
        for i, p in enumerate(batch):
            try:
                yield (
                    "settle",
                    (p.reservation_id, list(p.lines), p.amounts, p.record),
                    {"now": now, "watch": ()},
                )
            except LedgerUnavailable as exc:
                with self.lock:
                    self.pending[:0] = batch[i:]
                down = exc
                break
            except LedgerError as exc:  # this entry only: the others still go in
                self.reject(p, exc)
                continue
            done += 1
        if done:
            logger.warning("tb_plugins: wrote %d settlements kept while the ledger was down", done)
        return done, down
