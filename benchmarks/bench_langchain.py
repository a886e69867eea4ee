"""What the LangChain integration adds to one model call, measured against a no-op.

    python benchmarks/bench_langchain.py [--reps 200] [--ledger memory|sqlite] [--json]

Both arms run the same local model (``FakeChatModel`` told its input count, so it does no
tokenizing of its own) in the same process, interleaved call by call:

* handler: ``model.invoke(messages, config={"callbacks": [TokenBudgetCallbackHandler]})``
  against the same call with a handler that does nothing;
* middleware: a one-step ``create_agent`` with ``TokenBudgetMiddleware`` against the same agent
  with a pass-through ``wrap_model_call`` middleware.

Conversations: a short one (~30 tokens) and a 5k-token one. "fresh" gives every call new text,
so the guard tokenizes all of it (the worst case); "agent step" re-sends a 5k history of which
only the newest message is new, as each step of an agent loop does (earlier messages are in
the counter's cache). Guard work is a full check + settle on a 4-scope path plus the
integration's own scopes (chain/agent/run). The "adapter" rows run the same handler on a guard
that admits everything without counting or ledger I/O: what the LangChain adapter itself costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from tb_plugins import BudgetGuard, count_tokens
from tb_plugins.integrations.langchain import TokenBudgetCallbackHandler, TokenBudgetMiddleware
from tb_plugins.testing.fake_chat_model import FakeChatModel

MODEL = "gpt-4o"
SCOPES = ["team:search", "user:alice"]
WORDS = [
    *("budget", "ledger", "token", "window", "reserve", "settle", "agent", "chain", "model"),
    *("price", "cache", "scope", "team", "alert", "clamp", "downgrade", "deny", "loop"),
]


def text(seed: int, n_words: int) -> str:
    return " ".join(
        f"{WORDS[(seed * 7 + i * 13) % len(WORDS)]}{(seed + i) % 97}" for i in range(n_words)
    )


def short(seed: int) -> list[BaseMessage]:
    return [SystemMessage("You are brief."), HumanMessage(f"Summarize {text(seed, 8)}")]


def long_history(seed: int, turns: int) -> list[BaseMessage]:
    messages: list[BaseMessage] = [SystemMessage("You are a careful research assistant.")]
    for turn in range(turns):
        cls = HumanMessage if turn % 2 == 0 else AIMessage
        messages.append(cls(text(seed * 1000 + turn, 120)))
    return messages


def turns_for(tokens: int) -> int:
    """How many 120-word turns make a conversation of about ``tokens`` (counted once, on text
    no timed call uses, so the counter's cache holds nothing the fresh rows send)."""
    turns = 1
    while count_tokens(MODEL, _as_dicts(long_history(-7, turns))) < tokens:
        turns += 1
    return turns


def _as_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    return [{"role": m.type, "content": m.text} for m in messages]


class NoOpHandler(BaseCallbackHandler):
    """The baseline: a handler LangChain calls for every event, doing nothing."""


class AdapterOnlyGuard:
    """Admits every call without counting or ledger I/O: isolates the adapter's own cost."""

    def check(self, model: str, *args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(model=model, reservation_id=kwargs.get("reservation_id"))

    def settle(self, decision: Any, usage: Any = None) -> None:
        return None

    def release(self, decision: Any) -> None:
        return None


class NoOpMiddleware(AgentMiddleware):  # type: ignore[type-arg]
    """The baseline: a middleware that passes the call through."""

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return handler(request)


def guard_for(ledger: str, tmp: Path) -> BudgetGuard:
    url = "memory://" if ledger == "memory" else f"sqlite:///{tmp / 'bench.db'}"
    return BudgetGuard.from_dict(
        {
            "ledger": url,
            "alerts": [],
            "budgets": [
                {"scope": "global", "tokens": 10**12, "window": "month"},
                {"scope": "team:*", "tokens": 10**12, "window": "day"},
                {"scope": "user:*", "tokens": 10**12, "window": "rolling:1m"},
                {"scope": "run:*", "calls": 10**6, "window": "total"},
            ],
        }
    )


def timed(fn: Callable[[list[BaseMessage]], object], arg: list[BaseMessage]) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def compare(
    reps: int,
    make_input: Callable[[int], list[BaseMessage]],
    base: Callable[[list[BaseMessage]], object],
    tb: Callable[[list[BaseMessage]], object],
) -> tuple[float, float]:
    """Median seconds per call of each arm, interleaved; each arm gets its own fresh input."""
    for i in range(5):  # warm up imports, caches and the ledger's first writes
        base(make_input(-1 - i))
        tb(make_input(-100 - i))
    a, b = [], []
    for i in range(reps):
        x, y = make_input(2 * i), make_input(2 * i + 1)
        if i % 2:
            a.append(timed(base, x))
            b.append(timed(tb, y))
        else:
            b.append(timed(tb, y))
            a.append(timed(base, x))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=200, help="calls per arm (5k rows: /4)")
    parser.add_argument("--ledger", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        guard = guard_for(args.ledger, Path(tmp))
        turns = turns_for(5000)
        history = long_history(0, turns)
        n_long = count_tokens(MODEL, _as_dicts(history))

        def agent_step(i: int) -> list[BaseMessage]:
            return [*history, HumanMessage(text(10_000 + i, 20))]

        def fresh_long(i: int) -> list[BaseMessage]:
            return long_history(50_000 + i, turns)

        conversations: list[tuple[str, Callable[[int], list[BaseMessage]], int]] = [
            ("short (~30 tokens), fresh", short, args.reps),
            (f"{n_long / 1000:.1f}k tokens, fresh", fresh_long, max(args.reps // 4, 10)),
            (f"{n_long / 1000:.1f}k tokens, agent step", agent_step, args.reps),
        ]
        model = FakeChatModel(model=MODEL, input_tokens=1000, reply="ok", record=0)
        noop_cfg: Any = {"callbacks": [NoOpHandler()]}
        tb_cfg: Any = {
            "callbacks": [TokenBudgetCallbackHandler(guard, SCOPES)],
            "metadata": {"lc_agent_name": "bench"},
        }
        adapter_cfg: Any = {
            "callbacks": [TokenBudgetCallbackHandler(AdapterOnlyGuard(), SCOPES)],  # type: ignore[arg-type]
            "metadata": {"lc_agent_name": "bench"},
        }
        base_agent = create_agent(model, tools=[], middleware=[NoOpMiddleware()])
        tb_agent = create_agent(
            model, tools=[], middleware=[TokenBudgetMiddleware(guard, SCOPES)], name="bench"
        )

        rows: list[tuple[str, str, float, float]] = []
        for label, make, reps in conversations:
            base_s, tb_s = compare(
                reps,
                make,
                lambda m: model.invoke(m, config=noop_cfg),
                lambda m: model.invoke(m, config=tb_cfg),
            )
            rows.append(("handler", label, base_s, tb_s))
            base_s, tb_s = compare(
                reps,
                make,
                lambda m: model.invoke(m, config=noop_cfg),
                lambda m: model.invoke(m, config=adapter_cfg),
            )
            rows.append(("  adapter", label, base_s, tb_s))
            base_s, tb_s = compare(
                reps,
                make,
                lambda m: base_agent.invoke({"messages": m}),
                lambda m: tb_agent.invoke({"messages": m}),
            )
            rows.append(("middleware", label, base_s, tb_s))
        guard.close()

    records = [
        {
            "integration": kind,
            "conversation": label,
            "baseline_us": base * 1e6,
            "with_tb_us": tb * 1e6,
            "added_us": (tb - base) * 1e6,
            "ratio": tb / base,
        }
        for kind, label, base, tb in rows
    ]
    if args.json:
        print(json.dumps(records, indent=2))
        return
    print(f"ledger: {args.ledger}; medians per model call; reps {args.reps}")
    head = ("integration", "conversation", "baseline µs", "with tb µs", "added µs", "ratio")
    widths = [11, 26, 12, 11, 9, 6]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in records:
        cells = [
            r["integration"],
            r["conversation"],
            f"{r['baseline_us']:,.0f}",
            f"{r['with_tb_us']:,.0f}",
            f"{r['added_us']:+,.0f}",
            f"{r['ratio']:.2f}x",
        ]
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )


if __name__ == "__main__":
    main()
