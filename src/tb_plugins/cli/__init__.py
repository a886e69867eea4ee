"""The ``tb`` command: status, reports, exports, policy checks, and the offline demo.

``tb status``, ``tb report`` and ``tb export`` read the policy named by ``--config FILE``
(before or after the command: ``tb --config b.yaml status`` or ``tb status --config b.yaml``)
or ``$TB_PLUGINS_CONFIG`` (default ``./budgets.yaml``) and the ledger that policy names.
Output is a table, or ``--json`` / ``--csv``. ``tb --version`` prints the package's version.

A module per command group registers its subcommands (``add_parser(sub)``); nothing
from the ledger reaches the terminal raw (see :mod:`tb_plugins.cli.common`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tb_plugins.cli import budgets, demo, metrics, replay, report, serve, status, watch
from tb_plugins.cli.common import config_option, package_version, parse_since
from tb_plugins.cli.report import by_bare_model
from tb_plugins.core.scopes import escape_text
from tb_plugins.errors import TokenBudgetError

__all__ = ["build_parser", "by_bare_model", "main", "package_version", "parse_since"]

COMMANDS = (status, watch, report, replay, budgets, serve, metrics, demo)
"""The modules whose ``add_parser`` builds the ``tb`` subcommands, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``tb`` argument parser (every command has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="tb", description="Token budgets for LLM applications: status, reports, demo."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    config_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
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
    except BrokenPipeError:  # `tb report --json | head`: the reader has had enough
        sys.stderr.close()
        return 0
    except (TokenBudgetError, ValueError) as exc:
        # A message may quote a scope or a file's text: escape all but its line breaks.
        print("\n".join(escape_text(line) for line in f"tb: {exc}".split("\n")), file=sys.stderr)
        return 1
