"""What pacing (``pace: even``) and priorities (``stop_at``) add to a guard cycle.

    python benchmarks/bench_pacing.py [--reps 30] [--batch 200] [--json]

A guard cycle is check + settle on a 4-scope path (global, team, user, agent; the user one of
100) with ``input_tokens`` given, so no tokenizer runs. Each variant has a guard and a ledger
of its own; the variants are timed in the same run, alternating, in batches of ``--batch``
cycles, in an order that rotates each repetition. Times are per cycle, medians over the
repetitions of the benchmark thread's CPU time, and wall time. The ratio is the median, over
repetitions, of a variant's CPU time over the baseline's in the same repetition.

* ``plain`` (the baseline): no budget paced, no ``stop_at``: the planner's cached lines.
* ``+ stop_at``: the team budget has ``stop_at: {low: 0.6, normal: 0.9}``; calls alternate
  ``normal`` and ``low`` priority.
* ``+ pace + stop_at``: the team and agent budgets are also paced (``pace: even``,
  ``burst: 0.1``): their lines are shaped on every call.

Limits are far above what the benchmark spends, so every call is allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_rows

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "gpt-4o"
BIG = 10**12
STOP_AT = {"low": 0.6, "normal": 0.9}
PACE = {"pace": "even", "burst": 0.1}
USERS = [f"user:u{i}" for i in range(100)]


def policy(url: str, *, stop_at: bool, pace: bool) -> dict[str, Any]:
    team: dict[str, Any] = {"scope": "team:*", "tokens": BIG, "window": "day"}
    agent: dict[str, Any] = {"scope": "agent:*", "tokens": BIG, "window": "day"}
    if stop_at:
        team["stop_at"] = STOP_AT
    if pace:
        team.update(PACE)
        agent.update(PACE)
    return {
        "ledger": url,
        "alerts": [],
        "budgets": [
            {"scope": "global", "tokens": BIG, "window": "month"},
            team,
            {"scope": "user:*", "tokens": BIG, "window": "rolling:1m"},
            agent,
        ],
    }


class Variant:
    def __init__(self, name: str, url: str, *, stop_at: bool, pace: bool) -> None:
        from tb_plugins import BudgetGuard

        self.name = name
        self.guard = BudgetGuard.from_dict(policy(url, stop_at=stop_at, pace=pace))
        self.priorities = ("normal", "low") if stop_at else ("normal", "normal")
        self.i = 0

    def batch(self, n: int) -> tuple[float, float]:
        """Seconds per cycle over ``n`` cycles: this thread's CPU time, and wall time."""
        from tb_plugins import Usage

        guard, priorities = self.guard, self.priorities
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            self.i += 1
            scopes = ["team:search", USERS[self.i % 100], "agent:planner"]
            d = guard.check(
                model=MODEL,
                input_tokens=800,
                max_tokens=256,
                scopes=scopes,
                priority=priorities[self.i & 1],
            )
            guard.settle(d, Usage(input_tokens=800, output_tokens=200))
        return (time.thread_time() - c0) / n, (time.perf_counter() - t0) / n


def cycle_table(reps: int, batch: int) -> list[dict[str, Any]]:
    tmp = tempfile.mkdtemp()
    rows: list[dict[str, Any]] = []
    for backend in ("memory", "sqlite"):
        urls = (
            "memory://" if backend == "memory" else f"sqlite:///{tmp}/pace{k}.db" for k in range(3)
        )
        variants = [
            Variant("plain", next(urls), stop_at=False, pace=False),
            Variant("+ stop_at", next(urls), stop_at=True, pace=False),
            Variant("+ pace + stop_at", next(urls), stop_at=True, pace=True),
        ]
        rows += paired_rows(
            backend,
            variants,
            reps,
            batch,
            "plain",
            lambda name: "" if name == "plain" else "<= 1.05",
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = cycle_table(args.reps, args.batch)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'ledger':8} {'variant':20} {'CPU µs':>8} {'wall µs':>8} {'ratio':>7}  target")
    for r in rows:
        print(
            f"{r['ledger']:8} {r['variant']:20} {r['cpu_us']:8.1f} {r['wall_us']:8.1f} "
            f"{r['ratio']:7.3f}  {r['target']}"
        )


if __name__ == "__main__":
    main()
