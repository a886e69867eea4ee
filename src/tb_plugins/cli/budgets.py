"""``tb budgets``: check a policy file, and change budgets while guards run.

``set``, ``unset``, ``list`` and ``history`` work on the runtime overrides kept in the ledger
that the policy (``--config``) names; every guard sharing that ledger applies a change within
its ``override_refresh`` (default 5 seconds), with no restart."""

from __future__ import annotations

import argparse
from typing import Any

from tb_plugins._format import fmt_time, redact_url
from tb_plugins.cli.common import config_option, emit, open_guard, output_options, parse_until
from tb_plugins.core.scopes import escape_text


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


def cmd_budgets_set(args: argparse.Namespace) -> int:
    """Set a budget for SCOPE (a scope or pattern) in every guard sharing the ledger: LIMIT as
    in the policy file (``'3M tokens/day'``, ``'$5/month'``), or ``0`` to suspend the scope.
    An override on a concrete scope wins over a pattern for that scope, and over the file's
    budgets of its window for the units it limits (it may raise a limit as well as lower it).
    """
    guard = open_guard(args)
    try:
        until = parse_until(args.until, guard.now()) if args.until else None
        change = guard.set_budget(
            args.scope, args.limit, window=args.window, until=until, reason=args.reason,
            actor=args.actor,
        )  # fmt: skip
    finally:
        guard.ledger.close()
    ends = "" if change.until is None else f" until {_when(change.until)}"
    what = "suspended" if change.suspends else f"set to {change.limit}"
    print(escape_text(f"{change.scope} ({change.window}) {what}{ends} [override {change.version}]"))
    return 0


def cmd_budgets_unset(args: argparse.Namespace) -> int:
    """Remove the override of SCOPE (in ``--window``, else in every window): the policy
    file's budgets apply again."""
    guard = open_guard(args)
    try:
        change = guard.unset_budget(
            args.scope, window=args.window, reason=args.reason, actor=args.actor
        )
    finally:
        guard.ledger.close()
    where = f" ({change.window})" if change.window else ""
    print(escape_text(f"{change.scope}{where}: override removed [override {change.version}]"))
    return 0


def cmd_budgets_list(args: argparse.Namespace) -> int:
    """The budgets in force: the policy file's and the overrides, marked by source."""
    guard = open_guard(args)
    try:
        entries = guard.budgets()
    finally:
        guard.ledger.close()
    emit(
        args,
        ["scope", "window", "limit", "source", "until", "reason"],
        [[e.scope, e.window, e.limit, e.source, _when(e.until), e.reason or "-"] for e in entries],
        [e.to_dict() for e in entries],
    )
    return 0


def cmd_budgets_history(args: argparse.Namespace) -> int:
    """The audit trail of the overrides: when, who, the limit before and after, and why."""
    guard = open_guard(args)
    try:
        entries = guard.budget_history(args.scope)
    finally:
        guard.ledger.close()
    emit(
        args,
        ["when", "who", "scope", "window", "before", "after", "reason"],
        [
            [
                _when(h.change.ts),
                h.change.actor,
                h.change.scope,
                h.change.window or "all",
                "-" if h.before is None else _limit(h.before.limit),
                _limit(h.change.limit) if h.change.action == "set" else "(unset)",
                h.change.reason or "-",
            ]
            for h in entries
        ],
        [h.to_dict() for h in entries],
    )
    return 0


def _change_options(parser: argparse.ArgumentParser, *, window: str) -> None:
    """``--window``, ``--reason``, ``--actor`` and ``--config`` of ``set`` and ``unset``."""
    parser.add_argument("--window", help=window)
    parser.add_argument("--reason", help="why (kept in the history)")
    parser.add_argument("--actor", help="who (default: user@host)")
    config_option(parser, after_command=True)


def _limit(limit: str | None) -> str:
    return "suspended" if limit == "0" else limit or "-"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return fmt_time(ts)


def add_parser(sub: Any) -> None:
    """Register ``tb budgets`` and its subcommands."""
    p = sub.add_parser(
        "budgets",
        help="check a policy file; set, list and audit budget overrides",
        description=__doc__,
    )
    bsub = p.add_subparsers(dest="budgets_command", metavar="SUBCOMMAND")
    c = bsub.add_parser(
        "check", help="validate a policy file", description=cmd_budgets_check.__doc__
    )
    c.add_argument("file", help="the policy file, e.g. budgets.yaml")
    output_options(c, csv_too=False)
    c.set_defaults(func=cmd_budgets_check)

    c = bsub.add_parser(
        "set", help="set a budget while guards run", description=cmd_budgets_set.__doc__
    )
    c.add_argument("scope", metavar="SCOPE", help="e.g. team:search, key:ci-bot or user:*")
    c.add_argument("limit", metavar="LIMIT", help="e.g. '3M tokens/day', '$5/month', or 0")
    c.add_argument("--until", help="when it stops applying: 2h, 7d, 2026-12-24T00:00")
    _change_options(c, window="the window, when LIMIT names none (e.g. day)")
    c.set_defaults(func=cmd_budgets_set)

    c = bsub.add_parser("unset", help="remove an override", description=cmd_budgets_unset.__doc__)
    c.add_argument("scope", metavar="SCOPE")
    _change_options(c, window="only this window's override")
    c.set_defaults(func=cmd_budgets_unset)

    c = bsub.add_parser(
        "list",
        help="the budgets in force, file and overrides",
        description=cmd_budgets_list.__doc__,
    )
    config_option(c, after_command=True)
    output_options(c)
    c.set_defaults(func=cmd_budgets_list)

    c = bsub.add_parser(
        "history", help="the overrides' audit trail", description=cmd_budgets_history.__doc__
    )
    c.add_argument("--scope", help="only this scope's changes")
    config_option(c, after_command=True)
    output_options(c)
    c.set_defaults(func=cmd_budgets_history)

    def budgets_help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=budgets_help)
