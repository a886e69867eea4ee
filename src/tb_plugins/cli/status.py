"""``tb status``: every budget's bar, spend, what is left, the reset and the forecast."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tb_plugins._format import bar, fmt_amount, fmt_clock, fmt_span, table
from tb_plugins.cli.common import config_option, emit, open_guard, output_options

if TYPE_CHECKING:
    from tb_plugins.engine.decision import BudgetStatus

STATUS_HEADERS = ("scope", "budget", "used", "spent", "left", "resets", "runs out")
"""The columns of the ``tb status`` table."""

STATUS_WIDTH = 80
"""The widest line of the ``tb status`` table."""


def cmd_status(args: argparse.Namespace) -> int:
    """Show every budget's use (a bar), spend, what is left, how long until it resets and, at
    the burn rate of the last hour, when it runs out (UTC; ``now`` if spent, ``-`` if not
    before it resets). The table fits 80 columns: a scope name too long for its row goes
    on its own line above it; ``--json`` and ``--csv`` carry every field."""
    guard = open_guard(args)
    try:
        now = guard.now()
        rows = guard.status(args.scope)
    finally:
        guard.ledger.close()
    emit(
        args,
        STATUS_HEADERS,
        status_cells(rows, now),
        [s.to_dict() for s in rows],
        width=STATUS_WIDTH,
    )
    return 0


def render_status(rows: Sequence[BudgetStatus], now: float, *, width: int = STATUS_WIDTH) -> str:
    """The ``tb status`` table of ``rows`` as text, no line wider than ``width`` (``tb
    watch`` redraws it); ``(nothing to show)`` when there are no budgets."""
    if not rows:
        return "(nothing to show)"
    return table(STATUS_HEADERS, status_cells(rows, now), width=width)


def status_cells(rows: Sequence[BudgetStatus], now: float) -> list[list[str]]:
    """The cells of the ``tb status`` table, a row per budget status, as of ``now``."""
    return [
        [
            s.scope,
            _limit_label(s),
            bar(s.utilization),
            fmt_amount(s.unit, s.spent),
            fmt_amount(s.unit, s.remaining),
            "never" if s.resets_at is None else fmt_span(s.resets_at - now),
            fmt_clock(s.forecast_exhausted_at, now),
        ]
        for s in rows
    ]


def _limit_label(s: BudgetStatus) -> str:
    """A limit, short: ``20,000 tokens/day``, ``2M output/month``, ``$5/month``, ``50 calls
    total`` (``input`` and ``output`` stand for ``input_tokens`` and ``output_tokens``)."""
    if s.unit == "usd":
        amount = f"${s.limit:,.4f}".rstrip("0").rstrip(".")
    else:
        n = s.limit
        count = f"{n / 1e6:g}M" if n >= 1e6 and n % 100_000 == 0 else fmt_amount(s.unit, n)
        amount = f"{count} {s.unit.removesuffix('_tokens')}"
    return f"{amount} total" if s.window == "total" else f"{amount}/{s.window}"


def add_parser(sub: Any) -> None:
    """Register ``tb status``."""
    p = sub.add_parser(
        "status", help="spend, holds and limits of every budget now", description=cmd_status.__doc__
    )
    p.add_argument("--scope", help="only this scope, e.g. team:search")
    config_option(p, after_command=True)
    output_options(p)
    p.set_defaults(func=cmd_status)
