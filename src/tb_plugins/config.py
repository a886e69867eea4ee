"""The policy file (``budgets.yaml``): who may spend how much, per window.

The file is validated whole; a bad file is refused with a :class:`~tb_plugins.errors.ConfigError`
that names the file, the entry and the field::

    budgets.yaml: budgets[2] (scope 'user:*'): field 'window': unknown window 'fortnight' …

Quantities are readable: ``2_000_000``, ``"2M"``, ``"200k"``, ``"$40"``. Each budget may also be
written in one line: ``limit: 200k tokens/day`` or ``limit: $5/month``.

Example:
    >>> policy = load_policy_dict({"budgets": [{"scope": "team:search", "limit": "2M tokens/day"}]})
    >>> policy.budgets[0].tokens, policy.budgets[0].window
    (2000000, 'day')
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
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

from tb_plugins.core.usage import NO_LIMITS, UNIT_INDEX, Limits, usd_to_nano
from tb_plugins.core.windows import Window, parse_duration, parse_window
from tb_plugins.errors import ConfigError

__all__ = [
    "KNOWN_KINDS",
    "AlertSinkSpec",
    "Budget",
    "BudgetSpec",
    "Policy",
    "PriceSpec",
    "RequestCaps",
    "load_policy",
    "load_policy_dict",
    "parse_quantity",
    "parse_usd",
]

KNOWN_KINDS = (
    "global",
    "org",
    "team",
    "user",
    "key",
    "end_user",
    "feature",
    "chain",
    "agent",
    "run",
    "session",
)
_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmbg])?$")


def parse_quantity(value: Any) -> int:
    """A non-negative integer from ``1000``, ``"2_000_000"``, ``"2,000"``, ``"200k"``, ``"1.5M"``.

    Raises:
        ValueError: not a readable quantity.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number of tokens, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        s = value.strip().lower().replace("_", "").replace(",", "")
        m = _QUANTITY.match(s)
        if not m:
            raise ValueError(f"expected a number such as 200000, '200k' or '2M', got {value!r}")
        n = round(float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1))
    else:
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    if n < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return n


def parse_usd(value: Any) -> float:
    """Dollars from ``40``, ``40.5``, ``"$40"``, ``"$1.5k"``.

    Raises:
        ValueError: not a readable amount of dollars.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected dollars, got {value!r}")
    if isinstance(value, int | float):
        usd = float(value)
    elif isinstance(value, str):
        s = value.strip().lower().replace("_", "").replace(",", "").lstrip("$").strip()
        m = _QUANTITY.match(s)
        if not m:
            raise ValueError(f"expected dollars such as 40 or '$40', got {value!r}")
        usd = float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1)
    else:
        raise ValueError(f"expected dollars, got {type(value).__name__} {value!r}")
    if usd < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return usd


def _duration(value: Any) -> float:
    return parse_duration(value)


Quantity = Annotated[int, BeforeValidator(parse_quantity)]
Dollars = Annotated[float, BeforeValidator(parse_usd)]
Duration = Annotated[float, BeforeValidator(_duration)]

_ONE_LINE = re.compile(
    r"^\s*(?P<amount>\$?[\d_.,]+(?:\s*[kmbgKMBG](?![a-z]))?)\s*(?P<unit>[a-z_]+)?\s*/\s*(?P<window>\S+)\s*$"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Strict):
    """One entry of ``budgets:`` as written in the file."""

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
    downgrade_at: float | None = None

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        v = v.strip()
        if v == "global":
            return v
        kind, sep, name = v.partition(":")
        if not sep or not name:
            raise ValueError(f"a scope is 'global' or 'kind:name' (e.g. 'team:search'), got {v!r}")
        if kind not in KNOWN_KINDS:
            raise ValueError(
                f"unknown scope kind {kind!r} in {v!r}; known: {', '.join(KNOWN_KINDS)}"
            )
        return v

    @field_validator("alerts")
    @classmethod
    def _alerts(cls, v: list[float]) -> list[float]:
        for t in v:
            if not 0 < t <= 1:
                raise ValueError(f"alert thresholds are fractions in (0, 1], got {t!r}")
        return sorted(set(v))

    @field_validator("downgrade_at")
    @classmethod
    def _downgrade_at(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"downgrade_at is a fraction in (0, 1], got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _expand_limit(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("limit") is None:
            return data
        text = data["limit"]
        if not isinstance(text, str):
            raise ValueError(
                f"field 'limit': expected text such as '200k tokens/day', got {text!r}"
            )
        m = _ONE_LINE.match(text)
        if not m:
            raise ValueError(
                f"field 'limit': cannot read {text!r}; write e.g. '200k tokens/day' or '$5/month'"
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
        out[unit] = amount
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
    """Per-call caps (``request:``)."""

    max_input_tokens: Quantity | None = None
    max_output_tokens: Quantity | None = None


class PriceSpec(_Strict):
    """A price override: USD per token, written as ``"$2.50/1M"`` or a number per token."""

    input: float
    output: float
    cached_input: float | None = None

    @field_validator("input", "output", "cached_input", mode="before")
    @classmethod
    def _price(cls, v: Any) -> Any:
        if v is None:
            return v
        from tb_plugins.core.pricing import parse_price

        return parse_price(v)


class AlertSinkSpec(_Strict):
    """One entry of ``alerts:``: ``{log: warning}`` or ``{webhook: http://…}``."""

    log: Literal["debug", "info", "warning", "error", "critical"] | None = None
    webhook: str | None = None

    @model_validator(mode="after")
    def _one(self) -> AlertSinkSpec:
        if (self.log is None) == (self.webhook is None):
            raise ValueError("an alert sink is exactly one of 'log: <level>' or 'webhook: <url>'")
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise ValueError(f"field 'webhook': expected an http(s) URL, got {self.webhook!r}")
        return self


class UsePrice(_Strict):
    """``unpriced: {use_price: {input: …, output: …}}``: charge unknown models this price."""

    use_price: PriceSpec


class Policy(_Strict):
    """A whole policy file. Build it with :func:`load_policy` or :func:`load_policy_dict`."""

    ledger: str = "sqlite:///tb_ledger.db"
    timezone: str = "UTC"
    on_ledger_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    ledger_timeout: Duration = 2.0
    default_output_tokens: Quantity = 1024
    min_output_tokens: Quantity = 16
    reservation_ttl: Duration = 600.0
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
                f"got {v!r}"
            )
        return v

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str) -> str:
        from tb_plugins.ledger import BACKENDS

        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme not in BACKENDS:
            known = ", ".join(f"{s}://" for s in BACKENDS)
            raise ValueError(f"unknown ledger URL {v!r}; the scheme must be one of {known}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {v!r} (use an IANA name such as 'Europe/Paris')"
            ) from None
        return v

    @field_validator("downgrade")
    @classmethod
    def _downgrade(cls, v: dict[str, str]) -> dict[str, str]:
        for src, dst in v.items():
            if not isinstance(dst, str) or not dst.strip():
                raise ValueError(f"downgrade target of {src!r} must be a model name")
            if src == dst:
                raise ValueError(f"model {src!r} downgrades to itself")
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
        return [Budget.from_spec(i, spec) for i, spec in enumerate(self.budgets)]


@dataclass(frozen=True)
class Budget:
    """A budget ready for the guard: a scope pattern, a window, integer limits."""

    index: int
    name: str
    pattern: str
    window: Window
    limits: Limits
    alerts: tuple[float, ...]
    downgrade_at: float | None

    @classmethod
    def from_spec(cls, index: int, spec: BudgetSpec) -> Budget:
        """Compile one policy entry."""
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
        return cls(
            index=index,
            name=name,
            pattern=spec.scope,
            window=window,
            limits=(limits[0], limits[1], limits[2], limits[3], limits[4], limits[5]),
            alerts=tuple(spec.alerts),
            downgrade_at=spec.downgrade_at,
        )

    @property
    def is_pattern(self) -> bool:
        """True when the scope is a pattern such as ``user:*`` (one budget per match)."""
        return any(c in self.pattern for c in "*?[")

    def matches(self, scope: str) -> bool:
        """Whether this budget applies to a concrete scope."""
        if not self.is_pattern:
            return scope == self.pattern
        return fnmatch.fnmatchcase(scope, self.pattern)


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
                label += f" (scope {node['scope']!r})"
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

    Raises:
        ConfigError: the file is missing, not YAML, or malformed.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{p}: cannot read the policy file: {exc.strerror}", source=str(p)
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}", source=str(p)) from None
    if data is None:
        raise ConfigError(f"{p}: the policy file is empty", source=str(p))
    return load_policy_dict(data, source=str(p))
