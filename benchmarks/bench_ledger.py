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
in one process only). Every run uses fresh scope names, so a shared server needs no cleanup;
``{run}`` in a URL becomes the run's id (the default SQLite URL uses it for a fresh file).
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


def cycles_on(url: str, run: str, index: int, cycles: int, limit: int) -> tuple[int, float]:
    """Run ``cycles`` reserve(+settle) cycles; return (admitted, seconds)."""
    ledger = ledger_from_url(url)
    cost = amounts(100, 20, 1500)
    # The lines of a scope path are the guard's work, computed once: this measures the ledger.
    lines = make_lines(run, index, limit, time.time())
    scopes = tuple(ln.scope for ln in lines)
    admitted = 0
    start = time.perf_counter()
    for i in range(cycles):
        now = time.time()
        rid = f"{run}-{index}-{i}"
        if ledger.reserve(rid, lines, cost, now=now, expires_at=now + TTL).ok:
            admitted += 1
            record = UsageRecord(
                ts=now, reservation_id=rid, scopes=scopes, model="bench-model",
                requested_model="bench-model", action="allow", input_tokens=100,
                output_tokens=20, usd=1.5e-6,
            )  # fmt: skip
            ledger.settle(rid, lines, cost, record, now=now)
    elapsed = time.perf_counter() - start
    ledger.close()
    return admitted, elapsed


def worker(url: str, run: str, index: int, cycles: int, limit: int, barrier: Barrier,
           results: Any) -> None:  # fmt: skip
    """A child process: open the ledger, wait for the others, run, report."""
    ledger_from_url(url).close()  # connect (and import) before the clock starts
    barrier.wait()
    results.put(cycles_on(url, run, index, cycles, limit))


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
    """One measurement: ``procs`` processes (or this one), ``cycles`` cycles each, on ``url``."""
    run = uuid.uuid4().hex[:8]
    url = url.replace("{run}", run)
    attempts = procs * cycles
    limit = attempts * 3 // 4  # admits exactly this many; the rest must be refused
    if procs == 1:
        admitted, seconds = cycles_on(url, run, 0, cycles, limit)
    else:
        ledger_from_url(url).close()  # create the schema once, not in every child
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", action="append", help="ledger URL (repeatable); default: sqlite temp file, memory://"
    )  # fmt: skip
    parser.add_argument("--procs", default="1,2,4,8", help="process counts, comma-separated")
    parser.add_argument("--cycles", type=int, default=1000, help="cycles per process")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per row; the best rate is shown (timeit-style)"
    )
    args = parser.parse_args(argv)
    procs_list = [int(p) for p in args.procs.split(",")]
    tmp = tempfile.mkdtemp(prefix="tb-bench-")
    urls = args.url or [f"sqlite:///{os.path.join(tmp, 'ledger-{run}.db')}", "memory://"]

    print(f"{'backend':<8} {'procs':>5} {'attempts':>8} {'reservations/s':>14} {'limit K':>8} "
          f"{'admitted':>8} {'overshoot':>9} {'counted':>8}")  # fmt: skip
    failed = False
    for url in urls:
        scheme = url.split("://", 1)[0]
        for procs in [1] if scheme in SINGLE_PROCESS_SCHEMES else procs_list:
            runs = [run_one(url, scheme, procs, args.cycles) for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r.rate)
            # every run must admit exactly K and count exactly what it admitted
            worst = max(
                runs, key=lambda r: (abs(r.admitted - r.limit), abs(r.counted - r.admitted))
            )
            failed |= worst.admitted != worst.limit or worst.counted != worst.admitted
            print(f"{scheme:<8} {procs:>5} {best.attempts:>8} {best.rate:>14,.0f} {worst.limit:>8} "
                  f"{worst.admitted:>8} {worst.admitted - worst.limit:>9} {worst.counted:>8}",
                  flush=True)  # fmt: skip
    if failed:
        print("FAIL: a ledger admitted or counted a number of calls other than its limit",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
