"""Agent limits: tool calls per scope, repeated tool calls and wall-clock time per run.

Three budget fields limit what an agent does rather than what it spends:

* ``tool_calls`` (``run:``, ``session:`` and ``agent:`` scopes; every tool, or one with
  ``tool: NAME``): a tool call past the limit is refused before the tool runs
  (:class:`~tb_plugins.errors.ToolLimitExceeded`); the run may go on.
* ``repeats: N`` (``run:`` scopes): the N-th call of one tool with the same arguments in a run
  is refused and ends the run (:class:`~tb_plugins.errors.RunLimitExceeded`): the agent loops.
* ``seconds`` (``run:`` scopes): once a run has lasted that long, its next model or tool call
  is refused and the run ends (:class:`~tb_plugins.errors.RunLimitExceeded`).

A run lives in one process, so these counters live in memory here, not in the ledger: cheap,
and gone when the run ends (:meth:`AgentTracker.end`) or when more than
:data:`MAX_TRACKED_SCOPES` scopes are tracked (the least recently used is forgotten). For
``session:`` and ``agent:`` scopes that means ``tool_calls`` are counted per process.

Arguments are compared after :func:`normalize_arguments`, so near-repeats (keys in another
order, extra whitespace, ``1`` for ``1.0``) count as the same call, while a model that changes
its arguments is never taken for a loop.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "run:*", "repeats": 2}]})
    >>> guard.check_tool(["run:1"], "search", {"q": "budgets"})
    >>> guard.check_tool(["run:1"], "search", {"q": " budgets "})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tb_plugins.errors.RunLimitExceeded: run 'run:1' ends: tool 'search' was called 2 times ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from tb_plugins.core.budgets import Budget
from tb_plugins.errors import RunLimitExceeded, ToolLimitExceeded

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.engine.clock import LedgerClock

__all__ = [
    "MAX_SIGNATURES",
    "MAX_TRACKED_SCOPES",
    "AgentChecks",
    "AgentTracker",
    "normalize_arguments",
]

MAX_TRACKED_SCOPES = 10_000
"""Scopes whose agent counters are kept; past this the least recently used is forgotten."""
MAX_SIGNATURES = 1_000
"""Distinct (tool, arguments) kept per run for ``repeats``; past this the oldest is forgotten."""
_MAX_DEPTH = 64  # arguments nested deeper than this compare by their text
_MATCH_MEMORY = 4096  # scopes whose matching budgets are remembered (forgotten all at once)


def normalize_arguments(args: Any) -> str:
    """A tool call's arguments as canonical JSON: the text two calls are compared by.

    Keys are sorted; whitespace inside string values is collapsed to one space and stripped;
    numbers are canonical (``1.0`` is ``1``; ``True`` stays ``true``); tuples are lists. A
    string that holds a JSON object or array (a callback's ``input_str``) is read as JSON
    first. Case and every other character are kept: ``"Paris"`` and ``"paris"`` differ.

    Example:
        >>> normalize_arguments({"q": "  token   budgets ", "n": 10.0, "a": [1, True]})
        '{"a":[1,true],"n":10,"q":"token budgets"}'
    """
    if isinstance(args, str) and args.lstrip().startswith(("{", "[")):
        with contextlib.suppress(ValueError):
            args = json.loads(args)
    return json.dumps(
        _canonical(args, 0), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def _canonical(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if depth >= _MAX_DEPTH:
        return " ".join(str(value).split())
    if isinstance(value, Mapping):
        return {" ".join(str(k).split()): _canonical(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, depth + 1) for v in value]
    return " ".join(str(value).split())


def _signature(tool: str, args: Any) -> tuple[str, str]:
    digest = hashlib.sha256(normalize_arguments(args).encode("utf-8", "surrogatepass"))
    return tool, digest.hexdigest()[:32]


@dataclass(slots=True)
class _Counters:
    """What one scope has done: since when, its tool calls, the calls of each signature."""

    started: float
    tools: dict[int, tuple[int, int]] = field(default_factory=dict)  # budget -> bucket, n
    seen: OrderedDict[tuple[str, str], int] = field(default_factory=OrderedDict)
    stop: dict[str, Any] | None = None  # why the run ended, to refuse every later call


class AgentTracker:
    """The in-memory counters behind ``tool_calls``, ``repeats`` and ``seconds``.

    Thread-safe; bounded by :data:`MAX_TRACKED_SCOPES` scopes and :data:`MAX_SIGNATURES`
    signatures per run. Only scopes that an agent budget matches are tracked.

    Args:
        budgets: the policy's compiled budgets (those without agent limits are ignored).
        tz: the timezone calendar windows of ``tool_calls`` follow.
        max_scopes: how many scopes to keep counters for.
    """

    def __init__(
        self, budgets: Iterable[Budget], tz: ZoneInfo, max_scopes: int = MAX_TRACKED_SCOPES
    ) -> None:
        self.budgets = tuple(b for b in budgets if b.limits_agents)
        self.tz = tz
        self.max_scopes = max_scopes
        self._lock = threading.Lock()
        self._scopes: OrderedDict[str, _Counters] = OrderedDict()
        self._matching: dict[str, tuple[Budget, ...]] = {}

    @property
    def active(self) -> bool:
        """Whether the policy has any agent limit (if not, every check returns at once)."""
        return bool(self.budgets)

    def __len__(self) -> int:
        """Scopes tracked now."""
        return len(self._scopes)

    def check_run(self, path: Sequence[str], mono: float) -> None:
        """Refuse if a run on ``path`` has ended (``repeats``) or is past its ``seconds``.

        Raises:
            RunLimitExceeded: the run must end.
        """
        if not self.budgets:
            return
        with self._lock:
            self._check_run(path, mono)

    def check_tool(
        self, path: Sequence[str], tool: str, args: Any, *, now: float, mono: float
    ) -> None:
        """Admit one call of ``tool`` on ``path`` and count it, or refuse it.

        In order: the run's time and end (as :meth:`check_run`); ``repeats`` (every call is
        counted, admitted or not, so a model that keeps asking for a refused tool is still
        caught looping); then every ``tool_calls`` budget, counted only if all admit it.

        Raises:
            RunLimitExceeded: the run must end (``repeats``, ``seconds``).
            ToolLimitExceeded: a ``tool_calls`` budget has no room for this call.
        """
        if not self.budgets:
            return
        matching = [(s, self._budgets_for(s)) for s in path]
        repeats = any(b.repeats is not None for _s, bs in matching for b in bs)
        sig = _signature(tool, args) if repeats else None  # hashed outside the lock
        with self._lock:
            self._check_run(path, mono)
            if sig is not None:
                self._count_repeat(matching, tool, sig, mono)
            admitted: list[tuple[_Counters, int, int, int]] = []
            for scope, budgets in matching:
                for b in budgets:
                    if b.tool_calls is None or b.tool not in (None, tool):
                        continue
                    slot = b.window.slot(now, self.tz)
                    counters = self._counters(scope, mono)
                    bucket, n = counters.tools.get(b.index, (slot.bucket, 0))
                    n = n if bucket == slot.bucket else 0
                    if n + 1 > b.tool_calls:
                        raise ToolLimitExceeded(
                            tool=tool, scope=scope, budget=b.name, unit="tool_calls",
                            spent=n, limit=b.tool_calls, requested=1,
                            resets_at=slot.resets_at,
                        )  # fmt: skip
                    admitted.append((counters, b.index, slot.bucket, n + 1))
            for counters, index, bucket, n in admitted:
                counters.tools[index] = (bucket, n)

    def end(self, scope: str) -> bool:
        """Forget a scope's counters (a run that ended). True if it was tracked."""
        with self._lock:
            return self._scopes.pop(scope, None) is not None

    # -- under the lock ----------------------------------------------------------------------

    def _check_run(self, path: Sequence[str], mono: float) -> None:
        for scope in path:
            if not scope.startswith("run:"):
                continue
            timed = [b for b in self._budgets_for(scope) if b.seconds is not None]
            counters = self._scopes.get(scope)
            if counters is None:
                if not timed:
                    continue  # nothing to stop yet: repeats start counting at the first tool
                counters = self._counters(scope, mono)
            if counters.stop is not None:
                raise RunLimitExceeded(**counters.stop)
            if not timed:
                continue
            b = min(timed, key=lambda b: b.seconds or 0.0)
            elapsed = mono - counters.started
            if b.seconds is not None and elapsed >= b.seconds:
                counters.stop = {
                    "scope": scope, "budget": b.name, "unit": "seconds", "spent": elapsed,
                    "limit": b.seconds, "requested": 0, "resets_at": None,
                }  # fmt: skip
                raise RunLimitExceeded(**counters.stop)

    def _count_repeat(
        self,
        matching: list[tuple[str, tuple[Budget, ...]]],
        tool: str,
        sig: tuple[str, str],
        mono: float,
    ) -> None:
        for scope, budgets in matching:
            limits = [b for b in budgets if b.repeats is not None]
            if not limits:
                continue
            counters = self._counters(scope, mono)
            n = counters.seen.pop(sig, 0) + 1
            counters.seen[sig] = n
            if len(counters.seen) > MAX_SIGNATURES:
                counters.seen.popitem(last=False)
            b = min(limits, key=lambda b: b.repeats or 0)
            if b.repeats is not None and n >= b.repeats:
                counters.stop = {
                    "tool": tool, "scope": scope, "budget": b.name, "unit": "repeats",
                    "spent": n - 1, "limit": b.repeats, "requested": 1, "resets_at": None,
                }  # fmt: skip
                raise RunLimitExceeded(**counters.stop)

    def _counters(self, scope: str, mono: float) -> _Counters:
        counters = self._scopes.get(scope)
        if counters is None:
            counters = self._scopes[scope] = _Counters(started=mono)
            if len(self._scopes) > self.max_scopes:
                self._scopes.popitem(last=False)
        else:
            self._scopes.move_to_end(scope)
        return counters

    def _budgets_for(self, scope: str) -> tuple[Budget, ...]:
        found = self._matching.get(scope)
        if found is None:
            found = tuple(b for b in self.budgets if b.matches(scope))
            if len(self._matching) >= _MATCH_MEMORY:
                self._matching.clear()
            self._matching[scope] = found
        return found


class AgentChecks:
    """The guard's agent-limit methods (:class:`~tb_plugins.BudgetGuard` provides the rest).

    They read no ledger, so they have no async twins: call them from sync or async code.
    """

    policy: Policy
    _time: LedgerClock
    agents: AgentTracker

    def now(self) -> float:  # pragma: no cover - the guard's
        raise NotImplementedError

    def scope_path(self, scopes: Iterable[str]) -> tuple[str, ...]:  # pragma: no cover
        raise NotImplementedError

    def _init_agents(self, budgets: Iterable[Budget]) -> None:
        self.agents = AgentTracker(budgets, self.policy.tz)

    def check_tool(self, scopes: Iterable[str], tool: str, args: Any = None) -> None:
        """Admit one tool call before the tool runs, or refuse it.

        Counts the call against every ``tool_calls`` budget of the scope path (``tool: NAME``
        budgets only for that tool) and, on ``run:`` scopes, against ``repeats`` (the
        arguments compared by :func:`normalize_arguments`) and ``seconds`` (measured on the
        guard's monotonic clock from the run's first checked call).

        Args:
            scopes: the call's scopes, as for :meth:`check` (``global`` is added).
            tool: the tool's name.
            args: its arguments (a dict, or the JSON text of one).

        Raises:
            ToolLimitExceeded: a ``tool_calls`` budget has no room; do not run the tool, tell
                the agent why, and let the run go on.
            RunLimitExceeded: ``repeats`` or ``seconds``: do not run the tool; end the run.
            ValueError: a scope is not ``kind:name`` of a known kind.

        Example:
            >>> from tb_plugins import BudgetGuard
            >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [], "budgets":
            ...     [{"scope": "run:*", "tool_calls": 1, "tool": "search_web"}]})
            >>> guard.check_tool(["run:7"], "search_web", {"q": "a"})
            >>> guard.check_tool(["run:7"], "calculator", {"x": 1})  # another tool: no limit
            >>> guard.check_tool(["run:7"], "search_web", {"q": "b"})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            tb_plugins.errors.ToolLimitExceeded: tool 'search_web' refused: budget ...
        """
        if self.agents.active:
            path = self.scope_path(scopes)
            self.agents.check_tool(path, tool, args, now=self.now(), mono=self._time.mono())

    def check_run(self, scopes: Iterable[str]) -> None:
        """Refuse the next call of a run that must end: past its ``seconds``, or stopped by
        ``repeats``. :meth:`check` and :meth:`check_tool` call it; integrations may call it
        at other steps.

        Raises:
            RunLimitExceeded: the run must end.
        """
        if self.agents.active:
            self.agents.check_run(self.scope_path(scopes), self._time.mono())

    def end_run(self, scope: str) -> None:
        """Forget the in-memory counters of a run that ended (``run:<id>``); integrations call
        it when an agent run finishes. Counters of runs never ended are dropped least recently
        used first past :data:`MAX_TRACKED_SCOPES`."""
        if self.agents.active:
            self.agents.end(scope)
