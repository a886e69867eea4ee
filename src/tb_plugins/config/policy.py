"""The whole policy file: its fields, and loading it from YAML or a dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator

from tb_plugins.config.budgets import BudgetSpec, compile_budget
from tb_plugins.config.fields import (
    TTL,
    CallTokens,
    Refresh,
    Timeout,
    _Strict,
    config_error,
)
from tb_plugins.core.budgets import Budget
from tb_plugins.core.pricing import parse_price
from tb_plugins.core.quantities import short_repr
from tb_plugins.errors import ConfigError
from tb_plugins.policy_yaml import read_policy_yaml


class RequestCaps(_Strict):
    """Per-call caps (``request:``), each at most
    :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS` (10**9).

    ``on_too_long`` says what a conversation above ``max_input_tokens`` gets: ``refuse``
    (default: :class:`~tb_plugins.errors.RequestTooLarge`) or ``trim`` (its oldest messages are
    dropped until it fits, see :mod:`tb_plugins.core.trim`; refused if it cannot fit).
    """

    max_input_tokens: CallTokens | None = None
    max_output_tokens: CallTokens | None = None
    on_too_long: Literal["refuse", "trim"] = "refuse"


class EstimateSpec(_Strict):
    """``estimate:``: how a call's input side is estimated. ``input: exact`` counts every
    prompt with the tokenizer; ``input: bound_first`` starts from an upper bound that encodes
    nothing and counts exactly only where the count could change the decision (see
    :mod:`tb_plugins.counting.bound`)."""

    input: Literal["bound_first", "exact"] = "exact"


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

    ``mode: shadow`` decides every call and records what enforcement would have done, without
    enforcing the budgets or the ``request`` caps (a budget's own ``mode`` wins over this one).

    ``output_hold: p95 | p99`` holds that percentile of the model's recent outputs, capped by
    the call's output cap, instead of the cap itself (see :mod:`tb_plugins.engine.holds`).
    """

    ledger: str = "sqlite:///tb_ledger.db"
    timezone: str = "UTC"
    on_ledger_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    mode: Literal["enforce", "shadow"] = "enforce"
    ledger_timeout: Timeout = 2.0
    default_output_tokens: CallTokens = 1024
    min_output_tokens: CallTokens = 16
    output_hold: Literal["max_tokens", "p95", "p99"] = "max_tokens"
    reservation_ttl: TTL = 600.0
    override_refresh: Refresh = 5.0
    unpriced: Literal["deny", "count_tokens_only"] | UsePrice = "count_tokens_only"
    downgrade: dict[str, str] = Field(default_factory=dict)
    request: RequestCaps = Field(default_factory=RequestCaps)
    estimate: EstimateSpec = Field(default_factory=EstimateSpec)
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
        budgets = [compile_budget(i, spec) for i, spec in enumerate(self.budgets)]
        if self.mode == "shadow":  # the default of every budget that sets no mode of its own
            budgets = [
                dataclasses.replace(b, shadow=True) if spec.mode is None else b
                for b, spec in zip(budgets, self.budgets, strict=True)
            ]
        return budgets


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
        raise config_error(exc, data, source) from None


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
