"""Variants of one workload timed in the same run, alternating, and compared by paired ratios
(shared by bench_operations.py and bench_pacing.py).

Each variant runs a batch of cycles per repetition, in an order that rotates each
repetition; a variant's ratio is the median over repetitions of its CPU time over the
baseline's in the same repetition, which cancels the drift of a machine that other work slows
down and speeds up.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


class Timed(Protocol):
    """A variant: a name, a guard to close, and a batch of cycles timed as (cpu, wall)."""

    name: str
    guard: Any

    def batch(self, n: int) -> tuple[float, float]: ...


def rotations(items: Sequence[Timed]) -> Iterator[list[Timed]]:
    """The variants, starting one further each time."""
    k = 0
    while True:
        yield [*items[k % len(items) :], *items[: k % len(items)]]
        k += 1


def paired_rows(
    ledger: str,
    variants: Sequence[Timed],
    reps: int,
    batch: int,
    baseline: str,
    target: Callable[[str], str],
) -> list[dict[str, Any]]:
    """One row per variant: median CPU and wall µs per cycle, and the paired ratio to
    ``baseline``; every variant's guard is closed after."""
    for v in variants:  # warm-up: the price map, caches, sqlite pages
        v.batch(batch)
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    order = rotations(variants)
    for _ in range(reps):
        for v in next(order):
            c, w = v.batch(batch)
            cpu[v.name].append(c)
            wall[v.name].append(w)
    base = cpu[baseline]
    rows = []
    for v in variants:
        paired = [a / b for a, b in zip(cpu[v.name], base, strict=True)]
        rows.append(
            {
                "ledger": ledger,
                "variant": v.name,
                "cpu_us": statistics.median(cpu[v.name]) * 1e6,
                "wall_us": statistics.median(wall[v.name]) * 1e6,
                "ratio": statistics.median(paired),
                "target": target(v.name),
            }
        )
        v.guard.close()
    return rows
