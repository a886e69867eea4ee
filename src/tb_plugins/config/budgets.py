"""One entry of ``budgets:`` (written out or as ``limit: 200k tokens/day``) and the
:class:`~tb_plugins.core.budgets.Budget` the guard compiles it into.

Besides the ledger's units an entry may set the agent limits the guard keeps in memory
(:mod:`tb_plugins.engine.agents`): ``tool_calls`` (with ``tool: NAME`` to count one tool) on
``run:``, ``session:`` and ``agent:`` scopes, ``repeats`` and ``seconds`` on ``run:`` scopes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from tb_plugins.config.fields import (
    Dollars,
    Fraction,
    Quantity,
    _fraction,
    _no_bool,
    _Strict,
)
from tb_plugins.core.budgets import Budget
from tb_plugins.core.pacing import PRIORITIES
from tb_plugins.core.quantities import parse_quantity, parse_usd, short_repr
from tb_plugins.core.scopes import escape_text, normalize_scope
from tb_plugins.core.usage import NO_LIMITS, UNIT_INDEX, usd_to_nano
from tb_plugins.core.windows import parse_duration, parse_window

__all__ = ["AGENT_UNITS", "MAX_TOOL_NAME", "MAX_WAIT", "BudgetSpec", "compile_budget"]

_MAX_ONE_LINE = 200
AGENT_UNITS = ("tool_calls", "repeats", "seconds")
"""Limits kept in memory per process (:mod:`tb_plugins.engine.agents`), not in the ledger."""
MAX_TOOL_NAME = 256
"""Longest tool name a budget's ``tool`` may give."""
_ONE_LINE_UNITS = (*UNIT_INDEX, "tool_calls")
_RUN_ONLY = ("run:",)
_TOOL_SCOPES = ("run:", "session:", "agent:")
MAX_WAIT = 600.0
"""Longest ``on_exhausted: wait:<max>``: 10 minutes."""


def _seconds(value: Any) -> float:
    return parse_duration(value)


Seconds = Annotated[float, BeforeValidator(_seconds)]
"""A duration: ``90``, ``"90s"``, ``"10m"``, ``"1h30m"``; positive, at most 3650 days."""
_ONE_LINE = re.compile(
    r"^\s*(?P<amount>\$?[\d_.,]+(?:\s*[kmbgKMBG](?![a-z]))?)\s*(?P<unit>[a-z_]+)?\s*/\s*(?P<window>\S+)\s*$"
)


class BudgetSpec(_Strict):
    """One entry of ``budgets:`` as written in the file.

    ``scope`` goes through :func:`~tb_plugins.core.scopes.normalize_scope` (a known kind, no
    control character, at most :data:`~tb_plugins.core.scopes.MAX_SCOPE_LENGTH` characters).
    ``tokens``, ``input_tokens``, ``output_tokens``, ``requests`` and ``calls`` are at most
    :data:`~tb_plugins.core.usage.MAX_LIMIT` (10**15); ``usd`` is finite and at most
    :data:`~tb_plugins.core.usage.MAX_LIMIT_USD` ($1,000,000,000); a rolling window is at most
    :data:`~tb_plugins.core.windows.MAX_ROLLING` (366 days); ``alerts`` and ``downgrade_at`` are
    fractions in (0, 1].

    Agent limits, counted in memory (see :mod:`tb_plugins.engine.agents`): ``tool_calls``
    (at most 10**15; on ``run:``, ``session:`` and ``agent:`` scopes; over ``total`` or a
    calendar window, not a rolling one), ``tool`` (the one tool ``tool_calls`` counts; only
    with ``tool_calls`` and no other limit), ``repeats`` (2 to 10**15; ``run:`` scopes) and
    ``seconds`` (a duration; ``run:`` scopes). A budget of agent limits only may leave out
    ``window`` (it is ``total``); ``repeats`` and ``seconds`` count per run whatever the window.

    Dynamic limits (see :mod:`tb_plugins.core.pacing`): ``pace: even`` with ``burst`` (a
    fraction in [0, 1), default 0) on a calendar window (minute ... month); ``stop_at``, a
    fraction in (0, 1] per priority (``low``, ``normal``, ``high``, ``critical``);
    ``on_exhausted``: ``deny`` (default) or ``wait:<max>`` (at most :data:`MAX_WAIT`) on a
    minute, hour, rolling or paced window (see :mod:`tb_plugins.engine.throttle`).
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
    forecast_alert: bool = True
    mode: Literal["enforce", "shadow"] | None = None  # None: the policy's mode
    tool_calls: Quantity | None = None
    tool: str | None = None
    repeats: Quantity | None = None
    seconds: Seconds | None = None
    pace: Literal["even"] | None = None
    burst: float | None = None
    stop_at: dict[str, float] | None = None
    on_exhausted: str | None = None  # None: deny

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

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip() or escape_text(v) != v or len(v) > MAX_TOOL_NAME:
            raise ValueError(
                f"expected a tool's name (printable text, 1 to {MAX_TOOL_NAME} characters), "
                f"got {short_repr(v)}"
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

    @field_validator("burst", mode="before")
    @classmethod
    def _burst(cls, v: Any) -> Any:
        _no_bool(v)
        if isinstance(v, int | float) and not 0 <= v < 1:
            raise ValueError(f"burst is a fraction in [0, 1), got {v!r}")
        return v

    @field_validator("stop_at", mode="before")
    @classmethod
    def _stop_at(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            for priority, frac in v.items():
                if priority not in PRIORITIES:
                    raise ValueError(
                        f"stop_at: unknown priority {priority!r}; use {', '.join(PRIORITIES)}"
                    )
                _no_bool(frac)
                if isinstance(frac, int | float):
                    _fraction(f"stop_at[{priority!r}]", frac)
        return v

    @field_validator("on_exhausted")
    @classmethod
    def _on_exhausted(cls, v: str | None) -> str | None:
        wait_seconds(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _expand_limit(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if data.get("limit") is None:
            if not data.get("window") and _agent_only(data):
                return {**data, "window": "total"}  # per run or per process: no window needed
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
        if unit is None or unit not in _ONE_LINE_UNITS:
            raise ValueError(
                f"field 'limit': unknown unit {unit!r} in {text!r}; "
                f"use one of {', '.join(_ONE_LINE_UNITS)}"
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
            window = parse_window(self.window)
        except ValueError as exc:
            raise ValueError(f"field 'window': {exc}") from None
        if self.tool is not None and self.tool_calls is None:
            raise ValueError(
                "field 'tool': it names the one tool a 'tool_calls' limit counts; "
                "set tool_calls too"
            )
        if all(getattr(self, u) is None for u in (*UNIT_INDEX, *AGENT_UNITS)):
            raise ValueError(
                "no limit given: set at least one of tokens, input_tokens, output_tokens, usd, "
                "requests, calls, tool_calls, repeats, seconds"
            )
        if self.calls is not None and not self.scope.startswith(("run:", "session:")):
            raise ValueError(
                "field 'calls': the calls limit applies to 'run:' and 'session:' scopes"
            )
        self._check_agent_limits(window.kind)
        self._check_dynamic(window.kind)
        return self

    def _check_dynamic(self, window_kind: str) -> None:
        if self.burst is not None and self.pace is None:
            raise ValueError("field 'burst': it is the head start of a paced budget; set pace")
        if self.pace is not None and window_kind != "calendar":
            raise ValueError(
                f"field 'pace': pacing spreads a calendar window (minute ... month); "
                f"{self.window!r} has no start to pace from"
            )
        if (self.pace is not None or self.stop_at) and all(
            getattr(self, u) is None for u in UNIT_INDEX
        ):
            raise ValueError("fields 'pace' and 'stop_at' shape a ledger limit (tokens, usd ...)")
        if wait_seconds(self.on_exhausted) is not None:
            spec = parse_window(self.window).spec
            short = window_kind == "rolling" or spec in ("minute", "hour") or self.pace
            if not short or all(getattr(self, u) is None for u in UNIT_INDEX):
                raise ValueError(
                    f"field 'on_exhausted': waiting suits a ledger limit (tokens, usd ...) on a "
                    f"minute, hour, rolling or paced window, not {self.window!r}"
                )

    def _check_agent_limits(self, window_kind: str) -> None:
        for unit in ("repeats", "seconds"):
            if getattr(self, unit) is not None and not self.scope.startswith(_RUN_ONLY):
                raise ValueError(
                    f"field {unit!r}: {unit} counts within one run; it applies to 'run:' "
                    f"scopes (e.g. 'run:*'), not to {self.scope!r}"
                )
        if self.repeats is not None and self.repeats < 2:
            raise ValueError(
                f"field 'repeats': must be at least 2 (the N-th identical tool call ends the "
                f"run, so {self.repeats} would end it at the first), got {self.repeats}"
            )
        if self.tool_calls is not None:
            if not self.scope.startswith(_TOOL_SCOPES):
                raise ValueError(
                    f"field 'tool_calls': the tool_calls limit applies to 'run:', 'session:' and "
                    f"'agent:' scopes, not to {self.scope!r}"
                )
            if window_kind == "rolling":
                raise ValueError(
                    f"field 'window': tool_calls are counted in memory over 'total' or a calendar "
                    f"window (minute ... month), not {self.window!r}"
                )
        if self.tool is not None:
            units = (*UNIT_INDEX, "repeats", "seconds")
            others = [u for u in units if getattr(self, u) is not None]
            if others:
                raise ValueError(
                    f"field 'tool': a budget for one tool limits tool_calls only; put "
                    f"{', '.join(others)} in an entry of its own"
                )


def compile_budget(index: int, spec: BudgetSpec) -> Budget:
    """One policy entry as the guard uses it (limits as an integer vector, window parsed)."""
    limits = list(NO_LIMITS)
    parts: list[str] = []
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
    if spec.tool_calls is not None:
        parts.append(f"{spec.tool_calls:,} tool_calls" + (f" of {spec.tool}" if spec.tool else ""))
    if spec.repeats is not None:
        parts.append(f"{spec.repeats:,} repeats")
    if spec.seconds is not None:
        parts.append(f"{spec.seconds:g} seconds")
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
        forecast_alert=spec.forecast_alert,
        tool_calls=spec.tool_calls,
        tool=spec.tool,
        repeats=spec.repeats,
        seconds=spec.seconds,
        shadow=spec.mode == "shadow",
        pace=None if spec.pace is None else (spec.burst or 0.0),
        stop_at=tuple(sorted((spec.stop_at or {}).items())),
        wait=wait_seconds(spec.on_exhausted),
    )


def wait_seconds(on_exhausted: str | None) -> float | None:
    """The seconds ``on_exhausted: wait:<max>`` may wait; None for ``deny`` (or unset).

    Raises:
        ValueError: neither ``deny`` nor ``wait:<duration>`` of at most :data:`MAX_WAIT`.
    """
    if on_exhausted is None or on_exhausted == "deny":
        return None
    head, sep, duration = on_exhausted.partition(":")
    if head.strip() != "wait" or not sep:
        raise ValueError(
            f"expected 'deny' or 'wait:<max>' such as 'wait:30s', got {short_repr(on_exhausted)}"
        )
    try:
        return parse_duration(duration, maximum=MAX_WAIT)
    except ValueError as exc:
        raise ValueError(f"{short_repr(on_exhausted)}: {exc}") from None


def _agent_only(data: Mapping[str, Any]) -> bool:
    """Whether an entry sets agent limits and no ledger unit."""
    return any(data.get(u) is not None for u in (*AGENT_UNITS, "tool")) and all(
        data.get(u) is None for u in UNIT_INDEX
    )
