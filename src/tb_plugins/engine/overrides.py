"""Runtime budget overrides: changes to the policy's budgets made while guards run, kept in the
ledger and applied by every guard that shares it, with no restart.

An override is a *change* appended to the ledger's override log (``tb budgets set`` /
``guard.set_budget``): set a limit for one scope (or pattern) and window, or unset it. The log
is never rewritten, so it is also the audit trail (``tb budgets history``). Each guard reads
the changes it has not seen every ``override_refresh`` seconds (default 5) on its call path,
folds them into the overrides in force, and compiles those into budgets beside the file's.

How an override applies to a scope's line in one window, unit by unit (see
:meth:`~tb_plugins.engine.planning.LinePlanner`): when an override limits that unit, it
replaces every budget of the file for that unit (an override may raise a limit as well as
lower it), and an override on the concrete scope (``team:search``) wins over one on a pattern
(``team:*``). A file budget an override replaces no longer fires its alerts for that scope;
the override takes everything but the limits (:data:`INHERITED`: alerts, ``downgrade_at``,
shadow mode, pacing, priorities, waiting) from the file budget with the same scope and window,
else from the first file budget of that window that matches its scope. A limit of
``0`` suspends the scope: every call is refused.

Every field is checked where it enters, with the policy file's messages: the limit as in the
file (``3M tokens/day``, ``$5/month``; at most 10**15 tokens or $10**9), the scope (a known
kind, no control character), ``until`` in the future and at most :data:`MAX_OVERRIDE_SPAN`
ahead, ``reason`` and ``actor`` printable and at most :data:`MAX_REASON` and
:data:`MAX_ACTOR` characters. A bad override raises :class:`~tb_plugins.errors.ConfigError` and
writes nothing.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import math
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tb_plugins.core.budgets import Budget
from tb_plugins.core.scopes import escape_text, normalize_scope
from tb_plugins.core.windows import parse_window
from tb_plugins.errors import ConfigError

if TYPE_CHECKING:
    from tb_plugins.config import BudgetSpec

__all__ = [
    "Action",
    "MAX_ACTOR",
    "MAX_OVERRIDE_SPAN",
    "MAX_REASON",
    "Override",
    "OverrideLog",
    "SUSPEND",
    "compile_overrides",
    "new_override",
]

logger = logging.getLogger("tb_plugins")

MAX_REASON = 500
"""Longest ``reason`` of an override, in characters."""
MAX_ACTOR = 200
"""Longest ``actor`` (who made the change), in characters."""
MAX_OVERRIDE_SPAN = 366 * 86400.0
"""Furthest ``until`` of an override: 366 days from now."""
SUSPEND = "0"
"""The limit that suspends a scope: every call refused."""
INHERITED = ("alerts", "downgrade_at", "forecast_alert", "shadow", "pace", "stop_at", "wait")
"""What an override keeps of the file budget it stands in for: everything but the limits."""
_MAX_CHANGES = 100_000  # changes a guard keeps in memory (the ledger keeps them all)

Action = Literal["set", "unset"]


@dataclass(frozen=True)
class Override:
    """One change of the runtime overrides, as the ledger's log keeps it.

    Attributes:
        action: ``set`` or ``unset``.
        scope: the scope or pattern it changes, e.g. ``team:search`` or ``user:*``.
        window: the window (canonical spec, e.g. ``day``).
        limit: the limit as written (``3M tokens/day``, ``$5/month``, ``0``); None for unset.
        until: when a set stops applying (epoch seconds), or None.
        reason: why, as given.
        actor: who (``user@host`` by default).
        ts: when the change was made (epoch seconds, the guard's clock).
        version: its place in the log (0 until stored).
    """

    action: Action
    scope: str
    window: str
    limit: str | None = None
    until: float | None = None
    reason: str | None = None
    actor: str = ""
    ts: float = 0.0
    version: int = 0

    @property
    def key(self) -> tuple[str, str]:
        """What a change replaces: its scope and window."""
        return (self.scope, self.window)

    @property
    def suspends(self) -> bool:
        """Whether this override suspends its scope (limit ``0``)."""
        return self.limit == SUSPEND

    def live(self, now: float) -> bool:
        """Whether a set applies at ``now`` (not past its ``until``)."""
        return self.action == "set" and (self.until is None or now < self.until)

    def to_json(self) -> str:
        """The body the ledger stores (no version: the ledger gives it)."""
        data = dataclasses.asdict(self)
        data.pop("version")
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, version: int, body: str) -> Override:
        """A change read back from the ledger; raises ValueError for a body it cannot be."""
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        fields = {f.name for f in dataclasses.fields(cls)} - {"version"}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        change = cls(**data, version=version)
        _check(change)
        return change

    def to_dict(self) -> dict[str, Any]:
        """Every field, for JSON output."""
        return dataclasses.asdict(self)


def default_actor() -> str:
    """``user@host`` of this process (no network: the local host name)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:MAX_ACTOR]


def new_override(
    action: Action,
    scope: str,
    limit: str | int | None = None,
    *,
    window: str | None = None,
    until: float | None = None,
    reason: str | None = None,
    actor: str | None = None,
    now: float,
) -> Override:
    """A checked change, ready to append to the ledger.

    Raises:
        ConfigError: a bad scope, limit, window, ``until``, ``reason`` or ``actor``; the
            message names the field, as for a bad policy file.
    """
    source = f"override of {escape_text(str(scope))!r}"
    try:
        scope = normalize_scope(scope)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: field 'scope': {exc}", source=source) from None
    if action == "set":
        if isinstance(limit, int) and not isinstance(limit, bool):
            limit = str(limit)
        if not isinstance(limit, str):
            raise ConfigError(
                f"{source}: field 'limit': expected text such as '3M tokens/day', '$5/month' "
                f"or '0', got {limit!r}",
                source=source,
            )
        limit = " ".join(limit.split())
        if limit == SUSPEND:
            window = _window(window or "total", source)
        else:
            spec = _spec(scope, limit, window, source)
            window = spec.window
    elif window is not None:
        window = _window(window, source)
    change = Override(
        action=action,
        scope=scope,
        window=window or "",
        limit=limit if isinstance(limit, str) and action == "set" else None,
        until=until,
        reason=reason,
        actor=default_actor() if actor is None else actor,
        ts=now,
    )
    try:
        _check(change, now=now)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}", source=source) from None
    return change


def _window(text: str, source: str) -> str:
    try:
        return parse_window(text).spec
    except ValueError as exc:
        raise ConfigError(f"{source}: field 'window': {exc}", source=source) from None


def _spec(scope: str, limit: str, window: str | None, source: str) -> BudgetSpec:
    from tb_plugins.config import BudgetSpec  # pydantic: with the first override, not at import
    from tb_plugins.config.fields import config_error

    data: dict[str, Any] = {"scope": scope, "limit": limit}
    if window:
        data["window"] = window
    try:
        return BudgetSpec.model_validate(data)
    except Exception as exc:
        if not hasattr(exc, "errors"):
            raise ConfigError(f"{source}: {exc}", source=source) from None
        err = config_error(exc, data, source)  # type: ignore[arg-type]
        raise ConfigError(str(err).replace(": top level: ", ": "), source=source) from None


def _check(change: Override, now: float | None = None) -> None:
    """Refuse a change no guard could apply; ``now`` given: a new one, so ``until`` must be
    ahead."""
    if change.action not in ("set", "unset"):
        raise ValueError(f"field 'action': expected 'set' or 'unset', got {change.action!r}")
    texts = (("reason", change.reason, MAX_REASON), ("actor", change.actor, MAX_ACTOR))
    for name, text, longest in texts:
        if text is None:
            continue
        if not isinstance(text, str) or escape_text(text) != text or len(text) > longest:
            raise ValueError(
                f"field {name!r}: expected printable text of at most {longest} characters"
            )
    until = change.until
    if until is not None:
        if (
            isinstance(until, bool)
            or not isinstance(until, int | float)
            or not math.isfinite(until)
        ):
            raise ValueError(f"field 'until': expected a time, got {until!r}")
        if now is not None and not now < until <= now + MAX_OVERRIDE_SPAN:
            raise ValueError("field 'until': must be in the future and at most 366 days ahead")
    if not isinstance(change.ts, int | float) or not math.isfinite(change.ts):
        raise ValueError(f"field 'ts': expected a time, got {change.ts!r}")


class OverrideLog:
    """The changes a guard has read from the ledger, and the overrides they leave in force."""

    def __init__(self) -> None:
        self.version = 0
        self.changes: list[Override] = []
        self.current: dict[tuple[str, str], Override] = {}

    def add(self, rows: Iterable[tuple[int, str]]) -> bool:
        """Fold in the changes read from the ledger (``(version, body)``, oldest first);
        True if any was new. A body no guard could have written is logged and skipped."""
        changed = False
        for version, body in rows:
            if version <= self.version:
                continue
            self.version = version
            try:
                change = Override.from_json(version, body)
            except (ValueError, TypeError) as exc:
                logger.error(
                    "tb_plugins: override %d in the ledger is unreadable (%s)", version, exc
                )
                continue
            self.changes.append(change)
            if len(self.changes) > _MAX_CHANGES:
                del self.changes[: len(self.changes) - _MAX_CHANGES]
            if change.action == "set":
                self.current[change.key] = change
            elif change.window:
                self.current.pop(change.key, None)
            else:  # unset every window of the scope
                for key in [k for k in self.current if k[0] == change.scope]:
                    del self.current[key]
            changed = True
        return changed

    def live(self, now: float) -> list[Override]:
        """The overrides in force at ``now``, oldest change first."""
        return sorted((o for o in self.current.values() if o.live(now)), key=lambda o: o.version)

    def next_expiry(self, now: float) -> float:
        """When the next override in force expires (inf: none does)."""
        return min((o.until for o in self.live(now) if o.until is not None), default=math.inf)

    def history(self, scope: str | None = None) -> list[tuple[Override, Override | None]]:
        """Every change (of ``scope``), oldest first, with the override it replaced."""
        before: dict[tuple[str, str], Override] = {}
        out: list[tuple[Override, Override | None]] = []
        for change in self.changes:
            keys = [change.key] if change.window else [k for k in before if k[0] == change.scope]
            prior = before.get(change.key) if change.window else None
            if change.action == "set":
                before[change.key] = change
            else:
                if not change.window and keys:
                    prior = before[keys[0]]
                for k in keys:
                    before.pop(k, None)
            if scope is None or change.scope == scope:
                out.append((change, prior))
        return out


def compile_overrides(file_budgets: Sequence[Budget], live: Sequence[Override]) -> list[Budget]:
    """The budgets the guard plans with: the file's, then one per override in force (marked
    ``override=True``), taking :data:`INHERITED` from the file budget of the same scope and
    window, else from the first of that window whose pattern matches the scope."""
    from tb_plugins.config import BudgetSpec, compile_budget

    out = list(file_budgets)
    for i, o in enumerate(live):
        window = [b for b in file_budgets if b.window.spec == o.window]
        same = next((b for b in window if b.pattern == o.scope), None) or next(
            (b for b in window if b.matches(o.scope)), None
        )
        index = len(file_budgets) + i
        if o.suspends:
            spec = BudgetSpec(scope=o.scope, window=o.window, requests=0)
            budget = compile_budget(index, spec)
            budget = dataclasses.replace(budget, name=f"{o.scope} suspended (override)")
        else:
            spec = BudgetSpec.model_validate(
                {"scope": o.scope, "limit": o.limit, "window": o.window}
            )
            budget = compile_budget(index, spec)
            budget = dataclasses.replace(budget, name=f"{budget.name} (override)")
        kept = {f: getattr(same, f) for f in INHERITED} if same else {}
        out.append(dataclasses.replace(budget, override=True, **kept))
    return out
