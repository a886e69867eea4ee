"""The engine: :class:`BudgetGuard` and the values it hands back.

One module per concept: :mod:`~tb_plugins.engine.guard` (the public API and its async twins),
:mod:`~tb_plugins.engine.flows` (check, settle, release as generators of ledger operations),
:mod:`~tb_plugins.engine.drivers` (the sync and async drivers that run them),
:mod:`~tb_plugins.engine.estimate` (counting and pricing a call),
:mod:`~tb_plugins.engine.planning` (scope paths and ledger lines),
:mod:`~tb_plugins.engine.clock` (the shared ledger's clock), :mod:`~tb_plugins.engine.writeback`
(spend kept while the ledger is down), :mod:`~tb_plugins.engine.decision` (the values) and
:mod:`~tb_plugins.engine.alerts` (alert sinks); :mod:`~tb_plugins.engine.shadow` (what
budgets in ``mode: shadow`` would have done) and :mod:`~tb_plugins.engine.replay` (a usage
log run through another policy, in memory).
"""

from tb_plugins.engine.decision import BudgetStatus, Charge, Decision, Estimate, new_reservation_id
from tb_plugins.engine.guard import BudgetGuard

__all__ = ["BudgetGuard", "BudgetStatus", "Charge", "Decision", "Estimate", "new_reservation_id"]
