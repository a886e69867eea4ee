"""Guard cycle cost against `litellm.token_counter` alone, and `import tb_plugins` time.

    python benchmarks/bench_guard.py [--reps 40] [--json]

A guard cycle is count + check + settle on a 4-scope path (global, team, user, agent).
`litellm.token_counter` and each guard get the very same messages; each guard has a token
counter of its own, so what litellm or the other guard counted is still unseen by it. Every
repetition uses fresh message text, so nothing is served from a previous repetition's cache:
on the 30-step transcript each step sends the whole history again, of which only the newest
messages are unseen, as in a real agent loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "gpt-4o"
SCOPES = ["team:search", "user:alice", "agent:planner"]
POLICY: dict[str, Any] = {
    "alerts": [],
    "budgets": [
        {"scope": "global", "tokens": 10**12, "window": "month"},
        {"scope": "team:*", "tokens": 10**12, "window": "day", "alerts": [0.5, 0.8]},
        {"scope": "user:*", "tokens": 10**12, "window": "rolling:1m"},
        {"scope": "agent:*", "tokens": 10**12, "window": "day"},
    ],
}
WORDS = (  # noqa: SIM905
    "budget ledger token window reserve settle agent chain model price cache scope team "
    "alert clamp downgrade deny loop cutoff"
).split()


def text(seed: int, n_words: int) -> str:
    return " ".join(
        f"{WORDS[(seed * 7 + i * 13) % len(WORDS)]}{(seed + i) % 97}" for i in range(n_words)
    )


def prompt_1k(seed: int) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": text(seed, 480)},
    ]


def transcript(seed: int, steps: int = 30) -> list[list[dict[str, Any]]]:
    """The message list sent at each step of an agent loop with tool calls."""
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You plan searches and call tools."},
        {"role": "user", "content": text(seed, 60)},
    ]
    sent = []
    for step in range(steps):
        sent.append(list(history))
        call_id = f"call_{seed}_{step}"
        history.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "search",
                            "arguments": json.dumps({"q": text(seed + step, 8)}),
                        },
                    }
                ],
            }
        )
        history.append({"role": "tool", "tool_call_id": call_id, "content": text(seed + step, 90)})
    return sent


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def guard_for(url: str, estimate: str = "exact") -> Any:
    """A guard with a token counter of its own: a prompt another guard (or litellm) counted
    is still first seen here. ``estimate``: ``exact`` or ``bound_first`` (the input side
    from an upper bound that encodes nothing; far from the limits, as here, no count)."""
    from tb_plugins import BudgetGuard
    from tb_plugins.counting import TokenCounter

    policy = {**POLICY, "ledger": url, "estimate": {"input": estimate}}
    return BudgetGuard.from_dict(policy, tokenizer=TokenCounter())


def cycle(guard: Any, messages: list[dict[str, Any]]) -> None:
    from tb_plugins import Usage

    d = guard.check(model=MODEL, messages=messages, max_tokens=256, scopes=SCOPES)
    guard.settle(d, Usage(input_tokens=d.estimate.input_tokens, output_tokens=200))


def import_time(reps: int = 7) -> tuple[float, float]:
    """Median wall ms of `python -c 'import tb_plugins'` and of `python -c 'pass'`, with
    bytecode caching on (as users run it; the first run writes the caches)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def run(code: str) -> float:
        return (
            timed(lambda: subprocess.run([sys.executable, "-c", code], check=True, env=env)) * 1000
        )

    run("import tb_plugins")  # write the bytecode caches

    base = statistics.median(run("pass") for _ in range(reps))
    full = statistics.median(run("import tb_plugins") for _ in range(reps))
    return full, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import litellm

    tmp = tempfile.mkdtemp()
    backends = {
        "memory": ("memory://", "exact"),
        "sqlite": (f"sqlite:///{tmp}/bench.db", "exact"),
        "memory, bound-first": ("memory://", "bound_first"),
        "sqlite, bound-first": (f"sqlite:///{tmp}/bench2.db", "bound_first"),
    }
    rows: list[dict[str, Any]] = []

    # warm-up: tokenizer files, the price map, litellm's lazy imports
    for url, estimate in backends.values():
        cycle(guard_for(url, estimate), prompt_1k(-1))
    litellm.token_counter(model=MODEL, messages=prompt_1k(-2))

    # 1. a first-seen 1k-token prompt; backends interleaved per repetition (no order bias)
    guards = {name: guard_for(url, estimate) for name, (url, estimate) in backends.items()}
    base: list[float] = []
    per: dict[str, list[float]] = {name: [] for name in backends}
    for s in range(args.reps):
        # The same messages for litellm and for each guard (first seen by each: every guard
        # has its own counter). Built before the clock starts: only the counting and the
        # guard are timed.
        prompt = prompt_1k(s)
        base.append(timed(lambda p=prompt: litellm.token_counter(model=MODEL, messages=p)))
        for name, g in guards.items():
            per[name].append(timed(lambda g=g, p=prompt: cycle(g, p)))
    base_med = statistics.median(base) * 1e6
    rows.append(
        {
            "case": "1k-token prompt, first seen",
            "what": "litellm.token_counter",
            "median_us": base_med,
            "ratio": 1.0,
        }
    )
    for name in backends:
        med = statistics.median(per[name]) * 1e6
        rows.append(
            {
                "case": "1k-token prompt, first seen",
                "what": f"guard cycle ({name})",
                "median_us": med,
                "ratio": med / base_med,
                "target": "<= 1.5",
            }
        )

    # 2. a 30-step agent transcript with a growing history (median per step, and total)
    base_tot, base_steps = [], []
    tot: dict[str, list[float]] = {name: [] for name in backends}
    steps_t: dict[str, list[float]] = {name: [] for name in backends}
    for s in range(args.reps):
        steps = transcript(5000 + s)
        t = [timed(lambda m=m: litellm.token_counter(model=MODEL, messages=m)) for m in steps]
        base_tot.append(sum(t))
        base_steps.extend(t)
        for name, g in guards.items():
            t = [timed(lambda g=g, m=m: cycle(g, m)) for m in steps]
            tot[name].append(sum(t))
            steps_t[name].extend(t)
    base_total = statistics.median(base_tot) * 1e6
    rows.append(
        {
            "case": "30-step agent transcript",
            "what": "litellm.token_counter",
            "median_us": statistics.median(base_steps) * 1e6,
            "total_us": base_total,
            "ratio": 1.0,
        }
    )
    for name in backends:
        total = statistics.median(tot[name]) * 1e6
        rows.append(
            {
                "case": "30-step agent transcript",
                "what": f"guard cycle ({name})",
                "median_us": statistics.median(steps_t[name]) * 1e6,
                "total_us": total,
                "ratio": total / base_total,
                "target": "<= 0.5",
            }
        )

    full, bare = import_time()
    rows.append(
        {
            "case": "import tb_plugins",
            "what": "python -c 'import tb_plugins'",
            "median_us": full * 1000,
            "ratio": None,
            "note": f"{full - bare:.1f} ms over a bare interpreter ({bare:.1f} ms)",
            "target": "< 100 ms",
        }
    )

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':30} {'what':28} {'median µs':>11} {'total µs':>11} {'ratio':>7}  target")
    for r in rows:
        total = f"{r['total_us']:,.0f}" if "total_us" in r else ""
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        print(
            f"{r['case']:30} {r['what']:28} {r['median_us']:>11,.0f} {total:>11} {ratio:>7}"
            f"  {r.get('target', '')} {r.get('note', '')}"
        )


if __name__ == "__main__":
    main()
