"""Threshold alerts and where they go.

An :class:`Alert` fires once per budget, threshold and window across every process sharing the
ledger (the ledger's ``claim_alert`` decides who sends it). Sinks are plain callables taking an
``Alert``; the policy's ``alerts:`` list builds log and webhook sinks, and
``BudgetGuard(alert_sinks=[...])`` or ``guard.add_alert_sink(fn)`` add your own. A sink that
raises is logged and never breaks the call that crossed the threshold.

Example:
    >>> seen = []
    >>> sink = seen.append          # any callable works as a sink
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

__all__ = ["Alert", "AlertSink", "LogSink", "WebhookSink"]

logger = logging.getLogger("tb_plugins.alerts")

AlertSink = Callable[["Alert"], object]


@dataclass(frozen=True)
class Alert:
    """A budget crossed a threshold.

    Attributes:
        scope: the concrete scope, e.g. ``team:search``.
        budget: the budget's name.
        window: the window spec, e.g. ``day``.
        threshold: the fraction crossed, e.g. ``0.8``.
        utilization: the fraction used after the call that crossed it.
        resets_at: when the window resets (epoch seconds; None for ``total``).
        ts: when it fired.
    """

    scope: str
    budget: str
    window: str
    threshold: float
    utilization: float
    resets_at: float | None
    ts: float

    @property
    def message(self) -> str:
        """One line a person can act on."""
        reset = (
            "never resets"
            if self.resets_at is None
            else "resets "
            + datetime.fromtimestamp(self.resets_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        )
        return (
            f"budget {self.budget!r} for {self.scope} crossed {self.threshold:.0%} "
            f"({self.utilization:.0%} used; window {self.window} {reset})"
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields plus the message."""
        return {**asdict(self), "message": self.message}


class LogSink:
    """Logs each alert on the ``tb_plugins.alerts`` logger at a level."""

    def __init__(self, level: str = "warning") -> None:
        self.level = logging.getLevelName(level.upper())

    def __call__(self, alert: Alert) -> None:
        logger.log(self.level, "%s", alert.message)


class WebhookSink:
    """POSTs each alert as JSON to a URL, in a background thread with a timeout."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    def send(self, alert: Alert) -> None:
        """POST one alert now (blocking)."""
        import urllib.request

        body = json.dumps(alert.to_dict()).encode()
        req = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout):
            pass

    def __call__(self, alert: Alert) -> None:
        def run() -> None:
            try:
                self.send(alert)
            except Exception:
                logger.exception("tb_plugins: alert webhook %s failed", self.url)

        threading.Thread(target=run, name="tb-alert-webhook", daemon=True).start()


def dispatch(alert: Alert, sinks: list[AlertSink]) -> None:
    """Hand an alert to every sink; a failing sink is logged, never raised."""
    for sink in sinks:
        try:
            sink(alert)
        except Exception:
            logger.exception("tb_plugins: alert sink %r failed", sink)
