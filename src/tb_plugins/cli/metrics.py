"""``tb metrics serve``: the policy's budgets as a Prometheus endpoint of their own."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from typing import Any

from tb_plugins._lazy import require
from tb_plugins.cli.common import config_option, open_guard, port_number
from tb_plugins.core.scopes import escape_text


def cmd_metrics_serve(args: argparse.Namespace) -> int:
    """Serve the budgets of the policy's ledger at ``http://HOST:PORT/metrics`` for
    Prometheus, until interrupted (Ctrl-C or SIGTERM).

    Every scrape reads the ledger: ``tb_budget_utilization`` and ``tb_budget_remaining`` per
    budget, and ``tb_tokens_total`` and ``tb_cost_usd_total`` per model from the usage log,
    for every process that shares the ledger. ``tb_decisions_total`` is counted only by the
    processes that decide (``tb_plugins.metrics.register`` in the application, or the LiteLLM
    proxy's own ``/metrics``). Scopes of a pattern budget such as ``user:*`` are shown under
    the pattern unless ``--per-scope PATTERN`` asks for each one. Binds 127.0.0.1 unless
    ``--host`` says otherwise; ``--port 0`` picks a free port (printed on the first line)."""
    try:
        require("prometheus_client", "metrics")
    except ImportError as exc:
        print(escape_text(f"tb: {exc}"), file=sys.stderr)
        return 1
    from prometheus_client import CollectorRegistry, start_http_server

    from tb_plugins.metrics import register

    guard = open_guard(args)
    registry = CollectorRegistry()
    register(guard, registry, per_scope=args.per_scope, counters="ledger")
    try:
        server, thread = start_http_server(args.port, addr=args.host, registry=registry)
    except OSError as exc:
        guard.close()
        reason = exc.strerror or str(exc)
        print(
            escape_text(f"tb: cannot serve on {args.host}:{args.port} ({reason})"), file=sys.stderr
        )
        return 1
    if not _loopback(args.host):
        print(
            f"tb: warning: {args.host} is not a loopback address and /metrics has no login; "
            f"whoever reaches it reads every budget",
            file=sys.stderr,
        )
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tb: serving http://{host}:{server.server_port}/metrics (Ctrl-C stops)", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        guard.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def add_parser(sub: Any) -> None:
    """Register ``tb metrics`` and its subcommands."""
    p = sub.add_parser(
        "metrics",
        help="Prometheus metrics of the budgets",
        description="Prometheus metrics of the budgets.",
    )
    msub = p.add_subparsers(dest="metrics_command", metavar="SUBCOMMAND")
    s = msub.add_parser(
        "serve",
        help="serve /metrics for Prometheus",
        description=cmd_metrics_serve.__doc__,
    )
    s.add_argument("--port", type=port_number, required=True, help="the port (0: any free one)")
    s.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1)")
    s.add_argument(
        "--per-scope",
        action="append",
        default=[],
        metavar="PATTERN",
        help="label each scope matching PATTERN on its own, e.g. 'team:*' (repeatable)",
    )
    config_option(s, after_command=True)
    s.set_defaults(func=cmd_metrics_serve)

    def metrics_help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=metrics_help)
