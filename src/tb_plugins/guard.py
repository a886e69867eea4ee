"""Moved: see :mod:`tb_plugins.engine`."""

from tb_plugins.engine import (
    BudgetGuard,
    BudgetStatus,
    Charge,
    Decision,
    Estimate,
    new_reservation_id,
)
from tb_plugins.engine.planning import RUN_IDLE_EXPIRY

__all__ = [
    "RUN_IDLE_EXPIRY",
    "BudgetGuard",
    "BudgetStatus",
    "Charge",
    "Decision",
    "Estimate",
    "new_reservation_id",
]
