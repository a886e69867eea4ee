"""Usage of one call, and the fixed vector of units every ledger stores.

Every counter in every ledger holds the same six integers, in this order::

    tokens, input_tokens, output_tokens, usd (in nano-dollars), requests, calls

Integers keep arithmetic exact and atomic in SQL and Lua alike; a dollar is ``10**9`` units,
fine enough for an embedding of a few tokens.

Every amount that enters tb_plugins has a maximum, checked where it enters (a request, a
usage report, a policy, an override), so that no sum a ledger keeps can pass 64 bits and an
overflow is never mistaken for an unreachable ledger:

==========================  =======================  ==========================================
amount                      maximum                  where it is checked
==========================  =======================  ==========================================
tokens of one call          :data:`MAX_CALL_TOKENS`  ``check(max_tokens=, input_tokens=)``,
                            (10**9)                  :class:`Usage`, counted prompts
dollars of one call         :data:`MAX_CALL_USD`     :class:`Usage` ``usd``
                            ($1,000,000)
a budget limit (tokens,     :data:`MAX_LIMIT`        the policy, overrides
requests, calls)            (10**15)
a budget limit (dollars)    :data:`MAX_LIMIT_USD`    the policy, overrides
                            ($1,000,000,000)
a price per token           :data:`MAX_PRICE`        the policy's ``prices:``
                            ($0.01, i.e. $10k / 1M)
==========================  =======================  ==========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

UNITS: tuple[str, ...] = ("tokens", "input_tokens", "output_tokens", "usd", "requests", "calls")
UNIT_INDEX: dict[str, int] = {name: i for i, name in enumerate(UNITS)}
TOKENS, INPUT_TOKENS, OUTPUT_TOKENS, USD, REQUESTS, CALLS = range(6)
NANO = 1_000_000_000

MAX_CALL_TOKENS = 1_000_000_000
"""Most tokens one call may report or reserve per field (a thousand times today's largest
context window)."""
MAX_CALL_USD = 1_000_000.0
"""Most dollars one call's usage may report."""
MAX_LIMIT = 10**15
"""Largest limit in tokens, requests or calls."""
MAX_LIMIT_USD = 1_000_000_000.0
"""Largest limit in dollars (10**18 nano-dollars, under 2**63)."""
MAX_PRICE = 0.01
"""Largest price per token in dollars ($10,000 per million tokens)."""

Amounts = tuple[int, int, int, int, int, int]
"""Six non-negative integers in :data:`UNITS` order (usd in nano-dollars)."""

Limits = tuple[int | None, int | None, int | None, int | None, int | None, int | None]
"""Six limits in :data:`UNITS` order; None means that unit is not limited."""

ZERO: Amounts = (0, 0, 0, 0, 0, 0)
NO_LIMITS: Limits = (None, None, None, None, None, None)


_INT = frozenset({int})  # the one type a count may have (not bool, not float)


def check_count(name: str, value: object, maximum: int = MAX_CALL_TOKENS) -> int:
    """``value`` as a whole number in ``[0, maximum]``, or a clear error.

    Raises:
        TypeError: not an integer (``bool`` and floats such as ``1.5`` or NaN included).
        ValueError: negative or above ``maximum``.

    Example:
        >>> check_count("max_tokens", 500)
        500
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of tokens, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    if value > maximum:
        raise ValueError(f"{name} is {value:,}, above the maximum of {maximum:,}")
    return value


def check_usd(name: str, value: object, maximum: float = MAX_CALL_USD) -> float:
    """``value`` as dollars in ``[0, maximum]`` (finite), or a clear error.

    Raises:
        TypeError: not a number (``bool`` included).
        ValueError: negative, NaN, infinite or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of dollars, got {value!r}")
    usd = float(value)
    if not math.isfinite(usd):
        raise ValueError(f"{name} must be a finite number of dollars, got {value!r}")
    if usd < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    if usd > maximum:
        raise ValueError(f"{name} is ${usd:,.2f}, above the maximum of ${maximum:,.0f}")
    return usd


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

    def __post_init__(self) -> None:
        counts = (
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.reasoning_tokens,
        )
        # The common case in one pass (this runs on every settle); the checks name the field.
        if not (
            _INT.issuperset(map(type, counts))
            and min(counts) >= 0
            and max(counts) <= MAX_CALL_TOKENS
        ):
            for name in (
                "input_tokens",
                "output_tokens",
                "cached_input_tokens",
                "reasoning_tokens",
            ):
                check_count(f"Usage.{name}", getattr(self, name))
        if self.usd is not None:
            check_usd("Usage.usd", self.usd)
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"Usage.model must be a string, got {self.model!r}")

    @classmethod
    def reported(
        cls,
        input_tokens: object,
        output_tokens: object,
        cached_input_tokens: object = 0,
        reasoning_tokens: object = 0,
        model: str | None = None,
    ) -> Usage:
        """Usage as a provider reported it, made safe to charge: a count that is negative,
        missing (None), NaN or unreadable counts 0; a fractional count (or a numeric string)
        is rounded up; one above :data:`MAX_CALL_TOKENS` (or +infinity) counts that maximum;
        cached and reasoning tokens are capped by input and output. Integrations use it for
        what arrives over the wire, so that odd usage is still charged instead of dropped.

        Example:
            >>> Usage.reported(-5, 10**20).output_tokens
            1000000000
        """
        values = [
            _reported(v)
            for v in (input_tokens, output_tokens, cached_input_tokens, reasoning_tokens)
        ]
        values[2] = min(values[2], values[0])
        values[3] = min(values[3], values[1])
        return cls(
            values[0], values[1], values[2], values[3], model if isinstance(model, str) else None
        )

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


def _reported(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return MAX_CALL_TOKENS if value > 0 else 0
        value = math.ceil(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return 0
    if not isinstance(value, int):
        return 0
    return min(max(value, 0), MAX_CALL_TOKENS)


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
    """One group of the usage report (``guard.usage(group_by=...)``).

    ``requests`` counts the calls that ran (their records' ``action`` is ``allow``, ``clamp``
    or ``downgrade``), of which ``clamped`` had their output cap lowered and ``downgraded``
    were sent to a cheaper model (a downgrade may also clamp: it counts as a downgrade);
    ``denied`` counts refused calls, which add no tokens and no dollars.

    Example:
        >>> row = UsageRow("team:a", 4, 1, 800, 200, 0, 0.02, clamped=1, downgraded=1)
        >>> (row.allowed, row.tokens, row.usd_per_request)
        (2, 1000, 0.005)
    """

    key: str
    requests: int
    denied: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    usd: float
    clamped: int = 0
    downgraded: int = 0

    @property
    def allowed(self) -> int:
        """Calls that ran as asked: ``requests`` less the clamped and downgraded ones."""
        return self.requests - self.clamped - self.downgraded

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def usd_per_request(self) -> float:
        """Dollars per call that ran (0 when none ran)."""
        return self.usd / self.requests if self.requests else 0.0
