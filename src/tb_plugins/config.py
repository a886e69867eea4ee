"""The policy file (``budgets.yaml``): who may spend how much, per window.

The file is validated whole; a bad file is refused with a :class:`~tb_plugins.errors.ConfigError`
that names the file, the entry and the field::

    budgets.yaml: budgets[2] (scope 'user:*'): field 'window': unknown window 'fortnight' …

Quantities are readable: ``2_000_000``, ``"2,000,000"``, ``"2M"``, ``"200k"``, ``"$40"``. A comma
only separates thousands (``"1,5M"`` is refused: write ``"1.5M"``). Each budget may also be
written in one line: ``limit: 200k tokens/day`` or ``limit: $5/month``.

Every amount has a maximum, checked here so that a policy that loads can never overflow a
ledger later (see :mod:`tb_plugins.core.usage`):

* ``tokens``, ``input_tokens``, ``output_tokens``, ``requests``, ``calls``: at most
  :data:`~tb_plugins.core.usage.MAX_LIMIT` (10**15).
* ``usd``: finite, at most :data:`~tb_plugins.core.usage.MAX_LIMIT_USD` ($1,000,000,000).
* ``request.max_input_tokens``, ``request.max_output_tokens``, ``default_output_tokens``,
  ``min_output_tokens``: at most :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` (10**9).
* ``prices:`` and ``unpriced: {use_price: …}``: finite, not negative, at most
  :data:`~tb_plugins.core.usage.MAX_PRICE` ($0.01 per token, $10,000 per million tokens).
* ``window: rolling:<d>``: 1 second to :data:`~tb_plugins.core.windows.MAX_ROLLING` (366 days).
* ``reservation_ttl``: positive, at most :data:`MAX_RESERVATION_TTL` (7 days).
* ``ledger_timeout``: positive, at most :data:`MAX_LEDGER_TIMEOUT` (60 seconds).
* ``alerts``, ``downgrade_at``: fractions in (0, 1] (NaN and infinity refused).

A YAML file is refused whole, before any of that, if it is larger than
:data:`MAX_POLICY_BYTES` (1 MiB), repeats a key in any mapping, nests deeper than
:data:`MAX_YAML_DEPTH` levels, or expands (through anchors and aliases) to more than
:data:`MAX_YAML_NODES` nodes.

Example:
    >>> policy = load_policy_dict({"budgets": [{"scope": "team:search", "limit": "2M tokens/day"}]})
    >>> policy.budgets[0].tokens, policy.budgets[0].window
    (2000000, 'day')
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tb_plugins.core.budgets import Budget
from tb_plugins.core.pricing import parse_price
from tb_plugins.core.quantities import parse_quantity, parse_usd, short_repr
from tb_plugins.core.scopes import KNOWN_KINDS, escape_text, normalize_scope
from tb_plugins.core.usage import (
    MAX_CALL_TOKENS,
    NO_LIMITS,
    UNIT_INDEX,
    usd_to_nano,
)
from tb_plugins.core.windows import parse_duration, parse_window
from tb_plugins.errors import ConfigError
from tb_plugins.policy_yaml import (
    MAX_POLICY_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    read_policy_yaml,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "KNOWN_KINDS",
    "MAX_LEDGER_TIMEOUT",
    "MAX_POLICY_BYTES",
    "MAX_RESERVATION_TTL",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "AlertSinkSpec",
    "Budget",
    "compile_budget",
    "BudgetSpec",
    "Policy",
    "PriceSpec",
    "RequestCaps",
    "load_policy",
    "load_policy_dict",
    "parse_quantity",
    "parse_usd",
]

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

_MAX_ONE_LINE = 200
_ONE_LINE = re.compile(
    r"^\s*(?P<amount>\$?[\d_.,]+(?:\s*[kmbgKMBG](?![a-z]))?)\s*(?P<unit>[a-z_]+)?\s*/\s*(?P<window>\S+)\s*$"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Strict):
    """One entry of ``budgets:`` as written in the file.

    ``scope`` goes through :func:`~tb_plugins.core.scopes.normalize_scope` (a known kind, no
    control character, at most :data:`~tb_plugins.core.scopes.MAX_SCOPE_LENGTH` characters).
    ``tokens``, ``input_tokens``, ``output_tokens``, ``requests`` and ``calls`` are at most
    :data:`~tb_plugins.core.usage.MAX_LIMIT` (10**15); ``usd`` is finite and at most
    :data:`~tb_plugins.core.usage.MAX_LIMIT_USD` ($1,000,000,000); a rolling window is at most
    :data:`~tb_plugins.core.windows.MAX_ROLLING` (366 days); ``alerts`` and ``downgrade_at`` are
    fractions in (0, 1].
    """

    scope: str
    window: str = ""
    name: str | None = None
    limit: str | None = None
    tokens: Quantity | None = None
    input_tokens: Quantity | None = None
    output_tokens: Quantity | None = None
    usd: Dollars | None = None
    requests: Quantity | None = None
    calls: Quantity | None = None
    alerts: list[float] = Field(default_factory=list)
    downgrade_at: Fraction | None = None

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        return normalize_scope(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and escape_text(v) != v:
            raise ValueError(
                f"budget name {v!r} contains a control character; names are printable text"
            )
        return v

    @field_validator("alerts", mode="before")
    @classmethod
    def _alerts_given(cls, v: Any) -> Any:
        if isinstance(v, list):
            for t in v:
                _no_bool(t)
        return v

    @field_validator("alerts")
    @classmethod
    def _alerts(cls, v: list[float]) -> list[float]:
        for t in v:
            _fraction("an alert threshold", t)
        return sorted(set(v))

    @field_validator("downgrade_at")
    @classmethod
    def _downgrade_at(cls, v: float | None) -> float | None:
        return None if v is None else _fraction("downgrade_at", v)

    @model_validator(mode="before")
    @classmethod
    def _expand_limit(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("limit") is None:
            return data
        text = data["limit"]
        if not isinstance(text, str):
            raise ValueError(
                f"field 'limit': expected text such as '200k tokens/day', got {short_repr(text)}"
            )
        if len(text) > _MAX_ONE_LINE:
            raise ValueError(
                f"field 'limit': {short_repr(text)} is longer than {_MAX_ONE_LINE} characters"
            )
        # One space per gap: _ONE_LINE's neighbouring optional spaces would otherwise
        # backtrack quadratically on a long run of blanks.
        m = _ONE_LINE.match(" ".join(text.split()))
        if not m:
            raise ValueError(
                f"field 'limit': cannot read {short_repr(text)}; "
                f"write e.g. '200k tokens/day' or '$5/month'"
            )
        out = dict(data)
        amount, unit, window = m.group("amount"), m.group("unit"), m.group("window")
        if amount.startswith("$"):
            if unit not in (None, "usd"):
                raise ValueError(f"field 'limit': '$' goes with usd, not {unit!r}, in {text!r}")
            unit = "usd"
        if unit is None or unit not in UNIT_INDEX:
            raise ValueError(
                f"field 'limit': unknown unit {unit!r} in {text!r}; "
                f"use one of {', '.join(UNIT_INDEX)}"
            )
        if unit in out:
            raise ValueError(f"field 'limit': {unit!r} is given twice (also in 'limit')")
        try:
            out[unit] = parse_usd(amount) if unit == "usd" else parse_quantity(amount)
        except ValueError as exc:
            raise ValueError(f"field 'limit': {exc}") from None
        if out.get("window") not in (None, "", window):
            raise ValueError(
                f"field 'limit': window {window!r} contradicts window {out['window']!r}"
            )
        out["window"] = window
        return out

    @model_validator(mode="after")
    def _check(self) -> BudgetSpec:
        if not self.window:
            raise ValueError(
                "field 'window' is required: minute, hour, day, week, month, total or rolling:<d>"
            )
        try:
            parse_window(self.window)
        except ValueError as exc:
            raise ValueError(f"field 'window': {exc}") from None
        if all(getattr(self, u) is None for u in UNIT_INDEX):
            raise ValueError(
                "no limit given: set at least one of tokens, input_tokens, output_tokens, usd, "
                "requests, calls"
            )
        if self.calls is not None and not self.scope.startswith(("run:", "session:")):
            raise ValueError(
                "field 'calls': the calls limit applies to 'run:' and 'session:' scopes"
            )
        return self


class RequestCaps(_Strict):
    """Per-call caps (``request:``), each at most
    :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` (10**9)."""

    max_input_tokens: CallTokens | None = None
    max_output_tokens: CallTokens | None = None


class PriceSpec(_Strict):
    """A price override: USD per token, written as ``"$2.50/1M"`` or a number per token.

    Each price is finite, not negative, and at most :data:`~tb_plugins.core.usage.MAX_PRICE`
    ($0.01 per token, i.e. $10,000 per million tokens).
    """

    input: float
    output: float
    cached_input: float | None = None

    @field_validator("input", "output", "cached_input", mode="before")
    @classmethod
    def _price(cls, v: Any) -> Any:
        if v is None:
            return v
        return parse_price(v)


class AlertSinkSpec(_Strict):
    """One entry of ``alerts:``: ``{log: warning}``, ``{webhook: https://…}`` or
    ``{slack: https://hooks.slack.com/…}``.

    A webhook or Slack entry may also set ``timeout`` (each POST; a duration, positive, at most
    60 s; default 5 s) and ``retries`` (after a failed POST; 0 to 10; default 3).
    """

    log: Literal["debug", "info", "warning", "error", "critical"] | None = None
    webhook: str | None = None
    slack: str | None = None
    timeout: Timeout | None = None
    retries: int | None = None

    @field_validator("retries", mode="before")
    @classmethod
    def _retries(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10):
            raise ValueError(f"expected a whole number from 0 to 10, got {short_repr(v)}")
        return v

    @property
    def url(self) -> str | None:
        """The webhook or Slack URL (None for a log sink)."""
        return self.webhook if self.webhook is not None else self.slack

    @model_validator(mode="after")
    def _one(self) -> AlertSinkSpec:
        given = [k for k in ("log", "webhook", "slack") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "an alert sink is exactly one of 'log: <level>', 'webhook: <url>' or "
                f"'slack: <url>', got {' and '.join(given) or 'none'}"
            )
        (kind,) = given
        url = self.url
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"field {kind!r}: expected an http(s) URL, got {short_repr(url)}")
        if kind == "log" and (self.timeout is not None or self.retries is not None):
            raise ValueError("'timeout' and 'retries' apply to webhook and slack sinks only")
        return self


class UsePrice(_Strict):
    """``unpriced: {use_price: {input: …, output: …}}``: charge unknown models this price."""

    use_price: PriceSpec


class Policy(_Strict):
    """A whole policy file. Build it with :func:`load_policy` or :func:`load_policy_dict`.

    ``ledger_timeout`` is at most :data:`MAX_LEDGER_TIMEOUT` (60 s), ``reservation_ttl`` at most
    :data:`MAX_RESERVATION_TTL` (7 days); ``default_output_tokens`` and ``min_output_tokens`` are
    at most :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` (10**9).
    """

    ledger: str = "sqlite:///tb_ledger.db"
    timezone: str = "UTC"
    on_ledger_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    ledger_timeout: Timeout = 2.0
    default_output_tokens: CallTokens = 1024
    min_output_tokens: CallTokens = 16
    reservation_ttl: TTL = 600.0
    unpriced: Literal["deny", "count_tokens_only"] | UsePrice = "count_tokens_only"
    downgrade: dict[str, str] = Field(default_factory=dict)
    request: RequestCaps = Field(default_factory=RequestCaps)
    prices: dict[str, PriceSpec] = Field(default_factory=dict)
    budgets: list[BudgetSpec] = Field(default_factory=list)
    alerts: list[AlertSinkSpec] = Field(default_factory=lambda: [AlertSinkSpec(log="warning")])

    @field_validator("unpriced", mode="before")
    @classmethod
    def _unpriced(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("deny", "count_tokens_only"):
            raise ValueError(
                f"expected 'deny', 'count_tokens_only' or {{use_price: {{input: …, output: …}}}}, "
                f"got {short_repr(v)}"
            )
        return v

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str) -> str:
        from tb_plugins.ledger import BACKENDS

        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme not in BACKENDS:
            known = ", ".join(f"{s}://" for s in BACKENDS)
            raise ValueError(
                f"unknown ledger URL {short_repr(v)}; the scheme must be one of {known}"
            )
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {short_repr(v)} (use an IANA name such as 'Europe/Paris')"
            ) from None
        return v

    @field_validator("downgrade")
    @classmethod
    def _downgrade(cls, v: dict[str, str]) -> dict[str, str]:
        for src, dst in v.items():
            if not isinstance(dst, str) or not dst.strip():
                raise ValueError(f"downgrade target of {short_repr(src)} must be a model name")
            if src == dst:
                raise ValueError(f"model {short_repr(src)} downgrades to itself")
        return v

    @model_validator(mode="after")
    def _check(self) -> Policy:
        if self.default_output_tokens < 1:
            raise ValueError("field 'default_output_tokens' must be at least 1")
        if self.min_output_tokens < 1:
            raise ValueError("field 'min_output_tokens' must be at least 1")
        if self.min_output_tokens > self.default_output_tokens:
            raise ValueError("field 'min_output_tokens' exceeds 'default_output_tokens'")
        return self

    @property
    def tz(self) -> ZoneInfo:
        """The timezone calendar windows follow."""
        return ZoneInfo(self.timezone)

    def compiled_budgets(self) -> list[Budget]:
        """The budgets as the guard uses them (limits as integer vectors, windows parsed)."""
        return [compile_budget(i, spec) for i, spec in enumerate(self.budgets)]


def compile_budget(index: int, spec: BudgetSpec) -> Budget:
    """One policy entry as the guard uses it (limits as an integer vector, window parsed)."""
    limits = list(NO_LIMITS)
    parts = []
    for unit, i in UNIT_INDEX.items():
        value = getattr(spec, unit)
        if value is None:
            continue
        if unit == "usd":
            limits[i] = usd_to_nano(float(value))
            parts.append(f"${value:g}")
        else:
            limits[i] = int(value)
            parts.append(f"{int(value):,} {unit}")
    window = parse_window(spec.window)
    name = spec.name or f"{spec.scope} {' + '.join(parts)}/{window.spec}"
    return Budget(
        index=index,
        name=name,
        pattern=spec.scope,
        window=window,
        limits=(limits[0], limits[1], limits[2], limits[3], limits[4], limits[5]),
        alerts=tuple(spec.alerts),
        downgrade_at=spec.downgrade_at,
    )


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


def load_policy_dict(data: Any, *, source: str = "<policy>") -> Policy:
    """Validate a policy given as a dict (the same structure as the YAML file).

    Raises:
        ConfigError: the policy is malformed; the message names ``source``, entry and field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the policy must be a mapping of fields (ledger, budgets, …), "
            f"got {type(data).__name__}",
            source=source,
        )
    try:
        return Policy.model_validate(dict(data))
    except ValidationError as exc:
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
        raise ConfigError("\n".join(lines), source=source, location=first_loc) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML policy file.

    The file is refused before it is parsed if it is larger than :data:`MAX_POLICY_BYTES`
    (1 MiB), and while it is parsed if a mapping repeats a key (at any level: two
    ``budgets:`` sections would otherwise silently drop the first), if it nests deeper than
    :data:`MAX_YAML_DEPTH`, or if its aliases expand to more than :data:`MAX_YAML_NODES`
    values.

    Raises:
        ConfigError: the file is missing, too large, not UTF-8, not YAML, or malformed.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "budgets.yaml"
        >>> _ = path.write_text("budgets:\\n  - {scope: user:*, limit: 100k tokens/day}\\n")
        >>> load_policy(path).budgets[0].tokens
        100000
    """
    p = Path(path)
    return load_policy_dict(read_policy_yaml(p), source=str(p))
