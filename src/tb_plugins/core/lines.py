"""Ledger lines: one scope in one window, the unit a ledger stores spend and holds on, and
the states and results a ledger answers with. Pure values: the ledgers implement them, the
decision rules read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from tb_plugins.core.usage import Amounts, Limits

__all__ = ["Line", "LineState", "ReserveResult", "SettleResult", "line_key"]


def line_key(scope: str, window: str) -> str:
    """The storage key of one scope in one window: ``<percent-escaped scope>|<window>``.

    Every character outside ``[A-Za-z0-9_.~-]`` is escaped, so ``:``, ``|``, ``{``, ``}``,
    quotes, spaces and unicode in a scope name cannot collide with another scope or break a
    Redis hash tag.

    Example:
        >>> line_key("user:{alice} x", "day")
        'user%3A%7Balice%7D%20x|day'
    """
    return f"{quote(scope, safe='')}|{window}"


@dataclass(frozen=True, slots=True)
class Line:
    """One scope in one window, as charged by one call.

    Attributes:
        key: :func:`line_key` of ``scope`` and ``window``.
        scope: the concrete scope, e.g. ``"user:alice"``.
        window: the canonical window spec, e.g. ``"day"`` or ``"rolling:1m"``.
        bucket: the bucket charged now.
        span: how many buckets a check sums (buckets ``bucket - k*width`` for ``k < span``).
        width: seconds between buckets.
        limits: the limit per unit (None = not limited) — the tightest of every budget that
            applies to this scope and window.
        expires_at: after this instant the bucket is no longer read (None = never).

    Settled spend counts in the buckets ``lowest_bucket`` to ``bucket``. Holds count in the
    bucket ``bucket`` only on a line that sums one bucket (calendar windows, ``total``); on a
    line that sums more (:attr:`rolling`) every live hold counts, whatever its bucket.
    """

    key: str
    scope: str
    window: str
    bucket: int
    span: int
    width: int
    limits: Limits
    expires_at: float | None

    @property
    def lowest_bucket(self) -> int:
        """The oldest bucket a check sums."""
        return self.bucket - (self.span - 1) * self.width

    @property
    def rolling(self) -> bool:
        """Whether the line sums more than one bucket (a rolling window): then every live
        hold counts on it, whatever bucket it was made in. Backends test the same thing as
        ``lowest_bucket < bucket``."""
        return self.lowest_bucket < self.bucket


@dataclass(frozen=True, slots=True)
class LineState:
    """Spend on one line: settled (``spent``) and held by live reservations (``held``)."""

    spent: Amounts
    held: Amounts


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of ``Ledger.reserve``.

    ``states`` has one entry per line, in order, as they were *before* this reservation (so the
    guard can tell what is left, and which thresholds the call crosses). A unit the line does
    not limit may read 0 here (a check needs only the limited ones); ``Ledger.status``
    always reads every unit.
    """

    ok: bool
    states: tuple[LineState, ...]


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The outcome of ``Ledger.settle``: ``applied`` is False when the id was settled
    before (nothing changed); ``states`` are the lines *after* settling, one entry per line.

    An entry is ``None`` for a line the caller did not ask to watch (``settle(watch=...)``):
    a backend may skip reading it back. As in :class:`ReserveResult`, a unit the line does not
    limit may read 0; ``held`` may read 0 too (alerts look at settled spend only).
    """

    applied: bool
    states: tuple[LineState | None, ...]
