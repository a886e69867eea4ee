"""The validated field types of the policy file and their maxima, and the error messages that
name the file, the entry and the field of a bad value."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from tb_plugins.core.quantities import parse_quantity, parse_usd, short_repr
from tb_plugins.core.usage import MAX_CALL_TOKENS
from tb_plugins.core.windows import parse_duration
from tb_plugins.errors import ConfigError

MAX_RESERVATION_TTL = 7 * 86400.0
"""Longest ``reservation_ttl``: 7 days."""
MAX_LEDGER_TIMEOUT = 60.0
"""Longest ``ledger_timeout``: 60 seconds."""


def _limit(value: Any) -> int:
    return parse_quantity(value)


def _call_tokens(value: Any) -> int:
    return parse_quantity(value, maximum=MAX_CALL_TOKENS)


def _dollars(value: Any) -> float:
    return parse_usd(value)


def _ttl(value: Any) -> float:
    return parse_duration(value, maximum=MAX_RESERVATION_TTL)


def _timeout(value: Any) -> float:
    return parse_duration(value, maximum=MAX_LEDGER_TIMEOUT)


def _fraction(name: str, value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{name} is a fraction in (0, 1], got {value!r}")
    return value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a fraction such as 0.8, got {value!r}")
    return value


Quantity = Annotated[int, BeforeValidator(_limit)]
"""A limit in tokens, requests or calls: at most :data:`~tb_plugins.core.usage.MAX_LIMIT`."""
CallTokens = Annotated[int, BeforeValidator(_call_tokens)]
"""Tokens of one call: at most :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`."""
Dollars = Annotated[float, BeforeValidator(_dollars)]
"""A limit in dollars: finite, at most :data:`~tb_plugins.core.usage.MAX_LIMIT_USD`."""
TTL = Annotated[float, BeforeValidator(_ttl)]
Timeout = Annotated[float, BeforeValidator(_timeout)]
Fraction = Annotated[float, BeforeValidator(_no_bool)]


MAX_OVERRIDE_REFRESH = 3600.0
"""Longest ``override_refresh``: an hour."""


def _refresh(value: Any) -> float:
    if value in (0, "0", "0s") and not isinstance(value, bool):
        return 0.0
    return parse_duration(value, maximum=MAX_OVERRIDE_REFRESH)


Refresh = Annotated[float, BeforeValidator(_refresh)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _describe(loc: tuple[int | str, ...], raw: Any) -> str:
    """``budgets[2] (scope 'user:*'): field 'window'`` from a pydantic error location."""
    parts: list[str] = []
    node: Any = raw
    i = 0
    while i < len(loc):
        item = loc[i]
        if isinstance(item, int):
            label = f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(node, Mapping) and "scope" in node:
                label += f" (scope {short_repr(node['scope'])})"
            parts[-1:] = [(parts[-1] if parts else "") + label]
        else:
            if item in {"function-after[_check()]", "function-before[_expand_limit()]"}:
                i += 1
                continue
            if item.startswith(
                ("function-", "literal[", "constrained-", "lax-", "json-")
            ) or item in {
                "str",
                "int",
                "float",
                "UsePrice",
            }:
                i += 1
                continue
            node = node.get(item) if isinstance(node, Mapping) else None
            parts.append(str(item))
        i += 1
    if not parts:
        return "top level"
    head, field = parts[:-1], parts[-1]
    if field.endswith(")") or field.endswith("]"):
        return ".".join(parts)
    return (".".join(head) + ": " if head else "") + f"field {field!r}"


def config_error(exc: ValidationError, data: Any, source: str) -> ConfigError:
    """One :class:`~tb_plugins.errors.ConfigError` for every problem pydantic found in
    ``data``, a line each: ``<source>: <entry>: field '<name>': <what is wrong>``."""
    lines = []
    first_loc = None
    for err in exc.errors():
        where = _describe(tuple(err["loc"]), data)
        first_loc = first_loc or where
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        elif err["type"] == "missing":
            msg = "this field is required"
        lines.append(f"{source}: {where}: {msg}")
    return ConfigError("\n".join(lines), source=source, location=first_loc)
