"""A long-lived SQLite ledger: reserve + settle after many calls, by kind of reservation id.

    python benchmarks/bench_ledger_growth.py [--calls 100000] [--sample 3000]

Every settled call adds a row to the usage log and an entry to its index of settled ids. With
random ids (uuid4) each entry lands on a random page of that index, so once the index outgrows
SQLite's page cache every settle dirties (and the WAL rewrites) a page of its own; with the
guard's time-ordered ids (UUID version 7) new entries land at the end of the index. For each
kind, the script runs ``--calls`` reserve + settle cycles on a fresh file (a 2-line path, 5,000
users), then times ``--sample`` more: median and mean µs per cycle, and the ratio of the two
kinds in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tb_plugins.core.usage import UsageRecord, amounts
from tb_plugins.engine import new_reservation_id
from tb_plugins.ledger import Line, ledger_from_url, line_key

T0 = 1_800_000_000.0
COST = amounts(700, 300, 1_000_000)


def lines(now: float, user: int) -> list[Line]:
    unlimited = (10**12, None, None, None, None, None)
    return [
        Line(line_key("global", "month"), "global", "month", 0, 1, 0, unlimited, now + 3e6),
        Line(line_key(f"user:{user}", "day"), f"user:{user}", "day", 0, 1, 0, unlimited, now + 9e4),
    ]


def run(path: Path, make_id: Callable[[], str], calls: int, sample: int) -> list[float]:
    ledger = ledger_from_url(f"sqlite:///{path}")
    now = T0
    times: list[float] = []
    for i in range(calls + sample):
        now += 0.01
        ln, rid = lines(now, i % 5000), make_id()
        record = UsageRecord(
            ts=now,
            reservation_id=rid,
            scopes=("global", ln[1].scope),
            model="gpt-4o",
            requested_model="gpt-4o",
            action="allow",
            input_tokens=700,
            output_tokens=300,
            usd=0.001,
        )
        start = time.perf_counter()
        ledger.reserve(rid, ln, COST, now=now, expires_at=now + 600)
        ledger.settle(rid, ln, COST, record, now=now, watch=[])
        if i >= calls:
            times.append(time.perf_counter() - start)
    ledger.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=3000)
    args = parser.parse_args()
    kinds: dict[str, Callable[[], str]] = {
        "uuid4 (random)": lambda: uuid.uuid4().hex,
        "uuid7 (guard default)": new_reservation_id,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, make_id) in enumerate(kinds.items()):
            times = run(Path(tmp) / f"l{n}.db", make_id, args.calls, args.sample)
            rows.append((name, statistics.median(times) * 1e6, statistics.fmean(times) * 1e6))
    print(f"SQLite ledger after {args.calls:,} calls; {args.sample:,} more timed")
    print(f"{'reservation ids':24} {'median µs':>10} {'mean µs':>10}")
    for name, med, mean in rows:
        print(f"{name:24} {med:10.1f} {mean:10.1f}")
    (_, med4, mean4), (_, med7, mean7) = rows
    print(f"{'uuid4 / uuid7':24} {med4 / med7:9.2f}x {mean4 / mean7:9.2f}x")


if __name__ == "__main__":
    main()
