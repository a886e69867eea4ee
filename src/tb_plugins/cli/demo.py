"""``tb demo``: the offline end-to-end demo (``--serve``: then its dashboard)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tb_plugins.cli.common import output_options
from tb_plugins.cli.serve import serve_guard, server_options


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the offline end-to-end demo: a fake OpenAI server on 127.0.0.1, a LangChain agent
    and LiteLLM calls walking one policy through allow, alert, downgrade, clamp, deny and an
    agent-loop cutoff, then the status table and the report. With ``--serve``, then serve
    the dashboard of the demo's ledger (see ``tb serve``) until Ctrl-C."""
    from tb_plugins.demo import run_demo

    with contextlib.ExitStack() as stack:
        workdir = args.keep
        if args.serve and workdir is None:  # the dashboard reads the ledger after the demo
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tb-demo-"))
        report = run_demo(workdir, quiet=args.json)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, default=str), flush=True)
        else:
            print(
                f"\ndone in {report.seconds:.1f} s"
                + (
                    f"; policy and ledger kept in {report.workdir} "
                    f"(try: tb --config {report.workdir}/budgets.yaml status)"
                    if args.keep
                    else ""
                ),
                flush=True,
            )
        status = 0 if report.ledger_tokens == report.server_tokens else 1
        if args.serve:
            from tb_plugins.engine import BudgetGuard

            guard = BudgetGuard.from_config(Path(report.workdir) / "budgets.yaml")
            # under --json, stdout holds only the JSON
            served = serve_guard(
                guard, args.host, args.port, banner=sys.stderr if args.json else None
            )
            status = status or served
    return status


def add_parser(sub: Any) -> None:
    """Register ``tb demo``."""
    p = sub.add_parser("demo", help="the offline end-to-end demo", description=cmd_demo.__doc__)
    p.add_argument("--keep", metavar="DIR", help="keep the policy and the ledger in DIR")
    p.add_argument(
        "--serve",
        action="store_true",
        help="then serve the dashboard of the demo's ledger until Ctrl-C (see tb serve)",
    )
    server_options(p)
    output_options(p, csv_too=False)
    p.set_defaults(func=cmd_demo)
