"""Which ledger lines a call charges: its scope path, and one line per scope and window with
the tightest limit of each unit over the budgets that match.

Planning is pure, but it runs on every call, so each step is cached: the validated path of a
tuple of scopes, the templates (key, limits, budgets) of a scope, the window slot of an
instant, and the lines of a path until one of its windows moves on.

A line whose budgets pace spend or set ``stop_at`` fractions is then shaped for each call
(its limits lowered to what that call may use at that instant: :mod:`tb_plugins.core.pacing`),
never cached; a policy without such budgets skips the step.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from tb_plugins.core.ladder import lift
from tb_plugins.core.pacing import effective
from tb_plugins.core.policy import LinePlan
from tb_plugins.core.scopes import normalize_scope
from tb_plugins.core.usage import UNITS, Limits
from tb_plugins.core.windows import Slot
from tb_plugins.ledger.base import Line, line_key

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget

__all__ = ["RUN_IDLE_EXPIRY", "LinePlanner", "LineTemplate"]

# A run or session is over once it stops calling: its never-resetting counters may be pruned
# this long after its last charge, so per-run budgets do not grow the ledger forever.
RUN_IDLE_EXPIRY = 7 * 86400.0
_PATH_MEMORY = 4096  # validated scope paths remembered (forgotten all at once past this)
_IDLE_EXPIRY_STEP = 60.0  # the idle expiry of run:/session: lines moves on in steps this long
_EPHEMERAL_KINDS = ("run:", "session:")


@dataclass(frozen=True, slots=True)
class LineTemplate:
    """What a line of one scope and window needs besides the time: key, limits, budgets."""

    key: str
    window: str
    limits: Limits
    names: tuple[str | None, ...]
    budgets: tuple[Budget, ...]
    full: Limits | None = None  # with budgets in mode: shadow, every limit in force
    full_names: tuple[str | None, ...] = ()


class _LRU(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            if len(self) > self.size:
                self.popitem(last=False)
        return value

    def get_fresh(self, key: Any, now: float) -> Any:
        """The value stored with a validity range ``(lo, hi, value)`` if ``now`` is in it."""
        with self.lock:
            entry = self.get(key)
            if entry is None or not entry[0] <= now < entry[1]:
                return None
            self.move_to_end(key)
            return entry[2]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self[key] = value
            self.move_to_end(key)
            if len(self) > self.size:
                self.popitem(last=False)


class LinePlanner:
    """Scope paths and ledger lines for a policy's budgets.

    Args:
        budgets: the compiled budgets of the policy.
        tz: the timezone calendar windows follow.
    """

    def __init__(self, budgets: Sequence[Budget], tz: ZoneInfo) -> None:
        self.budgets = list(budgets)
        self.tz = tz
        self.shadow = any(b.shadow for b in self.budgets)
        """Whether some budget is in ``mode: shadow`` (its lines carry a ``shadow`` view)."""
        self.shapes = any(b.shapes for b in self.budgets)
        """Whether some budget is paced or has ``stop_at`` (lines are shaped per call)."""
        self._scope_templates = _LRU(16384)
        self._slots: dict[str, tuple[Slot, float, float]] = {}
        self._path_lines = _LRU(4096)
        self._paths: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self._shaped: dict[tuple[int, str], tuple[Any, float, float, Any]] = {}

    def scope_path(self, scopes: Iterable[str]) -> tuple[str, ...]:
        """``global`` plus the given scopes, in order, without repeats.

        Each scope is checked by :func:`~tb_plugins.core.scopes.normalize_scope`: whitespace
        around it is dropped; an unknown kind, a control character or an over-long name is
        refused.

        Raises:
            ValueError: a scope is not ``kind:name`` of a known kind, or not printable text.
        """
        given = scopes if type(scopes) is tuple else tuple(scopes)
        try:
            known: tuple[str, ...] | None = self._paths.get(given)
        except TypeError:  # something unhashable: not a scope name
            return _scope_path(given)
        if known is None:
            known = self._paths[given] = _scope_path(given)
            if len(self._paths) > _PATH_MEMORY:
                self._paths.clear()
        return known

    def lines(
        self,
        path: Sequence[str],
        now: float,
        *,
        cache: bool = True,
        priority: str | None = None,
    ) -> tuple[LinePlan, ...]:
        """The lines a call on ``path`` charges now (a call's path is reused while none of
        its windows moves on); with ``priority``, shaped for a call of that priority (pacing
        and ``stop_at`` applied; without it, the budgets' full limits, as status shows them)."""
        if cache:
            lines: tuple[LinePlan, ...] | None = self._path_lines.get_fresh(path, now)
            if lines is not None:
                if priority is not None and self.shapes:
                    return self.shaped(lines, now, priority)
                return lines
        lo, hi = float("-inf"), float("inf")
        out: list[LinePlan] = []
        for scope in path:
            ephemeral = scope.startswith(_EPHEMERAL_KINDS)
            for t in self._templates(scope):
                slot, start, end = self.slot(t.budgets[0], now)
                lo, hi = max(lo, start), min(hi, end)
                expires_at = slot.expires_at
                if expires_at is None and ephemeral:
                    expires_at = now + RUN_IDLE_EXPIRY
                    hi = min(hi, now + _IDLE_EXPIRY_STEP)
                line = Line(
                    key=t.key,
                    scope=scope,
                    window=t.window,
                    bucket=slot.bucket,
                    span=slot.span,
                    width=slot.width,
                    limits=t.limits,
                    expires_at=expires_at,
                )
                lp = LinePlan.of(line, t.budgets, t.names, slot.resets_at)
                if t.full is not None:
                    full = replace(line, limits=t.full)
                    view = LinePlan.of(full, t.budgets, t.full_names, slot.resets_at)
                    lp = replace(lp, shadow=view)
                out.append(lp)
        lines = tuple(out)
        if cache:
            self._path_lines.put(path, (lo, hi, lines))
        if priority is not None and self.shapes:
            return self.shaped(lines, now, priority)
        return lines

    def shaped(
        self, lines: tuple[LinePlan, ...], now: float, priority: str
    ) -> tuple[LinePlan, ...]:
        """``lines`` with each paced or ``stop_at`` limit lowered to what a call of
        ``priority`` may bring spend up to at ``now``.

        A paced allowance only grows, so it is worked out at the start of ``now``'s whole
        second and reused through that second (it admits a call at most a second late, never
        early); a ``stop_at`` share alone is reused for as long as ``lines`` are."""
        key = (id(lines), priority)
        entry = self._shaped.get(key)
        if entry is not None and entry[0] is lines and entry[1] <= now < entry[2]:
            return entry[3]  # type: ignore[no-any-return]
        paced = any(b.pace is not None for lp in lines if lp.shapes for b in lp.budgets)
        lo, hi = (math.floor(now), math.floor(now) + 1.0) if paced else (-math.inf, math.inf)
        at = lo if paced else now
        out = tuple([self._shape(lp, at, priority) if lp.shapes else lp for lp in lines])
        if len(self._shaped) > _PATH_MEMORY:
            self._shaped.clear()
        self._shaped[key] = (lines, lo, hi, out)
        return out

    def _shape(self, lp: LinePlan, now: float, priority: str, *, full: bool = False) -> LinePlan:
        slot = self.slot(lp.budgets[0], now)[0]
        length = 0.0 if slot.resets_at is None or slot.width else slot.resets_at - slot.start
        budgets = lp.budgets if full else [b for b in lp.budgets if not b.shadow]
        limits, allow = effective(
            lp.line.limits, budgets, priority, now=now, start=slot.start, length=length
        )
        shadow = lp.shadow
        if shadow is not None:
            shadow = self._shape(shadow, now, priority, full=True)
        if allow is None and shadow is lp.shadow:
            return lp
        line = lp.line if allow is None else replace(lp.line, limits=limits)  # type: ignore[arg-type]
        return replace(lp, line=line, allowance=allow, shadow=shadow)

    def settle_line(self, lp: LinePlan, now: float) -> Line:
        """The line a settle at ``now`` charges: the one reserved, except that a rolling
        window's spend lands in the bucket of ``now`` (so a call longer than the window is
        still counted in it)."""
        line = lp.line
        if not line.width or not lp.budgets:
            return line
        slot = self.slot(lp.budgets[0], now)[0]
        if slot.bucket == line.bucket:
            return line
        return replace(line, bucket=slot.bucket, span=slot.span, expires_at=slot.expires_at)

    def status_lines(
        self, scope: str | None, known: Iterable[str], now: float
    ) -> tuple[LinePlan, ...]:
        """The lines ``status`` reads: of ``scope``, or of every concrete budget scope and
        every scope in ``known`` (the ledger's) that a budget matches."""
        if scope is not None:
            return self.lines([scope], now, cache=False)
        scopes = dict.fromkeys(b.pattern for b in self.budgets if not b.is_pattern)
        for s in known:
            if s not in scopes and any(b.matches(s) for b in self.budgets):
                scopes[s] = None
        return self.lines(list(scopes), now, cache=False)

    def slot(self, budget: Budget, now: float) -> tuple[Slot, float, float]:
        """The window slot for ``now`` and the range of instants it holds for (reused until
        the bucket changes)."""
        cached = self._slots.get(budget.window.spec)
        if cached is not None and cached[1] <= now < cached[2]:
            return cached
        slot = budget.window.slot(now, self.tz)
        if slot.width:  # rolling: the bucket moves every `width` seconds
            valid = (float(slot.bucket), float(slot.bucket + slot.width))
        elif slot.resets_at is None:  # total
            valid = (float("-inf"), float("inf"))
        else:
            valid = (slot.start, slot.resets_at)
        entry = self._slots[budget.window.spec] = (slot, *valid)
        return entry

    def templates(self, scope: str) -> tuple[LineTemplate, ...]:
        """What the lines of ``scope`` are made of, one per window: key, limits, budgets."""
        return self._templates(scope)

    def _templates(self, scope: str) -> tuple[LineTemplate, ...]:
        """Per scope: one entry per window with its storage key and merged limits (cached)."""

        def build() -> tuple[LineTemplate, ...]:
            by_window: dict[str, list[Budget]] = {}
            for b in self.budgets:
                if b.matches(scope):
                    by_window.setdefault(b.window.spec, []).append(b)
            out = []
            for spec, matching in by_window.items():
                budgets = _overridden(matching, scope)
                merged, names = _merge([b for b in budgets if not b.shadow])
                full, full_names = None, names
                if any(b.shadow for b in budgets):  # reserved with the shadow limits lifted
                    full, full_names = _merge(budgets)
                    merged = lift(merged, full)
                key = line_key(scope, spec)
                out.append(LineTemplate(key, spec, merged, names, tuple(budgets), full, full_names))
            return tuple(out)

        return self._scope_templates.get_or(scope, build)  # type: ignore[no-any-return]


def _merge(budgets: Sequence[Budget]) -> tuple[Limits, tuple[str | None, ...]]:
    """The tightest limit of each unit over ``budgets``, and the name of the budget that
    sets it."""
    limits: list[int | None] = [None] * len(UNITS)
    names: list[str | None] = [None] * len(UNITS)
    for b in budgets:
        for u, lim in enumerate(b.limits):
            current = limits[u]
            if lim is not None and (current is None or lim < current):
                limits[u], names[u] = lim, b.name
    return (limits[0], limits[1], limits[2], limits[3], limits[4], limits[5]), tuple(names)


def _overridden(budgets: list[Budget], scope: str) -> list[Budget]:
    """The budgets of one scope and window that count: per unit, the overrides on the
    concrete scope if any limit it, else the overrides on a pattern, else the file's budgets.
    A file budget (or pattern override) loses every unit a more specific one limits, and is
    left out when it keeps none."""
    if not any(b.override for b in budgets):
        return budgets
    tiers = (
        [b for b in budgets if b.override and not b.is_pattern],
        [b for b in budgets if b.override and b.is_pattern],
        [b for b in budgets if not b.override],
    )
    out: list[Budget] = []
    taken = [False] * len(UNITS)
    for tier in tiers:
        limited = [any(b.limits[u] is not None for b in tier) for u in range(len(UNITS))]
        for b in tier:
            lims = tuple(None if taken[u] else lim for u, lim in enumerate(b.limits))
            if all(lim is None for lim in lims):
                continue
            out.append(b if lims == b.limits else replace(b, limits=lims))  # type: ignore[arg-type]
        taken = [t or lim for t, lim in zip(taken, limited, strict=True)]
    return out


def _scope_path(scopes: tuple[Any, ...]) -> tuple[str, ...]:
    path = ["global"]
    seen = {"global"}
    for given in scopes:
        s = normalize_scope(given)
        if s in seen:
            continue
        seen.add(s)
        path.append(s)
    return tuple(path)
