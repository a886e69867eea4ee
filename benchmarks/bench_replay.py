"""``tb replay`` over a large SQLite usage log: rows per second, against just reading them.

    python benchmarks/bench_replay.py [--rows 1000000] [--reps 1] [--keep FILE]

The log is seeded with ``--rows`` usage records spread over 30 days (global, one of 20 teams,
one of 5,000 users; 6 models; every second call recorded in shadow mode, so its row carries
the verdict and the request a replay reads back), written in one transaction with the ledger's
own statement and row codec (``INSERT_USAGE``, ``record_row``). Then, each timed:

* **baseline: read** — every record through :func:`~tb_plugins.engine.usage_log.iter_records`
  (``ledger.records`` a page at a time, as the replay reads them), doing nothing with them;
  then the same with Python's cyclic garbage collector paused, as ``Replay.feed`` reads;
* **replay, current policy** — the same records through
  :class:`~tb_plugins.engine.replay.Replay` under the policy they were recorded with (a user
  budget no call reaches: every call allowed, the replay's fast path);
* **replay, tighter policy** — under a policy that changes a third of the calls (a team
  budget per day with ``downgrade_at``, a user budget per day and per rolling hour, a monthly
  dollar budget on everything): about 4 % clamped, 7 % downgraded, 22 % denied;
* **tb replay --json (tighter)** — the whole command (parse, open, read, replay, print).

The target is a million rows in under 20 s on the project's 2-core VM.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tb_plugins.cli import main as tb
from tb_plugins.config import load_policy
from tb_plugins.core.usage import UsageRecord
from tb_plugins.engine.replay import Replay, iter_records
from tb_plugins.ledger import ledger_from_url
from tb_plugins.ledger.sqlite import schema
from tb_plugins.ledger.sqlite.codec import record_row

T0 = 1_800_000_000.0
DAYS = 30
MODELS = ("gpt-4o", "gpt-4o-mini", "openai/gpt-4o", "claude-sonnet-4-5", "o3", "gpt-4.1")
ACTIONS = ("allow",) * 94 + ("clamp",) * 3 + ("deny",) * 3
TARGET_S = 20.0
CURRENT = """\
ledger: sqlite:///{db}
alerts: []
budgets:
  - scope: user:*
    limit: 1M tokens/day
"""
NEW = """\
ledger: memory://
alerts: []
downgrade:
  gpt-4o: gpt-4o-mini
  openai/gpt-4o: openai/gpt-4o-mini
  claude-sonnet-4-5: claude-haiku-4-5
budgets:
  - scope: global
    usd: 4000
    window: month
  - scope: team:*
    tokens: 3M
    window: day
    downgrade_at: 0.8
  - scope: user:*
    limit: 14k tokens/day
  - scope: user:*
    limit: 6k tokens/rolling:1h
"""


def seed(db: Path, rows: int, batch: int = 50_000) -> float:
    """Write ``rows`` usage records into a new ledger file; returns the seconds it took."""
    ledger_from_url(f"sqlite:///{db}").close()  # the schema, as the ledger makes it
    rng = random.Random(21)
    start = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    for first in range(0, rows, batch):
        values = []
        for i in range(first, min(first + batch, rows)):
            user = rng.randrange(5000)
            path = ("global", f"team:{user % 20}", f"user:{user}")
            action = rng.choice(ACTIONS)
            model = rng.choice(MODELS)
            denied = action == "deny"
            inp, out = (0, 0) if denied else (rng.randint(100, 4000), rng.randint(10, 800))
            extra: dict[str, Any] = {}
            if i % 2 and not denied:  # recorded in shadow mode: the verdict and the request
                extra["shadow"] = {
                    "action": "allow", "model": model, "max_tokens": 800, "budget": None,
                    "scope": None, "unit": None, "reasons": [],
                    "request": {"input_tokens": inp, "max_tokens": 800},
                }  # fmt: skip
            record = UsageRecord(
                ts=T0 + i * (DAYS * 86400 / rows),
                reservation_id=f"r{i:08d}",
                scopes=path,
                model=model,
                requested_model=model,
                action=action,
                input_tokens=inp,
                output_tokens=out,
                usd=0.0 if denied else (inp * 2.5 + out * 10) / 1e6,
                extra=extra,
            )
            values.append((None if denied else record.reservation_id, *record_row(record)))
        conn.executemany(schema.INSERT_USAGE, values)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - start


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="seed (or reuse) this file and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.keep or Path(tmp) / "ledger.db"
        if args.keep is not None and db.exists():
            print(f"reusing {db}")
        else:
            took = seed(db, args.rows)
            print(f"seeded {args.rows:,} usage rows in {took:.1f} s")
        current = Path(tmp) / "budgets.yaml"
        current.write_text(CURRENT.format(db=db))
        new = Path(tmp) / "new.yaml"
        new.write_text(NEW)
        ledger = ledger_from_url(f"sqlite:///{db}")

        def read() -> int:
            return sum(1 for _ in iter_records(ledger))

        def read_paused() -> int:  # as Replay.feed reads: the cyclic collector paused
            gc.disable()
            try:
                return read()
            finally:
                gc.enable()

        def replay_with(path: Path) -> Any:
            r = Replay(load_policy(path))
            r.feed(iter_records(ledger))
            return r.report()

        def command() -> Any:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                tb(["replay", "--policy", str(new), "--config", str(current), "--json"])
            return json.loads(out.getvalue())

        print(f"\n{'case':28} {'rows':>10} {'best s':>7} {'rows/s':>10}  target < {TARGET_S:g} s")
        results = []
        cases: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("baseline: read", read),
            ("baseline: read, gc paused", read_paused),
            ("replay, current policy", lambda: replay_with(current)),
            ("replay, tighter policy", lambda: replay_with(new)),
            ("tb replay --json (tighter)", command),
        )
        for name, fn in cases:
            best, result = timed(fn, args.reps)
            results.append(result)
            mark = "ok" if best < TARGET_S else "OVER"
            print(f"{name:28} {args.rows:>10,} {best:>7.2f} {args.rows / best:>10,.0f}  {mark}")
        ledger.close()
        for name, result in (("current", results[2]), ("tighter", results[3])):
            t = result.totals
            print(
                f"{name}: {t.calls:,} calls replayed: {t.allowed:,} allowed, {t.clamped:,} "
                f"clamped, {t.downgraded:,} downgraded, {t.denied:,} denied; "
                f"{t.tokens_saved:,} tokens and ${t.usd_saved:,.2f} saved"
            )


if __name__ == "__main__":
    main()
