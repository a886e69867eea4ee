"""Readable quantities: ``2_000_000``, ``"2,000,000"``, ``"2M"``, ``"200k"``, ``"$40"``.

A comma only separates thousands, in groups of three digits (``"1,5M"`` is refused: write
``"1.5M"``); numbers are read exactly (``Decimal``) and checked against a maximum before they
become a Python int or float, so no quantity can overflow anything later.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from tb_plugins.core.pricing import strip_thousands_separators
from tb_plugins.core.usage import MAX_LIMIT, MAX_LIMIT_USD

__all__ = ["parse_quantity", "parse_usd", "short_repr"]

_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmbg])?$")


def short_repr(value: object) -> str:
    """A repr that stays short however big ``value`` is (an alias bomb, a megabyte string)."""
    if isinstance(value, list | tuple | dict | set):
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-10:]} ({len(text):,} characters)"


def _amount_text(value: str, *, dollars: bool = False) -> Decimal | None:
    """The number a quantity string spells (``"2,000"``, ``"1.5M"``), exactly; None if none.

    Raises:
        ValueError: a comma that is not a thousands separator.
    """
    s = strip_thousands_separators(value.strip().replace("_", "")).lower()
    if dollars:
        s = s.lstrip("$").strip()
    m = _QUANTITY.match(s)
    if not m:
        return None
    return Decimal(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1)


def parse_quantity(value: Any, *, maximum: int = MAX_LIMIT) -> int:
    """A non-negative integer from ``1000``, ``"2_000_000"``, ``"2,000"``, ``"200k"``, ``"1.5M"``.

    A comma only separates thousands, in groups of three digits: ``"1,5M"`` and ``"1,50"`` are
    refused (with a hint to write ``"1.5M"``), never read as 15M or 150.

    Args:
        value: the quantity.
        maximum: the largest value accepted; by default
            :data:`~tb_plugins.core.usage.MAX_LIMIT` (10**15).

    Raises:
        ValueError: not a readable quantity, negative, or above ``maximum``.

    Example:
        >>> parse_quantity("2,000,000"), parse_quantity("1.5M")
        (2000000, 1500000)
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number of tokens, got {value!r}")
    amount: int | float
    if isinstance(value, int):
        amount = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        amount = value
    elif isinstance(value, str):
        number = _amount_text(value)
        if number is None:
            raise ValueError(
                f"expected a number such as 200000, '200k' or '2M', got {short_repr(value)}"
            )
        if number > maximum:
            raise ValueError(f"{short_repr(value)} is above the maximum of {maximum:,}")
        return int(number.to_integral_value())
    else:
        raise ValueError(f"expected a number, got {type(value).__name__} {short_repr(value)}")
    if amount < 0:
        raise ValueError(f"must not be negative, got {short_repr(value)}")
    if amount > maximum:
        raise ValueError(f"{short_repr(value)} is above the maximum of {maximum:,}")
    return int(amount)


def parse_usd(value: Any, *, maximum: float = MAX_LIMIT_USD) -> float:
    """Dollars from ``40``, ``40.5``, ``"$40"``, ``"$1.5k"``, ``"$2,000"``.

    A comma only separates thousands (``"$1,5"`` is refused); NaN and infinity are refused.

    Args:
        value: the amount.
        maximum: the most dollars accepted; by default
            :data:`~tb_plugins.core.usage.MAX_LIMIT_USD` ($1,000,000,000).

    Raises:
        ValueError: not a readable amount of dollars, not finite, negative, or above
            ``maximum``.

    Example:
        >>> parse_usd("$1.5k")
        1500.0
    """
    if isinstance(value, bool):
        raise ValueError(f"expected dollars, got {value!r}")
    if isinstance(value, int):
        if value > maximum:  # before float(): a huge int overflows it
            raise ValueError(f"{short_repr(value)} is above the maximum of ${maximum:,.0f}")
        usd = float(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite amount of dollars, got {value!r}")
        usd = value
    elif isinstance(value, str):
        number = _amount_text(value, dollars=True)
        if number is None:
            raise ValueError(f"expected dollars such as 40 or '$40', got {short_repr(value)}")
        if number > Decimal(maximum):
            raise ValueError(f"{short_repr(value)} is above the maximum of ${maximum:,.0f}")
        usd = float(number)
    else:
        raise ValueError(f"expected dollars, got {type(value).__name__} {short_repr(value)}")
    if usd < 0:
        raise ValueError(f"must not be negative, got {short_repr(value)}")
    if usd > maximum:
        raise ValueError(f"{short_repr(value)} is above the maximum of ${maximum:,.0f}")
    return usd
