"""``tb report`` (usage totals by scope, model, day or scope kind) and ``tb export`` (the
usage log as a sqlite-utils database)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from tb_plugins.cli.common import config_option, emit, open_guard, output_options, parse_since
from tb_plugins.core.models import bare_model
from tb_plugins.core.scopes import escape_text

if TYPE_CHECKING:
    from tb_plugins.core.usage import UsageRow

REPORT_KINDS = (
    "scope",
    "model",
    "day",
    "user",
    "team",
    "key",
    "feature",
    "agent",
    "org",
    "end_user",
    "session",
    "run",
    "chain",
)
"""What ``tb report --by`` groups by: scope, model, day, or the scopes of one kind."""


def cmd_report(args: argparse.Namespace) -> int:
    """Show totals from the usage log, grouped by scope, model, day, or the scopes of one kind
    (``--by user``: one row per user). Models are grouped by their bare name: ``openai/gpt-4o``
    and ``gpt-4o`` are one row."""
    guard = open_guard(args)
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    try:
        rows = guard.usage(since=since, until=until, group_by=args.by, scope=args.scope)
    finally:
        guard.ledger.close()
    if args.by == "model":
        rows = by_bare_model(rows)
    emit(
        args,
        [args.by, "requests", "denied", "input", "output", "cached", "tokens", "usd"],
        [
            [
                r.key,
                r.requests,
                r.denied,
                f"{r.input_tokens:,}",
                f"{r.output_tokens:,}",
                f"{r.cached_input_tokens:,}",
                f"{r.tokens:,}",
                f"${r.usd:,.4f}",
            ]
            for r in rows
        ],
        [
            {
                args.by: r.key,
                "requests": r.requests,
                "denied": r.denied,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "cached_input_tokens": r.cached_input_tokens,
                "tokens": r.tokens,
                "usd": r.usd,
            }
            for r in rows
        ],
    )
    return 0


def by_bare_model(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """Report rows by model merged under the bare model name (``openai/gpt-4o`` and
    ``gpt-4o`` are one row, see :func:`~tb_plugins.core.models.bare_model`): every count
    summed, rows sorted by name."""
    merged: dict[str, UsageRow] = {}
    for row in rows:
        key = bare_model(row.key)
        seen = merged.get(key)
        if seen is None:
            merged[key] = replace(row, key=key)
        else:
            sums = {
                f.name: getattr(seen, f.name) + getattr(row, f.name)
                for f in fields(row)
                if f.name != "key"
            }
            merged[key] = replace(seen, **sums)
    return sorted(merged.values(), key=lambda r: r.key)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the usage log (``--since`` / ``--until``), the policy's budgets and their status
    now into the SQLite file FILE, for ``sqlite-utils`` and Datasette: tables ``usage`` (one
    row per call or refusal, keyed by reservation id), ``usage_scopes`` (one row per scope of
    a call: totals per scope are a GROUP BY), ``budgets`` and ``status``. Exporting to the same
    file again replaces those four tables. Needs ``pip install 'tb-plugins[export]'``."""
    import sqlite3

    from tb_plugins._lazy import require
    from tb_plugins.export import export_database

    try:
        require("sqlite_utils", "export")
    except ImportError as exc:
        print(f"tb: {exc}", file=sys.stderr)
        return 1
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    guard = open_guard(args)
    try:
        counts = export_database(guard, args.file, since=since, until=until)
    except sqlite3.Error as exc:
        print(escape_text(f"tb: {args.file}: cannot write the export ({exc})"), file=sys.stderr)
        return 1
    finally:
        guard.ledger.close()
    print(
        escape_text(
            f"{args.file}: {counts['usage']} usage records, {counts['budgets']} budgets, "
            f"{counts['status']} status rows"
        )
    )
    return 0


def add_parser(sub: Any) -> None:
    """Register ``tb report`` and ``tb export``."""
    p = sub.add_parser(
        "report", help="usage totals by scope, model or day", description=cmd_report.__doc__
    )
    p.add_argument("--since", help="start: 24h, 7d, 2026-11-01, or epoch seconds")
    p.add_argument("--until", help="end, in the same forms")
    p.add_argument(
        "--by",
        choices=REPORT_KINDS,
        default="scope",
        help="group by scope, model, day, or the scopes of one kind (default: scope)",
    )
    p.add_argument("--scope", help="only calls charged to this scope")
    config_option(p, after_command=True)
    output_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export",
        help="usage log, budgets and status as a SQLite database",
        description=cmd_export.__doc__,
    )
    p.add_argument("file", metavar="FILE", help="the SQLite file to write, e.g. usage.db")
    p.add_argument("--since", help="start: 24h, 7d, 2026-11-01, or epoch seconds")
    p.add_argument("--until", help="end, in the same forms")
    config_option(p, after_command=True)
    p.set_defaults(func=cmd_export)
