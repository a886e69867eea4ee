"""Reserve+settle throughput and overshoot of the ledgers, from several processes at once.

Each process runs a fixed number of cycles (reserve on 4 lines, like a real scope path
``global, team, user, agent``; settle when admitted). The ``global`` line's ``requests`` limit
admits exactly K calls, fewer than are attempted, so the table also shows the overshoot
(admitted - K), which must be 0 for every backend.

Usage::

    python benchmarks/bench_ledger.py                      # sqlite (temp file) and memory://
    python benchmarks/bench_ledger.py --procs 1,2,4,8 --cycles 1000
    python benchmarks/bench_ledger.py --url redis://127.0.0.1:6379/15 --url postgresql://...

A ``--url`` ledger must be shareable between processes unless it is ``memory://`` (which runs
in one process only). Every run uses fresh scope names, so a shared server needs no cleanup.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any
from zoneinfo import ZoneInfo

from tb_plugins.core.usage import REQUESTS, UsageRecord, amounts
from tb_plugins.core.windows import parse_window
from tb_plugins.ledger import Line, ledger_from_url, line_key

UTC = ZoneInfo("UTC")
TTL = 600.0
SINGLE_PROCESS_SCHEMES = ("memory",)


def make_lines(run: str, worker: int, limit: int, now: float) -> list[Line]:
    """The 4 lines one call charges; only ``global`` limits ``requests`` (to ``limit``)."""
    path = [
        (f"global:{run}", "month", (None, None, None, None, limit, None)),
        (f"team:{run}", "day", (10**12, None, None, None, None, None)),
        (f"user:{run}:{worker}", "day", (10**12, None, None, None, None, None)),
        (f"agent:{run}", "rolling:1m", (10**12, None, None, None, None, None)),
    ]
    lines = []
    for scope, spec, limits in path:
        window = parse_window(spec)
        slot = window.slot(now, UTC)
        lines.append(
            Line(
                key=line_key(scope, window.spec),
                scope=scope,
                window=window.spec,
                bucket=slot.bucket,
                span=slot.span,
                width=slot.width,
                limits=limits,
                expires_at=slot.expires_at,
            )
        )
    return lines


def worker(url: str, run: str, index: int, cycles: int, limit: int, barrier: Barrier | None,
           results: Any) -> None:  # fmt: skip
    """Run ``cycles`` reserve(+settle) cycles and report (admitted, seconds)."""
    ledger = ledger_from_url(url)
    cost = amounts(100, 20, 1500)
    if barrier is not None:
        barrier.wait()
    admitted = 0
    start = time.perf_counter()
    for i in range(cycles):
        now = time.time()
        lines = make_lines(run, index, limit, now)
        rid = f"{run}-{index}-{i}"
        if ledger.reserve(rid, lines, cost, now=now, expires_at=now + TTL).ok:
            admitted += 1
            record = UsageRecord(
                ts=now, reservation_id=rid, scopes=tuple(ln.scope for ln in lines),
                model="bench-model", requested_model="bench-model", action="allow",
                input_tokens=100, output_tokens=20, usd=1.5e-6,
            )  # fmt: skip
            ledger.settle(rid, lines, cost, record, now=now)
    elapsed = time.perf_counter() - start
    ledger.close()
    results.put((admitted, elapsed))


@dataclass
class Result:
    label: str
    procs: int
    attempts: int
    admitted: int
    limit: int
    counted: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.attempts / self.seconds


def run_one(url: str, label: str, procs: int, cycles: int) -> Result:
    """One measurement: ``procs`` processes (or this one) × ``cycles`` cycles on ``url``."""
    run = uuid.uuid4().hex[:8]
    attempts = procs * cycles
    limit = attempts * 3 // 4  # admits exactly this many; the rest must be refused
    ctx = mp.get_context("spawn")
    results = ctx.Queue() if procs > 1 else _ListQueue()
    if procs == 1:
        worker(url, run, 0, cycles, limit, None, results)
        admitted, seconds = results.items[0]
    else:
        barrier = ctx.Barrier(procs + 1)
        children = [
            ctx.Process(target=worker, args=(url, run, i, cycles, limit, barrier, results))
            for i in range(procs)
        ]
        for child in children:
            child.start()
        barrier.wait()
        start = time.perf_counter()
        outs = [results.get(timeout=600) for _ in children]
        seconds = time.perf_counter() - start
        for child in children:
            child.join()
        admitted = sum(a for a, _ in outs)
    if url.startswith("memory"):
        counted = admitted  # the ledger died with its process; nothing to read back
    else:
        with ledger_from_url(url) as ledger:
            now = time.time()
            (state,) = ledger.status(make_lines(run, 0, limit, now)[:1], now=now)
            counted = state.spent[REQUESTS]
    return Result(label, procs, attempts, admitted, limit, counted, seconds)


class _ListQueue:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", action="append", help="ledger URL (repeatable); default: sqlite temp file, memory://"
    )  # fmt: skip
    parser.add_argument("--procs", default="1,2,4,8", help="process counts, comma-separated")
    parser.add_argument("--cycles", type=int, default=1000, help="cycles per process")
    args = parser.parse_args(argv)
    procs_list = [int(p) for p in args.procs.split(",")]
    tmp = tempfile.mkdtemp(prefix="tb-bench-")
    urls = args.url or [f"sqlite:///{os.path.join(tmp, 'ledger.db')}", "memory://"]

    print(f"{'backend':<10} {'procs':>5} {'cycles':>7} {'cycles/s':>10} {'admitted':>9} "
          f"{'limit K':>8} {'overshoot':>9} {'counted':>8}")  # fmt: skip
    worst = 0
    for url in urls:
        scheme = url.split("://", 1)[0]
        for procs in [1] if scheme in SINGLE_PROCESS_SCHEMES else procs_list:
            r = run_one(url, scheme, procs, args.cycles)
            overshoot = r.admitted - r.limit
            worst = max(worst, abs(overshoot), abs(r.counted - r.admitted))
            print(f"{r.label:<10} {r.procs:>5} {r.attempts:>7} {r.rate:>10,.0f} {r.admitted:>9} "
                  f"{r.limit:>8} {overshoot:>9} {r.counted:>8}", flush=True)  # fmt: skip
    if worst:
        print("FAIL: a ledger admitted more or fewer calls than its limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
