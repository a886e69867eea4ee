"""``tb report`` over a large SQLite usage log: the report query by scope, model, day and user.

    python benchmarks/bench_report.py [--rows 1000000] [--calls-per-run 0] [--reps 3] [--keep FILE]

The log is seeded with ``--rows`` usage records spread over 30 days: each call's path is
global, the team of its user (20 teams) and its user (5,000), plus with ``--calls-per-run K``
a ``run:`` scope shared by K consecutive calls of one user (an agent run); 6 models; 90% allow,
4% clamp, 3% downgrade, 3% deny. The rows are written in one transaction with the ledger's own
statement and row codec (``INSERT_USAGE``, ``record_row``): the rows a guard would write,
without a guard's per-call cost. Each report is then timed through ``guard.usage`` (what
``tb report --json`` runs, less printing) on a guard opened from a policy file naming the
ledger, best and median of ``--reps``; then the whole ``tb report --by user`` command (parse,
open, query, print the table); and, as the baseline, the by-scope query of tb-plugins before
this benchmark (every record split with ``json_each``, a row per record and scope sorted).
The target is under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tb_plugins.cli import main as tb
from tb_plugins.core.usage import UsageRecord
from tb_plugins.engine import BudgetGuard
from tb_plugins.ledger import ledger_from_url
from tb_plugins.ledger.sqlite import schema
from tb_plugins.ledger.sqlite.codec import record_row

T0 = 1_800_000_000.0
DAYS = 30
MODELS = ("gpt-4o", "gpt-4o-mini", "openai/gpt-4o", "claude-sonnet-4", "o3", "gpt-4.1")
ACTIONS = ("allow",) * 90 + ("clamp",) * 4 + ("downgrade",) * 3 + ("deny",) * 3
TARGET_S = 2.0
POLICY = """\
ledger: sqlite:///{db}
alerts: []
budgets:
  - scope: team:*
    limit: 100M tokens/day
  - scope: user:*
    limit: 1M tokens/day
"""


def seed(db: Path, rows: int, calls_per_run: int = 0, batch: int = 50_000) -> float:
    """Write ``rows`` usage records into a new ledger file; returns the seconds it took."""
    ledger_from_url(f"sqlite:///{db}").close()  # the schema, as the ledger makes it
    rng = random.Random(20)
    start = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    user = 0
    for first in range(0, rows, batch):
        values = []
        for i in range(first, min(first + batch, rows)):
            if not calls_per_run or i % calls_per_run == 0:
                user = rng.randrange(5000)
            path = ("global", f"team:{user % 20}", f"user:{user}")
            if calls_per_run:
                path += (f"run:{i // calls_per_run}",)
            action = rng.choice(ACTIONS)
            model = rng.choice(MODELS)
            denied = action == "deny"
            inp, out = (0, 0) if denied else (rng.randint(100, 4000), rng.randint(10, 800))
            record = UsageRecord(
                ts=T0 + i * (DAYS * 86400 / rows),
                reservation_id=f"r{i:08d}",
                scopes=path,
                model="gpt-4o-mini" if action == "downgrade" else model,
                requested_model=model,
                action=action,
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=inp // 4 if i % 3 == 0 else 0,
                usd=0.0 if denied else (inp * 2.5 + out * 10) / 1e6,
            )
            values.append((None if denied else record.reservation_id, *record_row(record)))
        conn.executemany(schema.INSERT_USAGE, values)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - start


# The by-scope query before bench_report.py (the baseline): every record split by json_each.
ONE_STEP_BY_SCOPE = f"""
SELECT s.value AS k, {schema._SUMS}
  FROM usage u JOIN json_each(u.scopes) s
 WHERE {schema._PERIOD} AND ifnull(instr(u.scopes, {schema._NUL}), 0) = 0
   AND (:scope IS NULL OR EXISTS (SELECT 1 FROM json_each(u.scopes) f WHERE f.value = :scope))
 GROUP BY k
"""


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls-per-run", type=int, default=0, metavar="K")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="seed (or reuse) this file and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.keep or Path(tmp) / "ledger.db"
        if args.keep is not None and db.exists():
            print(f"reusing {db}")
        else:
            took = seed(db, args.rows, args.calls_per_run)
            print(f"seeded {args.rows:,} usage rows in {took:.1f} s")
        policy = Path(tmp) / "budgets.yaml"
        policy.write_text(POLICY.format(db=db))
        guard = BudgetGuard.from_config(policy)
        week = T0 + (DAYS - 7) * 86400
        everything = {"since": None, "until": None, "scope": None}
        baseline = sqlite3.connect(db)
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("usage by scope", lambda: guard.usage(group_by="scope")),
            ("usage by model", lambda: guard.usage(group_by="model")),
            ("usage by day", lambda: guard.usage(group_by="day")),
            ("usage by user", lambda: guard.usage(group_by="user")),
            ("usage by scope, last 7 days", lambda: guard.usage(group_by="scope", since=week)),
            ("usage by model, one team", lambda: guard.usage(group_by="model", scope="team:3")),
            ("tb report --by user (command)", lambda: command(policy)),
            (
                "baseline: by scope in one step",
                lambda: baseline.execute(ONE_STEP_BY_SCOPE, everything).fetchall(),
            ),
        ]
        head = f"{'report':32} {'rows out':>9} {'best s':>7} {'median s':>8}"
        print(f"\n{head}  target < {TARGET_S:g} s")
        for name, fn in cases:
            best, median, result = timed(fn, args.reps)
            mark = "ok" if median < TARGET_S else "OVER"
            out = f"{len(result):>9,}" if result is not None else ""
            print(f"{name:32} {out:>9} {best:>7.2f} {median:>8.2f}  {mark}")
        baseline.close()
        guard.close()


def command(policy: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        tb(["report", "--by", "user", "--config", str(policy)])


if __name__ == "__main__":
    main()
