"""``tb replay``: the usage log run through another policy (see
:mod:`tb_plugins.engine.replay`)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tb_plugins._format import fmt_time
from tb_plugins.cli.common import config_option, emit, open_guard, output_options, parse_since
from tb_plugins.cli.report import REPORT_WIDTH, count_text, usd_text

REPLAY_HEADERS = ("budget", "calls", "allow", "clamp", "down", "deny", "tok saved", "usd saved")
"""The ``tb replay`` table's columns: the budget, the calls it applies to, what it would have
done with them, and the tokens and dollars it would have saved."""


def cmd_replay(args: argparse.Namespace) -> int:
    """Run the calls of the usage log (of the ledger the current policy, ``--config``, names)
    through the policy ``--policy NEW.yaml``, oldest first, in memory: nothing is written.
    Per budget of the new policy: the calls it applies to, how many it would have allowed,
    clamped, downgraded (``down``) and denied, and the tokens and dollars it would have saved
    (what the denied calls spent, what the clamps and downgrades cut). A call stopped by
    several budgets is put on the one that binds. Every budget is replayed as enforced, ``mode:
    shadow`` or not; refusals in the log have no usage and are not replayed. A call recorded
    in shadow mode is replayed with the estimate the guard held; any other with what it used.
    ``--json`` carries every field (see docs/replay.md)."""
    from tb_plugins.config import load_policy
    from tb_plugins.engine.replay import Replay, iter_records

    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    new = load_policy(args.policy)
    replayer = Replay(new)
    guard = open_guard(args)
    start = time.perf_counter()
    try:
        replayer.feed(iter_records(guard.ledger, since=since, until=until))
    finally:
        guard.ledger.close()
    result = replayer.report()
    seconds = time.perf_counter() - start
    if getattr(args, "json", False):
        out = {"policy": args.policy, **result.to_dict(), "seconds": round(seconds, 3)}
        print(json.dumps(out, indent=2))
        return 0
    span = (
        f" from {fmt_time(result.since)} to {fmt_time(result.until)}"
        if result.since is not None
        else ""
    )
    print(f"{result.replayed:,} calls replayed{span}")
    if result.not_replayed:
        print(f"{result.not_replayed:,} refusals in the log not replayed (they did not run)")
    rows: list[list[Any]] = [
        [
            t.budget,
            count_text(t.calls),
            count_text(t.allowed),
            count_text(t.clamped),
            count_text(t.downgraded),
            count_text(t.denied),
            count_text(t.tokens_saved),
            usd_text(t.usd_saved),
        ]
        for t in (*result.budgets, result.totals)
    ]
    emit(args, REPLAY_HEADERS, rows if result.replayed else [], [], width=REPORT_WIDTH)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``tb replay``."""
    p = sub.add_parser(
        "replay",
        help="what another policy would have done with the recorded calls",
        description=cmd_replay.__doc__,
    )
    p.add_argument(
        "--policy", required=True, metavar="NEW.yaml", help="the policy to replay the calls through"
    )
    p.add_argument("--since", help="start: 24h, 7d, 2026-11-01, or epoch seconds")
    p.add_argument("--until", help="end, in the same forms")
    config_option(p, after_command=True)
    output_options(p, csv_too=False)
    p.set_defaults(func=cmd_replay)
