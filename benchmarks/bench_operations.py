"""What the operations features add to a guard cycle: Prometheus metrics, an alert webhook,
and the OpenTelemetry span listener; and what a scrape costs as scopes grow.

    python benchmarks/bench_operations.py [--reps 30] [--batch 200] [--json]

A guard cycle is check + settle on a 4-scope path (global, team, user, agent; the user one of
100) with ``input_tokens`` given, so no tokenizer runs. Each variant has a guard and a ledger
of its own; the variants are timed in the same run, alternating, in batches of ``--batch``
cycles, in an order that rotates each repetition. Times are per cycle, medians over the
repetitions: the CPU time of the benchmark's thread (what the variant costs; time the
machine gave to other processes is not in it) and the wall time. The ratio is the median,
over repetitions, of a variant's CPU time over the baseline's in the same repetition.

* ``no listeners``: the guard with its OpenTelemetry listener removed.
* ``as built`` (the baseline): the guard as every application gets it; with the
  ``opentelemetry`` API installed it records on the current span, and there is none here.
* ``+ metrics``: :func:`tb_plugins.metrics.register` on a registry of its own.
* ``+ metrics + webhook``: the same with a ``webhook:`` alert sink in the policy.
* ``+ recording span`` (with ``opentelemetry-sdk``): the cycles run inside a sampled span
  whose exporter drops everything: the cost of tracing when it is on.

The second table is one scrape (``generate_latest``) of a ledger with N user scopes under one
``user:*`` budget: a scrape reads every line of the ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_rows

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "gpt-4o"
POLICY: dict[str, Any] = {
    "alerts": [],
    "budgets": [
        {"scope": "global", "tokens": 10**12, "window": "month"},
        {"scope": "team:*", "tokens": 10**12, "window": "day", "alerts": [0.5, 0.8]},
        {"scope": "user:*", "tokens": 10**12, "window": "rolling:1m"},
        {"scope": "agent:*", "tokens": 10**12, "window": "day"},
    ],
}
WEBHOOK = "http://127.0.0.1:9/hook"  # never called: no alert fires at these limits
USERS = [f"user:u{i}" for i in range(100)]


class Variant:
    def __init__(self, name: str, url: str, *, metrics: bool, webhook: bool, otel: str) -> None:
        from tb_plugins import BudgetGuard
        from tb_plugins.engine.tracing import record_span

        policy = dict(POLICY, ledger=url)
        if webhook:
            policy["alerts"] = [{"webhook": WEBHOOK}]
        self.name = name
        self.guard = BudgetGuard.from_dict(policy)
        if otel == "off" and record_span in self.guard.listeners:
            self.guard.listeners.remove(record_span)
        if metrics:
            from prometheus_client import CollectorRegistry

            from tb_plugins.metrics import register

            register(self.guard, CollectorRegistry())
        self.span = span_factory() if otel == "span" else None
        self.i = 0

    def batch(self, n: int) -> tuple[float, float]:
        """Seconds per cycle over ``n`` cycles: this thread's CPU time, and wall time."""
        from tb_plugins import Usage

        guard = self.guard
        ctx: AbstractContextManager[Any] = self.span() if self.span else nullcontext()
        c0, t0 = time.thread_time(), time.perf_counter()
        with ctx:
            for _ in range(n):
                self.i += 1
                scopes = ["team:search", USERS[self.i % 100], "agent:planner"]
                d = guard.check(model=MODEL, input_tokens=800, max_tokens=256, scopes=scopes)
                guard.settle(d, Usage(input_tokens=800, output_tokens=200))
        return (time.thread_time() - c0) / n, (time.perf_counter() - t0) / n


def span_factory() -> Callable[[], AbstractContextManager[Any]] | None:
    """A sampled span whose exporter keeps nothing, or None without opentelemetry-sdk."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
    except ImportError:
        return None

    class Drop(SpanExporter):
        def export(self, spans: Any) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    tracer = provider.get_tracer("bench")
    return lambda: tracer.start_as_current_span("run")


def cycle_table(reps: int, batch: int) -> list[dict[str, Any]]:
    tmp = tempfile.mkdtemp()
    rows: list[dict[str, Any]] = []
    for backend in ("memory", "sqlite"):
        urls = (
            "memory://" if backend == "memory" else f"sqlite:///{tmp}/bench{k}.db" for k in range(5)
        )
        variants = [
            Variant("no listeners", next(urls), metrics=False, webhook=False, otel="off"),
            Variant("as built", next(urls), metrics=False, webhook=False, otel="on"),
            Variant("+ metrics", next(urls), metrics=True, webhook=False, otel="on"),
            Variant("+ metrics + webhook", next(urls), metrics=True, webhook=True, otel="on"),
        ]
        if span_factory() is not None:
            variants.append(
                Variant("+ recording span", next(urls), metrics=False, webhook=False, otel="span")
            )
        rows += paired_rows(
            backend,
            variants,
            reps,
            batch,
            "as built",
            lambda name: "<= 1.05" if "metrics" in name else "",
        )
    return rows


def scrape_table(sizes: tuple[int, ...], reps: int = 5) -> list[dict[str, Any]]:
    from prometheus_client import CollectorRegistry, generate_latest

    from tb_plugins import BudgetGuard, Usage
    from tb_plugins.metrics import register

    tmp = tempfile.mkdtemp()
    rows = []
    for backend in ("memory", "sqlite"):
        for n in sizes:
            url = "memory://" if backend == "memory" else f"sqlite:///{tmp}/scrape{n}.db"
            guard = BudgetGuard.from_dict(dict(POLICY, ledger=url))
            registry = CollectorRegistry()
            register(guard, registry)
            for i in range(n):
                d = guard.check(model=MODEL, input_tokens=10, max_tokens=10, scopes=[f"user:s{i}"])
                guard.settle(d, Usage(10, 10))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                body = generate_latest(registry)
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "ledger": backend,
                    "scopes": n,
                    "scrape_ms": statistics.median(times) * 1e3,
                    "bytes": len(body),
                }
            )
            guard.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--scrape-sizes", default="100,10000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cycles = cycle_table(args.reps, args.batch)
    scrapes = scrape_table(tuple(int(s) for s in args.scrape_sizes.split(",")))
    if args.json:
        print(json.dumps({"cycle": cycles, "scrape": scrapes}, indent=2))
        return
    print(f"{'ledger':8} {'variant':22} {'CPU µs':>8} {'wall µs':>8} {'ratio':>7}  target")
    for r in cycles:
        print(
            f"{r['ledger']:8} {r['variant']:22} {r['cpu_us']:>8.1f} {r['wall_us']:>8.1f}"
            f" {r['ratio']:>7.3f}  {r['target']}"
        )
    print()
    print(f"{'ledger':8} {'scopes':>8} {'scrape ms':>10} {'bytes':>8}")
    for r in scrapes:
        print(f"{r['ledger']:8} {r['scopes']:>8,} {r['scrape_ms']:>10.1f} {r['bytes']:>8,}")


if __name__ == "__main__":
    main()
