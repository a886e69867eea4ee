"""What every ``tb`` command shares: the output forms, ``--config``, reading times, and
opening the guard the policy names.

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
import time
from collections.abc import Sequence
from typing import Any

from tb_plugins._format import table
from tb_plugins.core.scopes import escape_text
from tb_plugins.core.windows import parse_time
from tb_plugins.errors import ConfigError

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
    return parse_time(text, time.time() if now is None else now, ahead=False)


def parse_until(text: str, now: float | None = None) -> float:
    """``2h`` / ``7d`` from now, an ISO date or datetime (UTC if no zone), or epoch seconds."""
    return parse_time(text, time.time() if now is None else now, ahead=True)


def port_number(text: str) -> int:
    """An ``argparse`` type: a TCP port, 0 to 65535 (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, not {port}")
    return port


def open_guard(args: argparse.Namespace) -> Any:
    from tb_plugins.engine import BudgetGuard

    path = args.config or os.environ.get("TB_PLUGINS_CONFIG") or DEFAULT_CONFIG
    if not os.path.exists(path):
        raise ConfigError(
            f"{path}: no policy file; pass --config FILE or set TB_PLUGINS_CONFIG", source=path
        )
    return BudgetGuard.from_config(path)
