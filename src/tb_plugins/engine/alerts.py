"""Threshold alerts and where they go.

An :class:`Alert` fires once per budget, threshold and window across every process sharing the
ledger (the ledger's ``claim_alert`` decides who sends it). Sinks are plain callables taking an
``Alert``; the policy's ``alerts:`` list builds log, webhook and Slack sinks, and
``BudgetGuard(alert_sinks=[...])`` or ``guard.add_alert_sink(fn)`` add your own. A sink that
raises is logged and never breaks the call that crossed the threshold.

Example:
    >>> seen = []
    >>> sink = seen.append          # any callable works as a sink
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

__all__ = ["Alert", "AlertSink", "LogSink", "SlackSink", "WebhookSink"]

logger = logging.getLogger("tb_plugins.alerts")

AlertSink = Callable[["Alert"], object]

_IDLE_SECONDS = 30.0  # a webhook worker with nothing to send for this long ends


@dataclass(frozen=True)
class Alert:
    """A budget crossed a threshold (``kind="threshold"``), is on course to run out before it
    resets (``kind="forecast"``), or refused its first call of the window
    (``kind="exhausted"``).

    Attributes:
        scope: the concrete scope, e.g. ``team:search``.
        budget: the budget's name.
        window: the window spec, e.g. ``day``.
        threshold: the fraction crossed, e.g. ``0.8``.
        utilization: the fraction used after the call that crossed it.
        resets_at: when the window resets (epoch seconds; None for ``total``).
        ts: when it fired.
        kind: ``threshold``, ``forecast`` (at the current burn rate the budget runs out
            before it resets; ``threshold`` is 0) or ``exhausted``.
        forecast_exhausted_at: for ``forecast``, when it runs out at that rate.
        unit: the unit the figures below are in (the budget's most used one).
        spent: what the budget has spent in that unit (dollars for ``usd``).
        limit: the budget's limit in that unit.
    """

    scope: str
    budget: str
    window: str
    threshold: float
    utilization: float
    resets_at: float | None
    ts: float
    kind: str = "threshold"
    forecast_exhausted_at: float | None = None
    unit: str | None = None
    spent: float | None = None
    limit: float | None = None

    @property
    def message(self) -> str:
        """One line a person can act on."""
        reset = (
            "never resets"
            if self.resets_at is None
            else "resets "
            + datetime.fromtimestamp(self.resets_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        )
        used = f"{self.utilization:.0%} used"
        if self.unit is not None and self.spent is not None and self.limit is not None:
            spent = _amount(self.unit, self.spent).split(" ")[0]
            used += f": {spent} of {_amount(self.unit, self.limit)}"
        tail = f"({used}; window {self.window} {reset})"
        if self.kind == "forecast" and self.forecast_exhausted_at is not None:
            at = datetime.fromtimestamp(self.forecast_exhausted_at, tz=timezone.utc)
            return (
                f"budget {self.budget!r} for {self.scope} will be spent by "
                f"{at.strftime('%Y-%m-%d %H:%M UTC')} at the current burn rate {tail}"
            )
        if self.kind == "exhausted":
            return f"budget {self.budget!r} for {self.scope} is exhausted: it refused a call {tail}"
        return f"budget {self.budget!r} for {self.scope} crossed {self.threshold:.0%} {tail}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields plus the message."""
        return {**asdict(self), "message": self.message}


def _amount(unit: str, value: float) -> str:
    """``1,660 tokens``, ``$4.20``."""
    if unit == "usd":
        return f"${value:,.2f}"
    return f"{value:,.0f} {unit.replace('_', ' ')}"


class LogSink:
    """Logs each alert on the ``tb_plugins.alerts`` logger at a level."""

    def __init__(self, level: str = "warning") -> None:
        self.level = logging.getLevelName(level.upper())

    def __call__(self, alert: Alert) -> None:
        logger.log(self.level, "%s", alert.message)


def _where(url: str) -> str:
    """The URL's scheme and host only: a webhook's path and query are often its secret."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    return f"{scheme}://{host}/…"


class WebhookSink:
    """POSTs each alert as JSON to a URL, off the call path.

    Calling the sink only puts the alert on a bounded queue; one worker thread per sink
    (started with the first alert, ended after 30 s with nothing to send) sends it. A POST
    that fails to connect, times out, or is answered with HTTP 429 or 5xx is retried up to
    ``retries`` times, waiting ``backoff``, then twice that, and so on; any other 4xx is not
    retried. A delivery that fails for good is logged (with the URL's host only: a webhook's
    path is often its secret) and counted, never raised; a full queue drops the alert with a
    warning. ``flush(timeout)`` waits for the queue to empty (``BudgetGuard.close`` calls it).

    Args:
        url: an ``http://`` or ``https://`` URL.
        timeout: seconds each POST may take.
        retries: further attempts after the first one fails.
        backoff: seconds before the first retry; doubled before each next one.
        queue_size: alerts waiting to be sent at most; more are dropped.
        sleep: waits between attempts (in the worker thread only); inject one in tests.

    Attributes:
        sent: alerts delivered.
        failed: alerts given up on (retries spent, or a 4xx answer).
        dropped: alerts refused because the queue was full.

    Example:
        >>> sink = WebhookSink("http://127.0.0.1:9000/hook", timeout=2.0, retries=1)
        >>> (sink.sent, sink.failed, sink.dropped)
        (0, 0, 0)
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        queue_size: int = 1000,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an alert webhook needs an http(s) URL, got {_where(url)!r}")
        if retries < 0 or queue_size < 1 or not timeout > 0 or backoff < 0:
            raise ValueError(
                "timeout must be positive, retries and backoff not negative, queue_size at least 1"
            )
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._sleep = sleep
        self._queue: queue.Queue[Alert] = queue.Queue(maxsize=queue_size)
        self._idle = threading.Condition()
        self._pending = 0  # queued or being sent; guarded by _idle
        self._worker: threading.Thread | None = None

    def payload(self, alert: Alert) -> dict[str, object]:
        """The JSON body sent for ``alert``: its fields plus the message."""
        return alert.to_dict()

    def send(self, alert: Alert) -> None:
        """POST one alert now, once (blocking; raises on failure)."""
        import urllib.request  # with the first alert, not with `import tb_plugins`

        body = json.dumps(self.payload(alert)).encode()
        req = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout):
            pass

    def __call__(self, alert: Alert) -> None:
        with self._idle:
            if self._worker is None or not self._worker.is_alive():  # idle, or after a fork
                self._worker = threading.Thread(
                    target=self._run, name="tb-alert-webhook", daemon=True
                )
                self._worker.start()
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped += 1
                logger.warning(
                    "tb_plugins: alert webhook %s: queue full (%d waiting), alert dropped: %s",
                    _where(self.url),
                    self._queue.maxsize,
                    alert.message,
                )
                return
            self._pending += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alert is sent or given up on.

        Returns:
            True if the queue emptied, False if ``timeout`` seconds passed first.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            try:
                alert = self._queue.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._idle:  # __call__ starts a new worker under this lock if needed
                    if self._queue.empty():
                        if self._worker is threading.current_thread():
                            self._worker = None
                        return
                continue
            try:
                self._deliver(alert)
            except Exception:  # never let the worker die
                logger.exception("tb_plugins: alert webhook %s failed", _where(self.url))
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _deliver(self, alert: Alert) -> None:
        import http.client
        import urllib.error

        for attempt in range(self.retries + 1):
            try:
                self.send(alert)
            except urllib.error.HTTPError as exc:
                problem, again = f"HTTP {exc.code}", exc.code >= 500 or exc.code == 429
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                problem, again = f"{type(exc).__name__}: {exc}", True
            else:
                with self._idle:
                    self.sent += 1
                return
            if not again or attempt == self.retries:
                break
            self._sleep(self.backoff * 2**attempt)
        with self._idle:
            self.failed += 1
        logger.warning(
            "tb_plugins: alert webhook %s failed after %d attempt(s) (%s): %s",
            _where(self.url),
            attempt + 1,
            problem,
            alert.message,
        )


class SlackSink(WebhookSink):
    """Posts each alert to a Slack incoming webhook, delivered like :class:`WebhookSink`.

    The body is ``{"text": <the message>, "blocks": [<a section with the message>]}``.

    Example:
        >>> sink = SlackSink("https://hooks.slack.com/services/T000/B000/XXXX")
        >>> alert = Alert("team:search", "search daily", "day", 0.8, 0.83, None, 0.0)
        >>> sink.payload(alert)["text"]
        "budget 'search daily' for team:search crossed 80% (83% used; window day never resets)"
    """

    def payload(self, alert: Alert) -> dict[str, object]:
        """Slack's incoming-webhook body: the message as text and as one ``section`` block."""
        text = _slack_escape(alert.message)
        section = f":warning: *Token budget alert*\n{text}"[:3000]  # Slack's limit for a section
        return {
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": section}}],
        }


def _slack_escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reads as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def dispatch(alert: Alert, sinks: list[AlertSink]) -> None:
    """Hand an alert to every sink; a failing sink is logged, never raised."""
    for sink in sinks:
        try:
            sink(alert)
        except Exception:
            logger.exception("tb_plugins: alert sink %r failed", sink)
