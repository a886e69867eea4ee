"""Usage of one call, and the fixed vector of units every ledger stores.

Every counter in every ledger holds the same six integers, in this order::

    tokens, input_tokens, output_tokens, usd (in nano-dollars), requests, calls

Integers keep arithmetic exact and atomic in SQL and Lua alike; a dollar is ``10**9`` units,
fine enough for an embedding of a few tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

UNITS: tuple[str, ...] = ("tokens", "input_tokens", "output_tokens", "usd", "requests", "calls")
UNIT_INDEX: dict[str, int] = {name: i for i, name in enumerate(UNITS)}
TOKENS, INPUT_TOKENS, OUTPUT_TOKENS, USD, REQUESTS, CALLS = range(6)
NANO = 1_000_000_000

Amounts = tuple[int, int, int, int, int, int]
"""Six non-negative integers in :data:`UNITS` order (usd in nano-dollars)."""

Limits = tuple[int | None, int | None, int | None, int | None, int | None, int | None]
"""Six limits in :data:`UNITS` order; None means that unit is not limited."""

ZERO: Amounts = (0, 0, 0, 0, 0, 0)
NO_LIMITS: Limits = (None, None, None, None, None, None)


def usd_to_nano(usd: float, *, round_up: bool = False) -> int:
    """Dollars to integer nano-dollars (rounded up for holds, to nearest for spend)."""
    scaled = usd * NANO
    return math.ceil(scaled - 1e-6) if round_up else round(scaled)


def nano_to_usd(nano: int) -> float:
    """Integer nano-dollars to dollars."""
    return nano / NANO


def amounts(
    input_tokens: int, output_tokens: int, usd_nano: int, *, requests: int = 1, calls: int = 1
) -> Amounts:
    """The amounts one call charges to every scope on its path."""
    return (
        input_tokens + output_tokens,
        input_tokens,
        output_tokens,
        usd_nano,
        requests,
        calls,
    )


def add(a: Amounts, b: Amounts) -> Amounts:
    """Element-wise sum of two amount vectors."""
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5])


def unit_value(unit: int, raw: int) -> float:
    """A stored integer in human units (dollars for usd, plain count otherwise)."""
    return nano_to_usd(raw) if unit == USD else float(raw)


@dataclass(frozen=True)
class Usage:
    """What a call really used, as the provider reported it.

    Args:
        input_tokens: prompt tokens, cached ones included.
        output_tokens: completion tokens, reasoning ones included.
        cached_input_tokens: the part of ``input_tokens`` served from the provider's cache.
        reasoning_tokens: the part of ``output_tokens`` spent on reasoning (reported only).
        model: the model that served the call, if the provider said.
        usd: the cost if the caller knows it better than the price table.

    Example:
        >>> Usage(input_tokens=812, output_tokens=95, model="gpt-4o").total_tokens
        907
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    usd: float | None = None

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class UsageRecord:
    """One row of the usage log: a settled call, or a refused one (``action="deny"``)."""

    ts: float
    reservation_id: str
    scopes: tuple[str, ...]
    model: str
    requested_model: str
    action: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    usd: float = 0.0
    priced: bool = True
    estimated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UsageRow:
    """One group of the usage report (``guard.usage(group_by=...)``)."""

    key: str
    requests: int
    denied: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    usd: float

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens
