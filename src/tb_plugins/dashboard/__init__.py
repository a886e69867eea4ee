"""The dashboard (``tb serve``): a read-only web page of a guard's budgets and usage log.

Each budget's bar and forecast, spend over time per scope, the decisions timeline and the top
spenders, refreshed every few seconds, and the JSON they are drawn from (``/api/status``,
``/api/usage``). The server is the standard library's (:mod:`http.server`); the page, its script
and its style ship in the package (``dashboard/static``), so nothing is fetched from the network.
It binds 127.0.0.1 unless told otherwise, and has no login: whoever reaches it reads the spend.

Example:
    >>> from tb_plugins import BudgetGuard
    >>> from tb_plugins.dashboard import DashboardServer
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "team:search", "limit": "1k tokens/day"}]})
    >>> server = DashboardServer(guard, port=0).start()   # port 0: any free port
    >>> server.url.startswith("http://127.0.0.1:")
    True
    >>> server.stop()
"""

from __future__ import annotations

from tb_plugins.dashboard.data import QueryError, UsageQuery, status_payload, usage_payload
from tb_plugins.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, DashboardServer

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DashboardServer",
    "QueryError",
    "UsageQuery",
    "status_payload",
    "usage_payload",
]
