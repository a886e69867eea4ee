"""The ``tb`` command: status, reports, exports, policy checks, and the offline demo.

``tb status``, ``tb report`` and ``tb export`` read the policy named by ``--config FILE``
(before or after the command: ``tb --config b.yaml status`` or ``tb status --config b.yaml``)
or ``$TB_PLUGINS_CONFIG`` (default ``./budgets.yaml``) and the ledger that policy names.
Output is a table, or ``--json`` / ``--csv``. ``tb --version`` prints the package's version.

Scope and model names are whatever the application sent, so nothing from the ledger reaches
the terminal raw: tables, CSV and error messages write control characters as ``\\xNN``
escapes (:func:`~tb_plugins.core.scopes.escape_text`), and JSON escapes them as ``\\uNNNN``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tb_plugins._format import bar, fmt_amount, fmt_clock, fmt_span, redact_url, table
from tb_plugins.core.models import bare_model
from tb_plugins.core.scopes import escape_text
from tb_plugins.errors import ConfigError, TokenBudgetError

if TYPE_CHECKING:
    from tb_plugins.core.usage import UsageRow
    from tb_plugins.engine.decision import BudgetStatus

__all__ = ["main"]

DEFAULT_CONFIG = "budgets.yaml"


def emit(
    args: argparse.Namespace,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    records: Sequence[dict[str, Any]],
    *,
    width: int | None = None,
) -> None:
    """Print rows as a table, JSON (``--json``) or CSV (``--csv``); a table wider than
    ``width`` has its first column cut to fit.

    No output form prints a raw control character: JSON escapes them itself, tables and CSV
    through :func:`~tb_plugins.core.scopes.escape_text`.
    """
    if getattr(args, "json", False):
        print(json.dumps(list(records), indent=2, default=str))
    elif getattr(args, "csv", False):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else list(headers))
        writer.writeheader()
        writer.writerows(
            {k: escape_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in records
        )
        print(buf.getvalue(), end="")
    elif rows:
        print(table(headers, rows, width=width))
    else:
        print("(nothing to show)")


def output_options(parser: argparse.ArgumentParser, *, csv_too: bool = True) -> None:
    """Add the shared ``--json`` (and ``--csv``) options."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print JSON")
    if csv_too:
        group.add_argument("--csv", action="store_true", help="print CSV")


def config_option(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """Add ``--config FILE``, to ``tb`` itself and to every command that reads the policy, so
    it may stand before or after the command. After the command it sets nothing unless given
    (``SUPPRESS``), so it does not undo one given before; given in both places, the later wins.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS if after_command else None,
        help=f"policy file (default: $TB_PLUGINS_CONFIG or {DEFAULT_CONFIG})",
    )


def package_version() -> str:
    """The installed distribution's version, or the package's own when not installed."""
    try:
        return importlib.metadata.version("tb-plugins")
    except importlib.metadata.PackageNotFoundError:
        from tb_plugins import __version__

        return __version__


def parse_since(text: str, now: float | None = None) -> float:
    """``24h`` / ``7d`` ago, an ISO date or datetime (UTC if no zone), or epoch seconds."""
    from tb_plugins.core.windows import parse_duration

    now = time.time() if now is None else now
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use e.g. 24h, 7d, 2026-11-01 or 2026-11-01T08:00"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _guard(args: argparse.Namespace) -> Any:
    from tb_plugins.engine import BudgetGuard

    path = args.config or os.environ.get("TB_PLUGINS_CONFIG") or DEFAULT_CONFIG
    if not os.path.exists(path):
        raise ConfigError(
            f"{path}: no policy file; pass --config FILE or set TB_PLUGINS_CONFIG", source=path
        )
    return BudgetGuard.from_config(path)


def cmd_status(args: argparse.Namespace) -> int:
    """Show every budget's use (a bar), spend, what is left, how long until it resets and, at
    the burn rate of the last hour, when it runs out (UTC; ``now`` if spent, ``-`` if not
    before it resets). The table fits 80 columns: a scope name too long for its row goes
    on its own line above it; ``--json`` and ``--csv`` carry every field."""
    guard = _guard(args)
    try:
        now = guard.now()
        rows = guard.status(args.scope)
    finally:
        guard.ledger.close()
    emit(
        args,
        ["scope", "budget", "used", "spent", "left", "resets", "runs out"],
        [
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
        ],
        [s.to_dict() for s in rows],
        width=STATUS_WIDTH,
    )
    return 0


STATUS_WIDTH = 80
"""The widest line of the ``tb status`` table."""


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


def cmd_report(args: argparse.Namespace) -> int:
    """Show totals from the usage log, grouped by scope, model, day, or the scopes of one kind
    (``--by user``: one row per user). Models are grouped by their bare name: ``openai/gpt-4o``
    and ``gpt-4o`` are one row."""
    guard = _guard(args)
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
    guard = _guard(args)
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


def cmd_budgets_check(args: argparse.Namespace) -> int:
    """Validate a policy file and list its budgets."""
    from tb_plugins.config import load_policy

    policy = load_policy(args.file)
    budgets = policy.compiled_budgets()
    emit(
        args,
        ["#", "budget", "window", "alerts", "downgrade_at"],
        [
            [
                b.index,
                b.name,
                b.window.spec,
                ",".join(f"{t:.0%}" for t in b.alerts) or "-",
                f"{b.downgrade_at:.0%}" if b.downgrade_at else "-",
            ]
            for b in budgets
        ],
        [
            {
                "index": b.index,
                "name": b.name,
                "scope": b.pattern,
                "window": b.window.spec,
                "alerts": list(b.alerts),
                "downgrade_at": b.downgrade_at,
            }
            for b in budgets
        ],
    )
    if not args.json:
        ledger = redact_url(policy.ledger)
        print(escape_text(f"{args.file}: ok ({len(budgets)} budgets, ledger {ledger})"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the offline end-to-end demo: a fake OpenAI server on 127.0.0.1, a LangChain agent
    and LiteLLM calls walking one policy through allow, alert, downgrade, clamp, deny and an
    agent-loop cutoff, then the status table and the report."""
    from tb_plugins.demo import run_demo

    report = run_demo(args.keep, quiet=args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(
            f"\ndone in {report.seconds:.1f} s"
            + (
                f"; policy and ledger kept in {report.workdir} "
                f"(try: tb --config {report.workdir}/budgets.yaml status)"
                if report.workdir
                else ""
            )
        )
    return 0 if report.ledger_tokens == report.server_tokens else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``tb`` argument parser (every command has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="tb", description="Token budgets for LLM applications: status, reports, demo."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    config_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "status", help="spend, holds and limits of every budget now", description=cmd_status.__doc__
    )
    p.add_argument("--scope", help="only this scope, e.g. team:search")
    config_option(p, after_command=True)
    output_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "report", help="usage totals by scope, model or day", description=cmd_report.__doc__
    )
    p.add_argument("--since", help="start: 24h, 7d, 2026-11-01, or epoch seconds")
    p.add_argument("--until", help="end, in the same forms")
    p.add_argument(
        "--by",
        choices=[
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
        ],
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

    p = sub.add_parser("demo", help="the offline end-to-end demo", description=cmd_demo.__doc__)
    p.add_argument("--keep", metavar="DIR", help="keep the policy and the ledger in DIR")
    output_options(p, csv_too=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "budgets", help="work with policy files", description="Work with policy files."
    )
    bsub = p.add_subparsers(dest="budgets_command", metavar="SUBCOMMAND")
    c = bsub.add_parser(
        "check", help="validate a policy file", description=cmd_budgets_check.__doc__
    )
    c.add_argument("file", help="the policy file, e.g. budgets.yaml")
    output_options(c, csv_too=False)
    c.set_defaults(func=cmd_budgets_check)
    budgets_parser = p

    def budgets_help(_args: argparse.Namespace) -> int:
        budgets_parser.print_help()
        return 2

    p.set_defaults(func=budgets_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tb`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (TokenBudgetError, ValueError) as exc:
        # A message may quote a scope or a file's text: escape all but its line breaks.
        print("\n".join(escape_text(line) for line in f"tb: {exc}".split("\n")), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
