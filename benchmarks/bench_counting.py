"""Token counting cost: the message cache in an agent loop, and a cold prompt vs LiteLLM.

1. A 50-step agent loop whose history grows by about 150 tokens a step (an assistant tool
   call, its tool result, an assistant note; a user turn every tenth step). Each step counts
   the whole history, as a budget check before every model call does. ``cached`` is a
   TokenCounter that has seen the earlier steps; ``uncached`` has ``cache_size=0`` and
   encodes everything afresh every step. Message dicts are rebuilt each step (as an
   integration converting framework messages would), so the cache works on content, not
   on object identity.
2. A first-seen prompt of about 1k tokens: our count (cache cleared every repeat) against
   ``litellm.token_counter`` on the same messages.
3. The event loop while a first-seen prompt of about 70k tokens is counted: a ticker task
   (``await asyncio.sleep(0)`` in a loop) runs beside the count, and the table shows the
   longest the loop went without a tick and how many ticks it made: the count inline on the
   loop (what a sync check does), against ``aprepare`` then the count (what ``acheck`` does:
   the encode runs in a worker thread, and tiktoken releases the GIL while it encodes). The
   wall time of ``aprepare`` is longer because the ticker keeps the loop busy meanwhile.

All times are ``time.perf_counter`` medians over several repeats.

Usage::

    python benchmarks/bench_counting.py
    python benchmarks/bench_counting.py --repeats 9 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tb_plugins.counting import TokenCounter

# This script is what justifies the speed tricks in src/tb_plugins/counting/_fast.py and the
# thresholds in tb_plugins.counting; the figures behind them (kept out of the docstrings):
# - buffer_counter (tiktoken's private encode_to_tiktoken_buffer) counted the first-seen
#   ~1k-token prompt about 8% faster than len(encode_ordinary(text));
# - freeze and copy_json (message cache keys and history snapshots without json.dumps and
#   copy.deepcopy) are what keep the cached agent-loop step far below the uncached one;
# - OFFLOAD_CHARS = 16,384 characters is about 4k tokens, a third of a millisecond or more of
#   encoding, while a hop to a worker thread and back adds about 0.1 ms (the loop-stall case);
# - encoders.chunks: a run without spaces costs more than linearly when encoded whole (800k
#   dots: about 0.37 s whole against 0.08 s in 8k-character chunks on the dev VM).
# Table figures from full runs are in benchmarks/README.md.

MODEL = "gpt-4o"
WORD_TEXT = (
    "flight hotel booking traveller itinerary price currency departure arrival gate "
    "seat window aisle luggage connection layover weather forecast snow rain "
    "temperature city airport terminal refund policy loyalty tier upgrade cabin "
    "economy business schedule delay cancel confirm passenger passport visa rental "
    "car train station museum dinner"
)
WORDS = tuple(WORD_TEXT.split())


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def agent_history(steps: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """The messages each step appends, about 150 tokens a step."""
    rng = random.Random(seed)
    per_step: list[list[dict[str, Any]]] = []
    for step in range(steps):
        new: list[dict[str, Any]] = []
        if step % 10 == 0:
            new.append({"role": "user", "content": sentence(rng, 25)})
        call_id = f"call_{step:04d}{rng.randrange(16**8):08x}"
        arguments = json.dumps(
            {"query": sentence(rng, 8), "city": rng.choice(WORDS), "max_results": 5}
        )
        new.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "search_travel", "arguments": arguments},
                    }
                ],
            }
        )
        results = [
            {"title": sentence(rng, 5), "price": rng.randrange(50, 900), "note": sentence(rng, 6)}
            for _ in range(3)
        ]
        new.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(results)})
        new.append({"role": "assistant", "content": sentence(rng, 18)})
        per_step.append(new)
    return per_step


SYSTEM = {"role": "system", "content": "You are a careful travel agent. Use the tools."}


def run_loop(counter: TokenCounter, per_step: list[list[dict[str, Any]]]) -> list[float]:
    """Seconds spent counting at each step of one loop."""
    history: list[dict[str, Any]] = [SYSTEM]
    times: list[float] = []
    for new in per_step:
        history.extend(new)
        messages = [dict(m) for m in history]
        start = time.perf_counter()
        counter.count_messages(MODEL, messages)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_loop(steps: int, repeats: int) -> dict[str, Any]:
    per_step = agent_history(steps)
    history = [SYSTEM] + [m for new in per_step for m in new]
    tokens = TokenCounter().count_messages(MODEL, history)
    rows: dict[str, Any] = {"steps": steps, "final_history_tokens": tokens}
    for label, cache_size in (("cached", 8192), ("uncached", 0)):
        run_loop(TokenCounter(cache_size=cache_size), per_step)  # warm-up: encodings loaded
        runs = [run_loop(TokenCounter(cache_size=cache_size), per_step) for _ in range(repeats)]
        rows[label] = {
            "median_step_us": statistics.median(statistics.median(r) for r in runs) * 1e6,
            "total_ms": statistics.median(sum(r) for r in runs) * 1e3,
        }
    rows["ratio_total"] = rows["uncached"]["total_ms"] / rows["cached"]["total_ms"]
    rows["ratio_median_step"] = (
        rows["uncached"]["median_step_us"] / rows["cached"]["median_step_us"]
    )
    return rows


def cold_prompt() -> list[dict[str, Any]]:
    rng = random.Random(11)
    return [
        {"role": "system", "content": " ".join(sentence(rng, 20) for _ in range(8))},
        {"role": "user", "content": " ".join(sentence(rng, 20) for _ in range(30))},
    ]


def bench_cold(repeats: int) -> dict[str, Any]:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    messages = cold_prompt()
    counter = TokenCounter()
    ours_count = counter.count_messages(MODEL, messages)
    theirs_count = litellm.token_counter(model=MODEL, messages=messages)

    def ours() -> None:
        counter.clear_cache()
        counter.count_messages(MODEL, messages)

    def theirs() -> None:
        litellm.token_counter(model=MODEL, messages=messages)

    ours_s = median_time(ours, repeats)
    theirs_s = median_time(theirs, repeats)
    return {
        "tokens_ours": ours_count,
        "tokens_litellm": theirs_count,
        "ours_median_us": ours_s * 1e6,
        "litellm_median_us": theirs_s * 1e6,
        "ratio": theirs_s / ours_s,
    }


def long_prompt() -> list[dict[str, Any]]:
    rng = random.Random(13)
    return [{"role": "user", "content": " ".join(sentence(rng, 20) for _ in range(3300))}]


async def _ticking(count: Callable[[], Any]) -> tuple[float, float, int]:
    """(wall seconds, longest gap between ticks, ticks) while ``count()`` is awaited."""
    done = False
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    await count()
    wall = time.perf_counter() - start
    done = True
    await task
    return wall, max(gaps), len(gaps)


def bench_loop_stall(repeats: int) -> dict[str, Any]:
    messages = long_prompt()
    counter = TokenCounter(offload_chars=0)
    tokens = counter.count_messages(MODEL, messages)

    async def inline() -> None:
        counter.count_messages(MODEL, messages)

    async def aprepare() -> None:
        await counter.aprepare(MODEL, messages)
        counter.count_messages(MODEL, messages)

    async def run() -> dict[str, Any]:
        rows: dict[str, Any] = {"tokens": tokens}
        for label, fn in (("inline", inline), ("aprepare", aprepare)):
            samples = []
            for _ in range(repeats):
                counter.clear_cache()
                samples.append(await _ticking(fn))
            rows[label] = {
                "wall_ms": statistics.median(x[0] for x in samples) * 1e3,
                "max_stall_ms": statistics.median(x[1] for x in samples) * 1e3,
                "ticks": statistics.median(x[2] for x in samples),
            }
        return rows

    return asyncio.run(run())


def print_table(loop: dict[str, Any], cold: dict[str, Any]) -> None:
    print(
        f"Agent loop: {loop['steps']} steps, final history "
        f"{loop['final_history_tokens']} tokens ({MODEL})"
    )
    print(f"{'counter':<12}{'median/step (us)':>18}{'total (ms)':>12}")
    for label in ("cached", "uncached"):
        row = loop[label]
        print(f"{label:<12}{row['median_step_us']:>18.1f}{row['total_ms']:>12.2f}")
    print(
        f"{'ratio':<12}{loop['ratio_median_step']:>17.1f}x{loop['ratio_total']:>11.1f}x"
        "   (uncached / cached; target >= 10x)"
    )
    print()
    print(f"First-seen prompt: {cold['tokens_ours']} tokens (litellm: {cold['tokens_litellm']})")
    print(f"{'counter':<22}{'median (us)':>12}")
    print(f"{'tb_plugins':<22}{cold['ours_median_us']:>12.1f}")
    print(f"{'litellm.token_counter':<22}{cold['litellm_median_us']:>12.1f}")
    print(f"{'ratio':<22}{cold['ratio']:>11.1f}x   (litellm / tb_plugins)")


def print_stall(stall: dict[str, Any]) -> None:
    print()
    print(f"Event loop while a first-seen {stall['tokens']}-token prompt is counted (medians)")
    print(f"{'count':<16}{'wall (ms)':>10}{'longest stall (ms)':>20}{'loop ticks':>12}")
    for label in ("inline", "aprepare"):
        row = stall[label]
        print(
            f"{label:<16}{row['wall_ms']:>10.1f}{row['max_stall_ms']:>20.2f}{row['ticks']:>12.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7, help="loops per counter")
    parser.add_argument("--cold-repeats", type=int, default=200)
    parser.add_argument("--stall-repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    loop = bench_loop(args.steps, args.repeats)
    cold = bench_cold(args.cold_repeats)
    stall = bench_loop_stall(args.stall_repeats)
    if args.json:
        print(json.dumps({"agent_loop": loop, "first_seen_prompt": cold, "loop_stall": stall},
                         indent=2))  # fmt: skip
    else:
        print_table(loop, cold)
        print_stall(stall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
