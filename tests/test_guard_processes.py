"""The whole guard (count, check, settle) under real process concurrency: no overshoot."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from tb_plugins import BudgetExceeded, BudgetGuard, Usage

pytestmark = pytest.mark.slow

WORKERS, CALLS, ADMIT = 8, 250, 600


def _policy(url: str) -> dict[str, Any]:
    return {
        "ledger": url,
        "alerts": [],
        "budgets": [
            {"scope": "team:load", "requests": ADMIT, "window": "day"},
            {"scope": "user:*", "tokens": 10**9, "window": "rolling:1h"},
            {"scope": "agent:*", "tokens": 10**9, "window": "total"},
        ],
    }


def _worker(url: str, worker: int, start: Any, out: Any) -> None:
    guard = BudgetGuard.from_dict(_policy(url))
    messages = [{"role": "user", "content": f"worker {worker} asks something"}]
    admitted = tokens = 0
    start.wait()
    for i in range(CALLS):
        try:
            d = guard.check(
                model="gpt-4o-mini",
                messages=messages,
                max_tokens=20,
                scopes=["team:load", f"user:{worker}", "agent:bench"],
            )
        except BudgetExceeded:
            continue
        used = Usage(input_tokens=d.estimate.input_tokens, output_tokens=1 + (i % 7))
        guard.settle(d, used)
        admitted += 1
        tokens += used.total_tokens
    guard.close()
    out.put((admitted, tokens))


def run_workers(url: str) -> tuple[int, int]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, w, start, out)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sum(a for a, _ in results), sum(t for _, t in results)


def test_eight_processes_admit_exactly_the_budget_on_sqlite(tmp_path: Path) -> None:
    """8 processes x 250 guarded calls on one SQLite file: exactly K admitted, spend exact,
    no hold left."""
    url = f"sqlite:///{tmp_path}/shared.db"
    BudgetGuard.from_dict(_policy(url)).close()  # create the schema once
    admitted, tokens = run_workers(url)
    assert admitted == ADMIT
    guard = BudgetGuard.from_dict(_policy(url))
    status = {(s.scope, s.unit): s for s in guard.status()}
    team = status[("team:load", "requests")]
    assert (team.spent, team.reserved) == (ADMIT, 0)
    (row,) = [r for r in guard.usage(group_by="scope") if r.key == "team:load"]
    assert row.tokens == tokens and row.requests == ADMIT
    assert (
        sum(
            s.spent
            for (scope, unit), s in status.items()
            if scope.startswith("user:") and unit == "tokens"
        )
        == tokens
    )
