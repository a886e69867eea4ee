"""Learned output holds (``output_hold: p95 | p99``): a call holds a high percentile of the
output tokens recent calls of its model really produced, capped by its own output cap, instead
of the whole cap.

Each model keeps its last :data:`SAMPLES` outputs in a ring, and at most :data:`MODELS` models
are kept (the least recently used goes first), so memory stays bounded whatever the traffic.
The rings are fed by this guard's settles and, once, by a bounded read of the ledger's usage
log (:data:`WARM_SECONDS`, at most :data:`WARM_RECORDS` records) on the guard's first check,
so guards sharing a ledger learn from each other. A model with fewer than
:data:`MIN_SAMPLES` outputs seen holds its cap, as with ``output_hold: max_tokens``.

A call that produces more than its hold is still charged what it used: the overshoot this
allows is at most ``max_tokens - hold`` output tokens per call in flight.

Example:
    >>> holds = OutputHolds("p95")
    >>> for n in range(1, 101):
    ...     holds.observe("gpt-4o", n)
    >>> holds.hold("gpt-4o", 1000), holds.hold("gpt-4o", 50), holds.hold("other", 1000)
    (95, 50, 1000)
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tb_plugins.core.usage import UsageRecord

__all__ = ["MIN_SAMPLES", "MODELS", "SAMPLES", "WARM_RECORDS", "WARM_SECONDS", "OutputHolds"]

SAMPLES = 256
"""Outputs kept per model (the most recent)."""
MODELS = 256
"""Models kept (least recently used dropped first)."""
MIN_SAMPLES = 20
"""Outputs a model needs before its percentile is held (a cold start holds the cap)."""
WARM_SECONDS = 86_400.0
"""How far back the usage log is read to warm the rings."""
WARM_RECORDS = 10_000
"""Most usage records read to warm the rings."""

_QUANTILES = {"p95": 0.95, "p99": 0.99}


class _Ring:
    __slots__ = ("cached", "outputs")

    def __init__(self) -> None:
        self.outputs: deque[int] = deque(maxlen=SAMPLES)
        self.cached: int | None = None  # the percentile, until the next output


class OutputHolds:
    """Per-model percentiles of recent output tokens. Thread-safe.

    Args:
        mode: ``p95`` or ``p99``.
    """

    def __init__(self, mode: Literal["p95", "p99"]) -> None:
        self.quantile = _QUANTILES[mode]
        self.warmed = False
        self._lock = threading.Lock()
        self._rings: OrderedDict[str, _Ring] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rings)

    def observe(self, model: str, output_tokens: int) -> None:
        """Add one call's real output to ``model``'s ring."""
        with self._lock:
            ring = self._rings.get(model)
            if ring is None:
                ring = self._rings[model] = _Ring()
                if len(self._rings) > MODELS:
                    self._rings.popitem(last=False)
            else:
                self._rings.move_to_end(model)
            ring.outputs.append(output_tokens)
            ring.cached = None

    def hold(self, model: str, cap: int) -> int:
        """The output to hold for a call of ``model`` allowed ``cap`` output tokens: the
        learned percentile, never above ``cap``; ``cap`` itself on a cold start."""
        with self._lock:
            ring = self._rings.get(model)
            if ring is None or len(ring.outputs) < MIN_SAMPLES:
                return cap
            if ring.cached is None:
                ordered = sorted(ring.outputs)  # nearest rank: at most SAMPLES values
                ring.cached = ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)]
            return min(ring.cached, cap)

    def claim_warm(self) -> bool:
        """True once, for the one caller that is to read the usage log and :meth:`warm`."""
        with self._lock:
            claimed, self.warmed = not self.warmed, True
            return claimed

    def warm(self, records: Iterable[UsageRecord] | None) -> None:
        """Feed the rings from usage records (oldest first): calls that ran and reported
        their usage (refusals and estimated charges say nothing of real outputs), under the
        model the guard decided, as a settle does (the one asked for, unless downgraded: a
        provider's dated name for the model that served would never be looked up)."""
        for r in records or ():
            if r.action != "deny" and not r.estimated:
                model = r.model if r.action == "downgrade" else r.requested_model
                self.observe(model, r.output_tokens)
