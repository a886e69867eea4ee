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
    (``--by user``: one row per user): the calls that ran (``reqs``), their input, output and
    cached tokens, dollars and dollars per call, and the decisions taken: ``clamp`` (output
    cap lowered), ``down`` (sent to a cheaper model), ``deny`` (refused, not in ``reqs``).
    Models are grouped by their bare name: ``openai/gpt-4o`` and ``gpt-4o`` are one row. The
    table fits 80 columns, large counts rounded (``1.2M``) and a name too long for its row
    on its own line above it; ``--json`` and ``--csv`` carry every field exactly, ``tokens``
    (input + output) and ``allowed`` (neither clamped nor downgraded) too.

    ``--shadow`` counts instead what enforcement would have done with the calls let through by
    budgets in ``mode: shadow``: ``shadow`` calls with a verdict, of which enforcement would
    have allowed, clamped, downgraded and denied so many, and what the would-be denials spent
    (``deny tok``, ``deny usd``)."""
    guard = open_guard(args)
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    if args.shadow:
        return _report_shadow(args, guard, since, until)
    try:
        rows = guard.usage(since=since, until=until, group_by=args.by, scope=args.scope)
    finally:
        guard.ledger.close()
    if args.by == "model":
        rows = by_bare_model(rows)
    emit(
        args,
        [args.by, *REPORT_HEADERS],
        [
            [
                r.key,
                count_text(r.requests),
                count_text(r.input_tokens),
                count_text(r.output_tokens),
                count_text(r.cached_input_tokens),
                usd_text(r.usd),
                usd_text(r.usd_per_request),
                count_text(r.clamped),
                count_text(r.downgraded),
                count_text(r.denied),
            ]
            for r in rows
        ],
        [report_record(r, args.by) for r in rows],
        width=REPORT_WIDTH,
    )
    return 0


REPORT_HEADERS = ("reqs", "input", "output", "cached", "usd", "usd/req", "clamp", "down", "deny")
"""The ``tb report`` table's columns after the key: requests, tokens, dollars, then the
decisions other than allow (``down``: downgraded)."""

REPORT_WIDTH = 80
"""The widest line of the ``tb report`` table."""

SHADOW_HEADERS = ("reqs", "shadow", "allow", "clamp", "down", "deny", "deny tok", "deny usd")
"""The ``tb report --shadow`` table's columns after the key: calls that ran, those with a
shadow verdict, what enforcement would have done with them, and what the would-be denials
spent."""


def _report_shadow(
    args: argparse.Namespace, guard: Any, since: float | None, until: float | None
) -> int:
    from tb_plugins.engine.shadow import shadow_rows
    from tb_plugins.engine.usage_log import iter_records

    try:
        records = iter_records(guard.ledger, since=since, until=until)
        if args.scope is not None:
            records = (r for r in records if args.scope in r.scopes)
        rows = shadow_rows(records, args.by)
    finally:
        guard.ledger.close()
    emit(
        args,
        [args.by, *SHADOW_HEADERS],
        [
            [
                r.key,
                *(count_text(n) for n in (r.requests, r.shadowed, r.would_allow, r.would_clamp)),
                *(count_text(n) for n in (r.would_downgrade, r.would_deny, r.would_deny_tokens)),
                usd_text(r.would_deny_usd),
            ]
            for r in rows
        ],
        [r.to_dict(args.by) for r in rows],
        width=REPORT_WIDTH,
    )
    return 0


def report_record(row: UsageRow, key: str = "key") -> dict[str, Any]:
    """Every field of a report row, for ``--json`` and ``--csv``: the key under ``key``,
    counts, tokens, dollars, dollars per request and the decisions (``allowed`` +
    ``clamped`` + ``downgraded`` = ``requests``; ``denied`` calls did not run)."""
    return {
        key: row.key,
        "requests": row.requests,
        "allowed": row.allowed,
        "clamped": row.clamped,
        "downgraded": row.downgraded,
        "denied": row.denied,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "tokens": row.tokens,
        "usd": row.usd,
        "usd_per_request": row.usd_per_request,
    }


def count_text(n: int) -> str:
    """A count in at most five characters: ``9,999``, then ``12.3k``, ``456k``, ``1.2M``."""
    if n < 10_000:
        return f"{n:,}"
    for suffix, size in (("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        text = f"{n / size:.3g}"
        if float(text) < 1000:
            return text + suffix
    return f"{n / 1e15:.0f}P"  # 2**63 is 9223P


def usd_text(x: float) -> str:
    """Dollars in at most seven characters: ``$0.0048``, ``$12.34``, ``$1,234``, ``$56.7k``
    (a negative amount, e.g. a saving that is an extra cost, one more: ``-$1.20``)."""
    if x == 0:
        return "$0"
    if x < 0:
        return "-" + usd_text(-x)
    if x < 1:
        return f"${x:.4f}"
    if x < 100:
        return f"${x:.2f}"
    if x < 10_000:
        return f"${x:,.0f}"
    return "$" + count_text(round(x))


def by_bare_model(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """Report rows by model merged under the bare model name (``openai/gpt-4o`` and
    ``gpt-4o`` are one row, see :func:`~tb_plugins.core.models.bare_model`): every count
    (requests, decisions, tokens, dollars) summed, rows sorted by name."""
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
        "report",
        help="usage, dollars and decisions by scope, model or day",
        description=cmd_report.__doc__,
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
    p.add_argument(
        "--shadow",
        action="store_true",
        help="what enforcement would have done with calls let through in mode: shadow",
    )
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
