"""Learned output holds (``output_hold: p95 | p99``): what a call holds, how it is learned, and
the overshoot it allows, measured against the same workload under ``output_hold: max_tokens``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tb_plugins import BudgetGuard, BudgetRefused, ConfigError, Usage
from tb_plugins.config import load_policy_dict
from tb_plugins.engine.holds import MIN_SAMPLES, MODELS, SAMPLES, OutputHolds

T0 = 1_790_000_000.0
LIMIT = 23_500  # tokens on team:a: the last calls admitted include one of the large outputs
INPUT = 50
MAX_TOKENS = 1_000
CONCURRENT = 16
ROUNDS = 15


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(hold: str, ledger: str = "memory://", clock: Clock | None = None) -> BudgetGuard:
    return BudgetGuard.from_dict(
        {
            "ledger": ledger,
            "alerts": [],
            "output_hold": hold,
            "budgets": [{"scope": "team:a", "tokens": LIMIT, "window": "day"}],
        },
        clock=clock or Clock(),
    )


def output(k: int) -> int:
    """The real output of the k-th call: 100 to 299 tokens, and the whole cap for one in 25."""
    return MAX_TOKENS if k % 25 == 7 else 100 + (k * 37) % 200


def warm_up(guard: BudgetGuard, calls: int = 50) -> None:
    for k in range(calls):
        d = guard.check("gpt-4o", input_tokens=INPUT, max_tokens=MAX_TOKENS, scopes=["team:w"])
        guard.settle(d, Usage(INPUT, output(k)))


def run_workload(hold: str) -> dict[str, Any]:
    """Rounds of 16 calls checked at once (all 16 holds in flight together), then settled with
    their real usage; the k-th admitted call produces ``output(k)``."""
    guard = make(hold)
    warm_up(guard)
    lock = threading.Lock()
    admitted = [0]
    spent = [0]
    refused = false_refusals = 0
    worst_excess = 0  # the most a round's spend passed the limit by
    bound_ok = True
    for _round in range(ROUNDS):
        holds = guard.estimator.holds
        hold_now = holds.hold("gpt-4o", MAX_TOKENS) if holds is not None else MAX_TOKENS
        checked = threading.Barrier(CONCURRENT)
        refusals = [0]

        def one(checked: threading.Barrier, refusals: list[int]) -> None:
            try:
                d = guard.check(
                    "gpt-4o", input_tokens=INPUT, max_tokens=MAX_TOKENS, scopes=["team:a"],
                    adjust=False,
                )  # fmt: skip
            except BudgetRefused:
                with lock:
                    refusals[0] += 1
                checked.wait()
                return
            with lock:
                k = admitted[0]
                admitted[0] += 1
            checked.wait()  # every admitted call of the round holds its estimate now
            out = output(k)
            guard.settle(d, Usage(INPUT, out))
            with lock:
                spent[0] += INPUT + out

        threads = [
            threading.Thread(target=one, args=(checked, refusals)) for _ in range(CONCURRENT)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused += refusals[0]
        room = LIMIT - spent[0]
        # Refused calls that would have fit even at their whole cap, given what the round used.
        false_refusals += min(refusals[0], max(0, room) // (INPUT + MAX_TOKENS))
        excess = spent[0] - LIMIT
        worst_excess = max(worst_excess, excess)
        # Each admitted call held INPUT + hold_now and used at most INPUT + MAX_TOKENS.
        if excess > CONCURRENT * (MAX_TOKENS - hold_now):
            bound_ok = False
    (row,) = [r for r in guard.usage() if r.key == "team:a"]
    assert row.input_tokens + row.output_tokens == spent[0]  # the ledger charged real usage
    return {
        "refused": refused,
        "false_refusals": false_refusals,
        "served": admitted[0],
        "spent": spent[0],
        "excess": worst_excess,
        "bound_ok": bound_ok,
        "hold": holds.hold("gpt-4o", MAX_TOKENS) if holds is not None else MAX_TOKENS,
    }


def test_p95_holds_refuse_fewer_calls_and_overshoot_within_the_stated_bound() -> None:
    """Under 16 concurrent calls near a limit, p95 holds refuse fewer calls than max_tokens
    holds, and the overshoot they allow stays within 16 x (max_tokens - hold)."""
    off = run_workload("max_tokens")
    p95 = run_workload("p95")
    assert off["excess"] <= 0  # max_tokens holds never pass the limit
    assert off["false_refusals"] > 0  # holding whole caps refuses calls that would have fit
    assert p95["false_refusals"] < off["false_refusals"]
    assert p95["refused"] < off["refused"]
    assert p95["served"] > off["served"]
    assert p95["spent"] > off["spent"]  # the budget is used, not left idle
    assert MAX_TOKENS > p95["hold"] > 0
    assert p95["bound_ok"]
    assert p95["excess"] > 0  # a call past its hold was charged its real output
    assert p95["excess"] <= CONCURRENT * (MAX_TOKENS - p95["hold"])


def test_cold_start_holds_the_cap_until_enough_outputs_are_seen() -> None:
    """Below MIN_SAMPLES outputs a model holds max_tokens (or default_output_tokens); after,
    the learned percentile, never above the request's max_tokens."""
    guard = make("p95")
    for _ in range(MIN_SAMPLES - 1):
        d = guard.check("gpt-4o", input_tokens=10, max_tokens=800)
        assert d.estimate.output_tokens == 800
        assert d.max_tokens == 800
        guard.settle(d, Usage(10, 120))
    assert guard.check("gpt-4o", input_tokens=10).estimate.output_tokens == 1024
    d = guard.check("gpt-4o", input_tokens=10, max_tokens=800)
    guard.settle(d, Usage(10, 120))
    learned = guard.check("gpt-4o", input_tokens=10, max_tokens=800)
    assert (learned.estimate.output_tokens, learned.max_tokens) == (120, 800)
    assert guard.check("gpt-4o", input_tokens=10).estimate.output_tokens == 120
    assert guard.check("gpt-4o", input_tokens=10, max_tokens=50).estimate.output_tokens == 50
    # Another model is still cold; an estimated settle (no usage) teaches nothing.
    other = guard.check("gpt-4o-mini", input_tokens=10, max_tokens=800)
    assert other.estimate.output_tokens == 800
    assert guard.settle(other).output_tokens == 800  # charged its cap, not a guess


def test_off_by_default_holds_max_tokens() -> None:
    """Without output_hold a call holds its max_tokens, however much is learned."""
    guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": []}, clock=Clock())
    assert guard.estimator.holds is None
    for _ in range(MIN_SAMPLES * 2):
        guard.settle(guard.check("gpt-4o", input_tokens=10, max_tokens=700), Usage(10, 5))
    assert guard.check("gpt-4o", input_tokens=10, max_tokens=700).estimate.output_tokens == 700


def test_memory_stays_bounded_with_many_models() -> None:
    """At most MODELS models of at most SAMPLES outputs each are kept, least recent dropped."""
    holds = OutputHolds("p99")
    for n in range(SAMPLES * 4):
        holds.observe("busy", n)
    for m in range(MODELS * 10):
        holds.observe(f"model-{m}", 1)
        if m % 50 == 0:
            holds.observe("busy", SAMPLES * 4)
    assert len(holds) == MODELS
    assert len(holds._rings["busy"].outputs) == SAMPLES
    assert "model-0" not in holds._rings
    assert holds.hold("busy", 10**6) >= SAMPLES * 3  # only the most recent outputs are kept


def test_two_guards_sharing_a_sqlite_ledger_learn_from_its_usage_log(tmp_path: Path) -> None:
    """A guard warms its holds from the outputs another guard recorded in the shared ledger,
    under the model asked for even when the provider reported a dated name."""
    url = f"sqlite:///{tmp_path}/l.db"
    first = make("p95", url)
    for k in range(30):
        d = first.check("gpt-4o", input_tokens=10, max_tokens=900, scopes=["team:a"])
        first.settle(d, Usage(10, 200 + k, model="gpt-4o-2024-08-06"))  # a dated served name
    first.settle(first.check("gpt-4o", input_tokens=10, max_tokens=900))  # estimated: ignored
    first.close()
    second = make("p95", url)
    d = second.check("gpt-4o", input_tokens=10, max_tokens=900, scopes=["team:a"])
    assert d.estimate.output_tokens == 228  # the p95 of 200..229, read from the usage log
    assert d.max_tokens == 900
    assert second.estimator.holds is not None and second.estimator.holds.warmed
    second.close()
    cold = make("p99", f"sqlite:///{tmp_path}/other.db")
    assert cold.check("gpt-4o", input_tokens=10, max_tokens=900).estimate.output_tokens == 900
    cold.close()


async def test_async_check_warms_from_the_ledger_too(tmp_path: Path) -> None:
    """The async path reads the usage log through the ledger's async twin."""
    url = f"sqlite:///{tmp_path}/l.db"
    first = make("p99", url)
    for _ in range(MIN_SAMPLES):
        await first.asettle(
            await first.acheck("gpt-4o", input_tokens=10, max_tokens=500), Usage(10, 42)
        )
    await first.aclose()
    second = make("p99", url)
    d = await second.acheck("gpt-4o", input_tokens=10, max_tokens=500)
    assert d.estimate.output_tokens == 42
    await second.aclose()


@pytest.mark.parametrize("bad", ["p50", "P95", "95", 95, True, None, "max"])
def test_bad_output_hold_values_are_refused(bad: object) -> None:
    """output_hold is max_tokens, p95 or p99; anything else is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="output_hold"):
        load_policy_dict({"output_hold": bad})
    for good in ("max_tokens", "p95", "p99"):
        assert load_policy_dict({"output_hold": good}).output_hold == good
