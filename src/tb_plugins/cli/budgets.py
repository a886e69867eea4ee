"""``tb budgets``: check a policy file."""

from __future__ import annotations

import argparse
from typing import Any

from tb_plugins._format import redact_url
from tb_plugins.cli.common import emit, output_options
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


def add_parser(sub: Any) -> None:
    """Register ``tb budgets`` and its subcommands."""
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

    def budgets_help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=budgets_help)
