"""What the two server ledgers (Redis, PostgreSQL) share: their URLs, the server's clock, and
the reservations whose reply was lost.

A call whose reply was lost may still have run on the server. A reserve (or release) that
failed that way is remembered as an *orphan*, and its hold is released right after the
ledger's next successful call (one more round trip then, and only then), so no phantom hold
outlives an outage by more than a call; settling or releasing that id later is harmless.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

from tb_plugins.core.urls import redact_url
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.flow import Flow, FlowLedger

__all__ = ["NetworkLedger", "split_line_key", "url_options"]

T = TypeVar("T")
logger = logging.getLogger("tb_plugins")

ORPHANS_MAX = 10_000  # reservation ids kept for a later release (the oldest expire by their TTL)
ORPHANS_BATCH = 500  # ids released per round trip


def url_options(
    url: str, options: dict[str, Any], known: Sequence[str], others: str
) -> tuple[dict[str, Any], SplitResult]:
    """The ledger's own options, from the URL's query and the keywords (which win; a keyword
    given as None counts as not given), and the URL left with the driver's parameters only.

    Raises:
        ConfigError: a keyword option is not one of ``known`` (the message names ``others``,
            the driver's parameters that the URL's query may also carry).
    """
    parts = urlsplit(url)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for ledger {redact_url(url)}; "
            f"known: {', '.join(known)} (and {others})"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours: dict[str, Any] = {k: v for k, v in query if k in known}
    ours.update({k: v for k, v in options.items() if v is not None})
    rest = [(k, v) for k, v in query if k not in known]
    return ours, parts._replace(query=urlencode(rest, quote_via=quote))


def split_line_key(key: str | bytes) -> tuple[str, str]:
    """(scope, window) of a stored line key (see :func:`~tb_plugins.ledger.base.line_key`)."""
    text = key.decode("utf-8") if isinstance(key, bytes) else key
    scope, _, window = text.partition("|")
    return unquote(scope), window


class NetworkLedger(FlowLedger):
    """A ledger on a server: its clock, a ``ping``, and the orphans of lost replies."""

    kind: ClassVar[str] = ""
    """The server's name in messages (``Redis``, ``PostgreSQL``)."""

    where: str = ""
    """``host:port`` of the server (never the password)."""

    def __init__(self) -> None:
        # Reservation ids whose reserve (or release) got no reply: it may have run all the
        # same, so their holds are released after the next successful call.
        self._orphans: dict[str, None] = {}
        self._orphans_lock = threading.Lock()

    @abc.abstractmethod
    def _reply_lost(self, exc: LedgerUnavailable) -> bool:
        """Whether the call that failed with ``exc`` may have reached the server and run."""

    @abc.abstractmethod
    def _forget(self, reservation_ids: Sequence[str]) -> Flow[object]:
        """One round trip that drops the holds of ``reservation_ids`` (errors wrapped, and no
        release of orphans after it)."""

    @abc.abstractmethod
    def _server_time(self) -> Flow[float]:
        """The flow of :meth:`server_time`."""

    @abc.abstractmethod
    def _ping(self) -> Flow[object]:
        """The flow of :meth:`ping`."""

    def server_time(self) -> float:
        """The server's clock, in epoch seconds: guards on hosts with skewed clocks that share
        the ledger agree on window boundaries."""
        return self._drive(self._server_time())

    async def aserver_time(self) -> float:
        """Async :meth:`server_time`."""
        return await self._adrive(self._server_time())

    def ping(self) -> None:
        """One bare round trip, e.g. to measure the network floor."""
        self._drive(self._ping())

    # -- reservations whose reply was lost ---------------------------------------------------

    def _unseen(self, reservation_id: str, flow: Flow[T]) -> Flow[T]:
        """``flow``, a reserve or a release of ``reservation_id``; when it fails after the
        call may have run (its reply was lost), the id becomes an orphan."""
        self._adopt(reservation_id)
        try:
            return (yield from flow)
        except LedgerUnavailable as exc:
            if self._reply_lost(exc):
                with self._orphans_lock:
                    self._orphans[reservation_id] = None
                    while len(self._orphans) > ORPHANS_MAX:
                        del self._orphans[next(iter(self._orphans))]
            raise

    def _adopt(self, reservation_id: str) -> None:
        """Forget ``reservation_id`` as an orphan: it is being reserved, settled or released
        again, which replaces or drops its hold by itself."""
        if self._orphans:
            with self._orphans_lock:
                self._orphans.pop(reservation_id, None)

    def _release_orphans(self) -> Flow[None]:
        """Release (best effort, one round trip) the holds of up to ``ORPHANS_BATCH`` orphans;
        run after a successful call. A later settle or release of such an id still works (it
        finds no hold)."""
        with self._orphans_lock:
            batch = list(self._orphans)[:ORPHANS_BATCH]
            for rid in batch:
                del self._orphans[rid]
        if not batch:
            return
        try:
            yield from self._forget(batch)
        except LedgerError as exc:
            with self._orphans_lock:
                for rid in batch:
                    self._orphans.setdefault(rid, None)
            logger.warning("tb_plugins: %s ledger at %s: releasing %d reservation(s) that may "
                           "have landed unseen failed (retried later): %s",
                           self.kind, self.where, len(batch), exc)  # fmt: skip
