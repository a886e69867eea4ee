"""``tb serve``: the read-only dashboard of the policy's budgets and usage log."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, TextIO

from tb_plugins.cli.common import config_option, open_guard, port_number
from tb_plugins.core.scopes import escape_text

if TYPE_CHECKING:
    from tb_plugins.engine import BudgetGuard


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the dashboard on http://HOST:PORT/ (default http://127.0.0.1:8765/) until Ctrl-C:
    each budget's bar and forecast, spend over time per scope, the decisions timeline and the
    top spenders, refreshed every few seconds, and the JSON they come from (/api/status,
    /api/usage). Read-only, and without a login: bind another host than 127.0.0.1 only on a
    network you trust."""
    return serve_guard(open_guard(args), args.host, args.port)


def serve_guard(guard: BudgetGuard, host: str, port: int, *, banner: TextIO | None = None) -> int:
    """Serve ``guard``'s dashboard until Ctrl-C, then close its ledger. The address goes to
    ``banner`` (default stdout). Returns the exit status: 1 when the address cannot be bound."""
    from tb_plugins.dashboard import DashboardServer

    out = banner or sys.stdout
    try:
        try:
            server = DashboardServer(guard, host=host, port=port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            print(escape_text(f"tb: cannot serve on {host}:{port} ({reason})"), file=sys.stderr)
            return 1
        print(f"tb dashboard on {server.url} (read-only; Ctrl-C stops it)", file=out, flush=True)
        if not server.loopback:
            print(
                f"tb: warning: {host} is not a loopback address and the dashboard has no login; "
                f"whoever reaches it reads every budget and the usage log",
                file=sys.stderr,
            )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("tb dashboard stopped", file=out, flush=True)
        finally:
            server.server_close()
    finally:
        guard.ledger.close()
    return 0


def server_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--host`` and ``--port`` (shared with ``tb demo --serve``)."""
    # The defaults are tb_plugins.dashboard's, written out: importing it here would load
    # http.server for every tb command.
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=8765,
        help="port to listen on (default 8765; 0: any free port)",
    )


def add_parser(sub: Any) -> None:
    """Register ``tb serve``."""
    p = sub.add_parser(
        "serve", help="the read-only dashboard in a browser", description=cmd_serve.__doc__
    )
    server_options(p)
    config_option(p, after_command=True)
    p.set_defaults(func=cmd_serve)
