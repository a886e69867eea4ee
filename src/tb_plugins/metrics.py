"""Prometheus metrics for a guard: what it charged and decided, and where each budget stands.

Needs ``prometheus_client`` (``pip install 'tb-plugins[metrics]'``); ``import tb_plugins``
never loads it. :func:`register` adds one collector to a registry (prometheus_client's default
``REGISTRY`` unless told otherwise); serve that registry as usual, or run
``tb metrics serve --port 9464`` (:mod:`tb_plugins.cli.metrics`), or, on the LiteLLM proxy,
let its own ``/metrics`` show them (:mod:`tb_plugins.integrations.litellm.metrics`).

Series (``docs/metrics.md`` has the details):

* ``tb_tokens_total{model, kind}``, counter: tokens charged (``kind``: ``input``, ``output``,
  ``cached``);
* ``tb_cost_usd_total{model}``, counter: USD charged;
* ``tb_decisions_total{action, scope}``, counter: decisions (``allow``, ``clamp``,
  ``downgrade``, ``deny``), once under each scope of the call's path;
* ``tb_budget_utilization{scope, budget, window, unit}``, gauge: spent and held over the limit;
* ``tb_budget_remaining{scope, budget, window, unit}``, gauge: what is left of the limit;
* ``tb_ledger_up``, gauge: 1 when the scrape read the ledger;
* ``tb_pending_settlements``, gauge: spend kept while the ledger was unreachable.

**Labels stay bounded.** A scope is its own ``scope`` label when a budget names it exactly
(``team:search``) or when it matches one of the ``per_scope`` patterns you pass; a scope that
only a pattern budget matches (``user:alice`` under ``user:*``) is counted under the pattern,
and a scope no budget matches under ``<kind>:*``. On gauges, a pattern's series carries the
most used of its scopes: the highest utilization and the least remaining. Models past
``max_models`` distinct names are counted as ``_other``.

**Where the numbers come from.** The counters are counted in process from the guard's events
(``guard.listeners``: a few dictionary updates per call), from the moment of registration;
with ``counters="ledger"`` they are read instead from the ledger's usage log at each scrape
(every process sharing the ledger, since the log began; no ``tb_decisions_total``, which the
log does not keep by action). The gauges are read from the ledger at each scrape.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "budgets": [
    ...     {"scope": "user:*", "limit": "100k tokens/day"}]})
    >>> registry = CollectorRegistry()
    >>> collector = register(guard, registry)
    >>> d = guard.check(model="gpt-4o", input_tokens=10, max_tokens=20, scopes=["user:ann"])
    >>> b'tb_decisions_total{action="allow",scope="user:*"} 1.0' in generate_latest(registry)
    True
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from tb_plugins._lazy import require
from tb_plugins.errors import LedgerError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from tb_plugins.core.budgets import Budget
    from tb_plugins.engine.decision import BudgetStatus
    from tb_plugins.engine.guard import BudgetGuard
    from tb_plugins.engine.planning import LinePlanner

__all__ = ["ACTIONS", "OTHER_MODEL", "BudgetCollector", "register"]

logger = logging.getLogger("tb_plugins")

ACTIONS = ("allow", "clamp", "downgrade", "deny")
"""The values of the ``action`` label of ``tb_decisions_total``."""

OTHER_MODEL = "_other"
"""The ``model`` label of models past ``max_models``."""

_KINDS = ("input", "output", "cached")
_MEMORY = 16384  # scopes and paths whose labels are remembered (forgotten all at once past this)


def register(
    guard: BudgetGuard,
    registry: CollectorRegistry | None = None,
    *,
    per_scope: Iterable[str] = (),
    counters: Literal["process", "ledger"] = "process",
    max_models: int = 200,
) -> BudgetCollector:
    """Publish ``guard``'s series on ``registry`` (default: prometheus_client's ``REGISTRY``).

    Args:
        guard: the guard to watch.
        registry: where to register the collector.
        per_scope: patterns (``fnmatch``, e.g. ``"team:*"``) whose scopes get labels of their
            own instead of counting under their budget's pattern. Each matching scope is a
            series: use it for kinds with a few names (teams, orgs), not users.
        counters: ``"process"`` counts this guard's events from now on; ``"ledger"`` reads the
            totals from the ledger's usage log at each scrape (for a process that makes no
            calls itself, such as ``tb metrics serve``).
        max_models: distinct ``model`` labels kept; further models count as ``_other``.

    Returns:
        The collector; ``collector.unregister()`` takes it off the registry and the guard.

    Raises:
        ImportError: prometheus_client is not installed (the message names the extra).
        ValueError: the registry already has tb series (one guard per registry).
    """
    prom = require("prometheus_client", "metrics")
    target: CollectorRegistry = prom.REGISTRY if registry is None else registry
    collector = BudgetCollector(
        guard, per_scope=per_scope, counters=counters, max_models=max_models
    )
    target.register(collector)
    collector.registry = target
    if counters == "process":
        guard.listeners.append(collector.on_event)
    return collector


class BudgetCollector:
    """A prometheus_client collector of one guard's series (made by :func:`register`).

    ``on_event`` is the guard listener that counts; ``collect`` is called at each scrape.
    """

    def __init__(
        self,
        guard: BudgetGuard,
        *,
        per_scope: Iterable[str] = (),
        counters: Literal["process", "ledger"] = "process",
        max_models: int = 200,
    ) -> None:
        if counters not in ("process", "ledger"):
            raise ValueError(f"counters must be 'process' or 'ledger', not {counters!r}")
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, not {max_models!r}")
        self._core = require("prometheus_client.metrics_core", "metrics")
        self.guard = guard
        self.per_scope = tuple(per_scope)
        self.counters = counters
        self.max_models = max_models
        self.registry: CollectorRegistry | None = None
        self._lock = threading.Lock()
        # model -> [input, output, cached, usd]; action -> scope label -> decisions
        self._charged: dict[str, list[float]] = {}
        self._decisions: dict[str, dict[str, int]] = {a: {"global": 0} for a in ACTIONS}
        self._budgets: Sequence[Budget] = ()
        self._n_budgets = -1
        self._exact: frozenset[str] = frozenset()
        self._patterns: tuple[Budget, ...] = ()
        self._scope_labels: dict[str, str] = {}
        self._path_labels: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._refresh_budgets()

    # -- counting (on the call path) --------------------------------------------------------

    def on_event(self, event: str, data: Mapping[str, Any]) -> None:
        """The guard listener: count a settle, a decision or a refusal."""
        if event == "settle":
            charge = data["charge"]
            if not charge.applied:  # a repeated settle, or spend the ledger refused
                return
            with self._lock:
                row = self._charged.get(charge.model)
                if row is None:
                    row = self._model_row(charge.model)
                row[0] += charge.input_tokens
                row[1] += charge.output_tokens
                row[2] += charge.cached_input_tokens
                if charge.usd is not None:
                    row[3] += charge.usd
        elif event == "decision":
            decision = data["decision"]
            self._count(decision.action, decision.scopes)
        elif event == "deny":
            self._count("deny", data["scopes"])

    def _model_row(self, model: str) -> list[float]:
        if len(self._charged) >= self.max_models:
            model = OTHER_MODEL
        return self._charged.setdefault(model, [0, 0, 0, 0.0])

    def _count(self, action: str, path: tuple[str, ...]) -> None:
        labels = self._path_labels.get(path)
        if labels is None:
            labels = self._labels_of(path)
        with self._lock:
            counts = self._decisions.get(action)
            if counts is None:
                counts = self._decisions[action] = {}
            for label in labels:
                counts[label] = counts.get(label, 0) + 1

    def _labels_of(self, path: tuple[str, ...]) -> tuple[str, ...]:
        labels = tuple(dict.fromkeys(self.scope_label(s) for s in path))
        if len(self._path_labels) >= _MEMORY:
            self._path_labels = {}
        self._path_labels[path] = labels
        return labels

    def scope_label(self, scope: str) -> str:
        """The ``scope`` label ``scope`` is counted under on ``tb_decisions_total``: itself
        when a budget names it exactly or a ``per_scope`` pattern matches it, else the first
        pattern budget that matches it, else ``<kind>:*``."""
        label = self._scope_labels.get(scope)
        if label is not None:
            return label
        if scope == "global" or scope in self._exact or self._own_label(scope):
            label = scope
        else:
            label = next((b.pattern for b in self._patterns if b.matches(scope)), None)
            if label is None:
                label = scope.partition(":")[0] + ":*"
        if len(self._scope_labels) >= _MEMORY:
            self._scope_labels = {}
        self._scope_labels[scope] = label
        return label

    def _own_label(self, scope: str) -> bool:
        return any(fnmatch.fnmatchcase(scope, p) for p in self.per_scope)

    def _refresh_budgets(self) -> None:
        """Forget the labels worked out for other budgets (a runtime override replaces the
        guard's planner, and its budgets with it)."""
        budgets = self.guard.planner.budgets
        if budgets is self._budgets and len(budgets) == self._n_budgets:
            return
        self._exact = frozenset(b.pattern for b in budgets if not b.is_pattern)
        self._patterns = tuple(b for b in budgets if b.is_pattern)
        self._budgets, self._n_budgets = budgets, len(budgets)
        self._scope_labels = {}
        self._path_labels = {}

    # -- the scrape -------------------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The series' names, without reading the ledger (prometheus_client calls this when
        the collector is registered)."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Every series now: the counters, and the gauges read from the ledger. A ledger
        that cannot be read leaves the gauges out and sets ``tb_ledger_up`` to 0; the scrape
        itself does not fail."""
        tokens, cost, decisions, up, remaining, utilization, pending = self._families()
        charged = {} if self.counters == "ledger" else self._counted()
        gauges: dict[tuple[str, str, str, str], tuple[float, float]] = {}
        try:
            self.guard.budgets()  # the runtime overrides in force now (one ledger read)
            planner = self.guard.planner  # one planner for the whole scrape
            self._refresh_budgets()
            if self.counters == "ledger":
                charged = self._charged_in_ledger()
            gauges = self._gauges(self._statuses(planner), planner.budgets)
        except Exception as exc:
            self._refresh_budgets()
            logger.warning(
                "tb_plugins: metrics could not read the ledger (%s)",
                exc,
                exc_info=not isinstance(exc, LedgerError),
            )
            up.add_metric([], 0.0)
        else:
            up.add_metric([], 1.0)
        for model in sorted(charged):
            row = charged[model]
            for kind, value in zip(_KINDS, row, strict=False):
                tokens.add_metric([model, kind], value)
            cost.add_metric([model], row[3])
        for key in sorted(gauges):
            util, left = gauges[key]
            utilization.add_metric(list(key), util)
            remaining.add_metric(list(key), left)
        pending.add_metric([], float(self.guard.pending))
        yield tokens
        yield cost
        if self.counters == "process":
            with self._lock:
                counted = {a: dict(c) for a, c in self._decisions.items()}
            for action in sorted(counted):
                for scope in sorted(counted[action]):
                    decisions.add_metric([action, scope], counted[action][scope])
            yield decisions
        yield utilization
        yield remaining
        yield up
        yield pending

    def _counted(self) -> dict[str, list[float]]:
        with self._lock:
            return {model: list(row) for model, row in self._charged.items()}

    def _families(self) -> tuple[Any, ...]:
        core = self._core
        line = ["scope", "budget", "window", "unit"]
        return (
            core.CounterMetricFamily(
                "tb_tokens", "Tokens charged by the guard's settles.", labels=["model", "kind"]
            ),
            core.CounterMetricFamily("tb_cost_usd", "USD charged.", labels=["model"]),
            core.CounterMetricFamily(
                "tb_decisions",
                "Guard decisions, counted once under each scope of the call's path.",
                labels=["action", "scope"],
            ),
            core.GaugeMetricFamily("tb_ledger_up", "1 when the last scrape read the ledger."),
            core.GaugeMetricFamily(
                "tb_budget_remaining",
                "What is left of a budget limit (a pattern: its scope with the least left).",
                labels=line,
            ),
            core.GaugeMetricFamily(
                "tb_budget_utilization",
                "Spent and held over the limit (a pattern: its most used scope).",
                labels=line,
            ),
            core.GaugeMetricFamily(
                "tb_pending_settlements",
                "Settlements kept in this process while the ledger was unreachable.",
            ),
        )

    def _charged_in_ledger(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for row in self.guard.usage(group_by="model"):
            model = row.key if row.key in out or len(out) < self.max_models else OTHER_MODEL
            acc = out.setdefault(model, [0, 0, 0, 0.0])
            acc[0] += row.input_tokens
            acc[1] += row.output_tokens
            acc[2] += row.cached_input_tokens
            acc[3] += row.usd
        return out

    def _statuses(self, planner: LinePlanner) -> list[BudgetStatus]:
        """Every limit of every budget now, as ``guard.status()`` reads it but without its
        forecasts (one usage-log query per scope: far too slow for a scrape over thousands
        of users)."""
        from tb_plugins.engine.decision import statuses

        guard = self.guard
        now = guard.now()
        scopes = dict.fromkeys(b.pattern for b in planner.budgets if not b.is_pattern)
        for scope, _window in guard.ledger.scopes():
            if scope not in scopes and any(b.matches(scope) for b in planner.budgets):
                scopes[scope] = None
        plans = planner.lines(list(scopes), now, cache=False)
        if not plans:
            return []
        states = guard.ledger.status([lp.line for lp in plans], now=now)
        return statuses(plans, states, now, planner.tz)

    def _gauges(
        self, sts: Iterable[BudgetStatus], budgets: Iterable[Budget]
    ) -> dict[tuple[str, str, str, str], tuple[float, float]]:
        """(utilization, remaining) per series; a pattern's series holds the highest
        utilization and the least remaining of its scopes."""
        by_name: dict[tuple[str, str], list[Budget]] = {}
        for b in budgets:
            by_name.setdefault((b.name, b.window.spec), []).append(b)
        out: dict[tuple[str, str, str, str], tuple[float, float]] = {}
        for s in sts:
            budget = next(
                (b for b in by_name.get((s.budget, s.window), ()) if b.matches(s.scope)), None
            )
            label = s.scope
            if budget is not None and budget.is_pattern and not self._own_label(s.scope):
                label = budget.pattern
            key = (label, s.budget, s.window, s.unit)
            seen = out.get(key)
            if seen is None:
                out[key] = (s.utilization, s.remaining)
            else:
                out[key] = (max(seen[0], s.utilization), min(seen[1], s.remaining))
        return out

    def unregister(self) -> None:
        """Take the collector off its registry and its guard's listeners."""
        if self.on_event in self.guard.listeners:
            self.guard.listeners.remove(self.on_event)
        if self.registry is not None:
            self.registry.unregister(self)
            self.registry = None
