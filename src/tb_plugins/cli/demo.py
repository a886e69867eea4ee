"""``tb demo``: the offline end-to-end demo."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tb_plugins.cli.common import output_options


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


def add_parser(sub: Any) -> None:
    """Register ``tb demo``."""
    p = sub.add_parser("demo", help="the offline end-to-end demo", description=cmd_demo.__doc__)
    p.add_argument("--keep", metavar="DIR", help="keep the policy and the ledger in DIR")
    output_options(p, csv_too=False)
    p.set_defaults(func=cmd_demo)
