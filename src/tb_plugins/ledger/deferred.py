"""A ledger that could not be opened yet: every operation tries to open it again (at most
once a second) and, until it opens, fails as unreachable, so the guard's fail mode applies.

The guard uses it under ``on_ledger_error: fail_open`` when the ledger a policy names cannot
be opened at start (a SQLite path that does not exist yet, a server that refuses): the process
starts, calls are admitted unchecked with a warning and their spend kept, and the ledger is
used from the first moment it opens.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult
from tb_plugins.core.urls import redact_url
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.errors import LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import GroupBy, Ledger
from tb_plugins.warnings import FailOpenWarning

__all__ = ["DeferredLedger", "open_ledger"]

logger = logging.getLogger("tb_plugins")

_RETRY_EVERY = 1.0


class DeferredLedger(Ledger):
    """Opens ``url`` on first use that succeeds; until then every operation raises
    :class:`~tb_plugins.errors.LedgerUnavailable` naming the URL (its password hidden)."""

    schemes = ()

    def __init__(self, url: str, error: LedgerError, **options: Any) -> None:
        self.url = url
        self._options = options
        self._inner: Ledger | None = None
        self._error: LedgerError = error
        self._tried = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Ledger:
        """Not a scheme of its own: the guard makes one when ``url`` cannot be opened."""
        raise NotImplementedError("DeferredLedger is made by the guard, not from a URL")

    @property
    def opened(self) -> bool:
        """Whether the ledger has been opened."""
        return self._inner is not None

    def _ledger(self) -> Ledger:
        inner = self._inner
        if inner is not None:
            return inner
        with self._lock:
            if self._inner is None and time.monotonic() - self._tried >= _RETRY_EVERY:
                self._tried = time.monotonic()
                from tb_plugins.ledger import ledger_from_url

                try:
                    self._inner = ledger_from_url(self.url, **self._options)
                except LedgerError as exc:
                    self._error = exc
            if self._inner is None:
                raise LedgerUnavailable(
                    f"the ledger {redact_url(self.url)} cannot be opened ({self._error})"
                ) from self._error
            return self._inner

    def reserve(
        self, reservation_id: str, lines: Sequence[Line], amounts: Amounts, *, now: float,
        expires_at: float,
    ) -> ReserveResult:  # fmt: skip
        """See :meth:`Ledger.reserve`."""
        return self._ledger().reserve(
            reservation_id, lines, amounts, now=now, expires_at=expires_at
        )

    def settle(
        self, reservation_id: str, lines: Sequence[Line], amounts: Amounts, record: UsageRecord,
        *, now: float, watch: Sequence[int] | None = None,
    ) -> SettleResult:  # fmt: skip
        """See :meth:`Ledger.settle`."""
        return self._ledger().settle(reservation_id, lines, amounts, record, now=now, watch=watch)

    def release(self, reservation_id: str, *, now: float) -> bool:
        """See :meth:`Ledger.release`."""
        return self._ledger().release(reservation_id, now=now)

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """See :meth:`Ledger.status`."""
        return self._ledger().status(lines, now=now)

    def scopes(self) -> list[tuple[str, str]]:
        """See :meth:`Ledger.scopes`."""
        return self._ledger().scopes()

    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """See :meth:`Ledger.claim_alert`."""
        return self._ledger().claim_alert(alert_key, expires_at=expires_at)

    def append_usage(self, record: UsageRecord) -> None:
        """See :meth:`Ledger.append_usage`."""
        self._ledger().append_usage(record)

    def usage(
        self, *, since: float | None = None, until: float | None = None,
        group_by: GroupBy = "scope", scope: str | None = None,
    ) -> list[UsageRow]:  # fmt: skip
        """See :meth:`Ledger.usage`."""
        return self._ledger().usage(since=since, until=until, group_by=group_by, scope=scope)

    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """See :meth:`Ledger.records`."""
        return self._ledger().records(since=since, until=until, limit=limit)

    def server_time(self) -> float | None:
        """See :meth:`Ledger.server_time` (None until the ledger opens)."""
        return self._inner.server_time() if self._inner is not None else None

    def close(self) -> None:
        """Close the ledger if it was opened."""
        if self._inner is not None:
            self._inner.close()


def open_ledger(url: str, timeout: float, *, fail_closed: bool) -> Ledger:
    """The ledger ``url`` names, opened now, so that a bad path or a server that refuses shows
    when the guard is built: with ``fail_closed`` as :class:`LedgerUnavailable`, else as a
    :class:`~tb_plugins.warnings.FailOpenWarning` (the guard then keeps trying to open it,
    through a :class:`DeferredLedger`)."""
    from tb_plugins.ledger import ledger_from_url

    ledger: Ledger | None = None
    try:
        ledger = ledger_from_url(url, timeout=timeout)
        ledger.records(limit=1)  # opens the file or the connection; cheap on every backend
        return ledger
    except LedgerError as exc:
        problem = f"the ledger {redact_url(url)} cannot be opened ({exc})"
        if fail_closed:
            raise LedgerUnavailable(
                f"{problem}; the policy says on_ledger_error: fail_closed"
            ) from exc
        msg = (
            f"tb_plugins: {problem}; calls are admitted without a budget check (fail_open) "
            f"and their spend kept until it opens"
        )
        logger.error(msg)
        warnings.warn(msg, FailOpenWarning, stacklevel=5)
        return ledger if ledger is not None else DeferredLedger(url, exc, timeout=timeout)
