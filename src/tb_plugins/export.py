"""``tb export FILE.db``: the usage log, the budgets and their status as a SQLite database.

The file is written through `sqlite-utils <https://sqlite-utils.datasette.io/>`_ (the
``[export]`` extra), so ``sqlite-utils`` and Datasette open it as it is. Tables::

    usage(reservation_id PK, ts, ts_iso, action, model, requested_model, scopes, input_tokens,
          output_tokens, cached_input_tokens, tokens, usd, priced, estimated, extra)
        one row per record of the usage log: a settled call, or a refused one
        (action ``deny``); ``ts`` in epoch seconds, ``ts_iso`` the same in ISO 8601 (UTC);
        ``scopes`` and ``extra`` are JSON text
    usage_scopes(reservation_id -> usage, scope)  PK (reservation_id, scope)
        one row per scope a record was charged to, so totals per scope are a GROUP BY
    budgets("index" PK, name, scope, window, tokens, input_tokens, output_tokens, usd,
            requests, calls, alerts, downgrade_at, is_pattern)
        the policy's budgets, one row each, with the limit of each unit (NULL: not limited)
    status(scope, budget, window, unit, spent, reserved, limit, remaining, utilization, ...)
        one row per limit of every budget now, as ``tb status --json`` gives it

Exporting again to the same file drops these four tables and creates them anew (other tables
in the file are left alone), so the file holds exactly the last export; with sqlite-utils 4
that happens in one transaction.

Example:
    >>> import sqlite_utils, tempfile, pathlib
    >>> from tb_plugins import BudgetGuard, Usage
    >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
    ...     "budgets": [{"scope": "team:search", "limit": "10k tokens/day"}]})
    >>> d = guard.check("gpt-4o", input_tokens=10, max_tokens=5, scopes=["team:search"])
    >>> _ = guard.settle(d, Usage(10, 5))
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "usage.db"
    >>> export_database(guard, out)["usage"]
    1
    >>> sqlite_utils.Database(out)["usage_scopes"].count
    2
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tb_plugins._lazy import require
from tb_plugins.core.usage import UNITS, UsageRecord, nano_to_usd

if TYPE_CHECKING:
    from tb_plugins.core.budgets import Budget
    from tb_plugins.engine import BudgetGuard

__all__ = ["TABLES", "export_database"]

TABLES = ("usage", "usage_scopes", "budgets", "status")
"""The tables an export writes (and replaces)."""

_USAGE_COLUMNS: dict[str, type] = {
    "reservation_id": str,
    "ts": float,
    "ts_iso": str,
    "action": str,
    "model": str,
    "requested_model": str,
    "scopes": str,
    "input_tokens": int,
    "output_tokens": int,
    "cached_input_tokens": int,
    "tokens": int,
    "usd": float,
    "priced": int,
    "estimated": int,
    "extra": str,
}
_BUDGET_COLUMNS: dict[str, type] = {
    "index": int,
    "name": str,
    "scope": str,
    "window": str,
    **{unit: float if unit == "usd" else int for unit in UNITS},
    "alerts": str,
    "downgrade_at": float,
    "is_pattern": int,
}
_STATUS_COLUMNS: dict[str, type] = {
    "scope": str,
    "budget": str,
    "window": str,
    "unit": str,
    "spent": float,
    "reserved": float,
    "limit": float,
    "remaining": float,
    "utilization": float,
    "window_start": float,
    "resets_at": float,
    "forecast_exhausted_at": float,
    "window_start_iso": str,
    "resets_at_iso": str,
    "forecast_exhausted_at_iso": str,
}


def export_database(
    guard: BudgetGuard,
    path: str | Path,
    *,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, int]:
    """Write ``guard``'s usage log (between ``since`` and ``until``, epoch seconds), budgets
    and current status into the SQLite file ``path``, replacing the tables of an earlier
    export. Returns the number of rows written per table.

    A reservation id the log holds twice (a caller reusing its own id, e.g. a refused call
    retried under the same id) keeps every record: the repeats get ``#2``, ``#3``, ... after
    the id, so that ``reservation_id`` stays the key of ``usage``.

    Raises:
        ImportError: sqlite-utils is not installed (``pip install 'tb-plugins[export]'``).
    """
    sqlite_utils = require("sqlite_utils", "export")
    records = guard.ledger.records(since=since, until=until)
    usage = list(_usage_rows(records))
    scopes = [
        {"reservation_id": row["reservation_id"], "scope": scope}
        for row, record in zip(usage, records, strict=True)
        for scope in dict.fromkeys(record.scopes)
    ]
    budgets = [_budget_row(b) for b in guard.planner.budgets]
    status = [s.to_dict() for s in guard.status()]

    db = sqlite_utils.Database(path)
    try:
        with _transaction(db):
            for name in reversed(TABLES):  # the referencing table first
                db[name].drop(ignore=True)
            db["usage"].create(_USAGE_COLUMNS, pk="reservation_id", not_null={"ts", "action"})
            db["usage"].create_index(["ts"])
            db["usage_scopes"].create(
                {"reservation_id": str, "scope": str},
                pk=("reservation_id", "scope"),
                foreign_keys=[("reservation_id", "usage", "reservation_id")],
            )
            db["usage_scopes"].create_index(["scope"])
            db["budgets"].create(_BUDGET_COLUMNS, pk="index")
            db["status"].create(_STATUS_COLUMNS)
            for name, rows in (
                ("usage", usage),
                ("usage_scopes", scopes),
                ("budgets", budgets),
                ("status", status),
            ):
                if rows:
                    db[name].insert_all(rows)
    finally:
        db.close()
    counts = (len(usage), len(scopes), len(budgets), len(status))
    return dict(zip(TABLES, counts, strict=True))


@contextlib.contextmanager
def _transaction(db: Any) -> Iterator[None]:
    """One transaction on sqlite-utils 4 (``Database.atomic``); on 3.x each step commits."""
    atomic = getattr(db, "atomic", None)
    if atomic is None:
        yield
        return
    with atomic():
        yield


def _usage_rows(records: Sequence[UsageRecord]) -> Iterator[dict[str, Any]]:
    seen: dict[str, int] = {}
    for r in records:
        n = seen[r.reservation_id] = seen.get(r.reservation_id, 0) + 1
        yield {
            "reservation_id": r.reservation_id if n == 1 else f"{r.reservation_id}#{n}",
            "ts": r.ts,
            "ts_iso": datetime.fromtimestamp(r.ts, tz=timezone.utc).isoformat(),
            "action": r.action,
            "model": r.model,
            "requested_model": r.requested_model,
            "scopes": json.dumps(list(r.scopes)),
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cached_input_tokens": r.cached_input_tokens,
            "tokens": r.input_tokens + r.output_tokens,
            "usd": r.usd,
            "priced": int(r.priced),
            "estimated": int(r.estimated),
            "extra": json.dumps(r.extra, default=str),
        }


def _budget_row(b: Budget) -> dict[str, Any]:
    return {
        "index": b.index,
        "name": b.name,
        "scope": b.pattern,
        "window": b.window.spec,
        **{
            unit: nano_to_usd(limit) if unit == "usd" and limit is not None else limit
            for unit, limit in zip(UNITS, b.limits, strict=True)
        },
        "alerts": json.dumps(list(b.alerts)),
        "downgrade_at": b.downgrade_at,
        "is_pattern": int(b.is_pattern),
    }
