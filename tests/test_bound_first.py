"""Bound-first estimates (`estimate: {input: bound_first}`): a call far from its limits is
decided on an upper bound of its input with no tokenizer pass; wherever the exact count could
change the outcome the guard counts and decides again, so decisions equal exact counting's."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any

import pytest

from tb_plugins import BudgetExceeded, BudgetGuard, RequestTooLarge, Usage

WORDS = ["budget", "token", "🙂", "naïve", "日本語", "x" * 30, "tool", "!", "\n"]


def _messages(rng: random.Random, n: int) -> list[dict[str, Any]]:
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out: list[dict[str, Any]] = [{"role": "system", "content": text(rng.randint(1, 20))}]
    for _ in range(n):
        out.append({"role": "user", "content": text(rng.randint(1, 120))})
    return out


def _guards(policy: dict[str, Any]) -> tuple[BudgetGuard, BudgetGuard]:
    base = {"ledger": "memory://", "alerts": [], "downgrade": {"gpt-4o": "gpt-4o-mini"}, **policy}
    exact = BudgetGuard.from_dict({**base, "estimate": {"input": "exact"}})
    bound = BudgetGuard.from_dict({**base, "estimate": {"input": "bound_first"}})
    return exact, bound


def _outcome(guard: BudgetGuard, messages: list[dict[str, Any]], max_tokens: int | None) -> Any:
    try:
        d = guard.check(model="gpt-4o", messages=messages, max_tokens=max_tokens, scopes=["team:a"])
    except (BudgetExceeded, RequestTooLarge) as err:
        return type(err).__name__, err.budget
    guard.release(d)
    return d.action, d.model, d.max_tokens


@pytest.mark.parametrize("seed", range(12))
def test_decisions_equal_exact_counting_on_the_same_ledger_states(seed: int) -> None:
    """Across allow, clamp, downgrade, deny and request caps: bound-first and exact guards,
    given the same spend, take the same action with the same model and max_tokens."""
    _compare(seed)


def test_the_comparison_covered_every_outcome() -> None:
    """The seeds above reached every rung of the ladder (so the equality is not vacuous)."""
    seen = set().union(*(_compare(seed) for seed in range(12)))
    assert {"allow", "clamp", "downgrade", "BudgetExceeded", "RequestTooLarge"} <= seen


def _compare(seed: int) -> set[str]:
    rng = random.Random(seed)
    policy = {
        "request": {"max_input_tokens": rng.choice([None, 300, 800])},
        "budgets": [
            {"scope": "team:a", "tokens": rng.choice([1500, 3000, 20000]), "window": "day",
             "downgrade_at": rng.choice([None, 0.7])},
        ],
    }  # fmt: skip
    policy["request"] = {k: v for k, v in policy["request"].items() if v is not None}
    policy["budgets"][0] = {k: v for k, v in policy["budgets"][0].items() if v is not None}
    exact, bound = _guards(policy)
    seen: set[str] = set()
    for _ in range(25):
        messages = _messages(rng, rng.randint(0, 4))
        max_tokens = rng.choice([None, 16, 200, 900])
        a, b = _outcome(exact, messages, max_tokens), _outcome(bound, messages, max_tokens)
        assert a == b, (messages, max_tokens)
        seen.add(a[0])
        spend = rng.randint(0, 700)  # the same spend on both ledgers
        for g in (exact, bound):
            d = g.check(model="gpt-4o-mini", input_tokens=1, max_tokens=1, scopes=["team:b"])
            g.settle(d, Usage(input_tokens=0, output_tokens=0))
            try:
                d = g.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=["team:a"])
            except BudgetExceeded:
                continue
            g.settle(d, Usage(input_tokens=spend, output_tokens=0))
    return seen


def test_far_from_limits_the_estimate_is_a_bound_and_the_settle_charges_usage() -> None:
    """An allowed call holds its bound (never below the count) and is charged its usage."""
    exact, bound = _guards({"budgets": [{"scope": "team:a", "limit": "1M tokens/day"}]})
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    de = exact.check(model="gpt-4o", messages=messages, max_tokens=10, scopes=["team:a"])
    db = bound.check(model="gpt-4o", messages=messages, max_tokens=10, scopes=["team:a"])
    assert db.estimate.exact is False and de.estimate.exact is True
    assert db.estimate.input_tokens >= de.estimate.input_tokens
    charge = bound.settle(db, Usage(input_tokens=9, output_tokens=3))
    assert charge.tokens == 12


def test_a_call_without_usage_is_charged_its_exact_count_not_the_bound() -> None:
    """A stream that reports no usage is charged the counted input, as under exact."""
    exact, bound = _guards({"budgets": [{"scope": "team:a", "limit": "1M tokens/day"}]})
    messages = [{"role": "user", "content": "naïve 日本語 " * 50}]
    de = exact.check(model="gpt-4o", messages=messages, max_tokens=10, scopes=["team:a"])
    db = bound.check(model="gpt-4o", messages=messages, max_tokens=10, scopes=["team:a"])
    assert db.estimate.input_tokens > de.estimate.input_tokens
    assert bound.settle(db).input_tokens == exact.settle(de).input_tokens


def test_far_from_limits_no_tokenizer_is_loaded() -> None:
    """A process that checks calls far from its limits never imports tiktoken."""
    code = """
import sys
from tb_plugins import BudgetGuard, Usage
g = BudgetGuard.from_dict({"ledger": "memory://", "estimate": {"input": "bound_first"},
    "budgets": [{"scope": "team:a", "limit": "1M tokens/day"}]})
for i in range(20):
    d = g.check(model="gpt-4o", messages=[{"role": "user", "content": "hi %d" % i}],
                max_tokens=50, scopes=["team:a"])
    g.settle(d, Usage(input_tokens=10, output_tokens=5))
print("tiktoken" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_near_a_limit_the_exact_count_decides() -> None:
    """A call whose bound does not fit but whose count does is admitted, exactly as under
    exact counting (and holds the counted amount)."""
    messages = [{"role": "user", "content": "word " * 300}]  # ~300 tokens, 1,500 bytes
    exact, bound = _guards({"budgets": [{"scope": "team:a", "tokens": 1000, "window": "day"}]})
    de = exact.check(model="gpt-4o", messages=messages, max_tokens=100, scopes=["team:a"])
    db = bound.check(model="gpt-4o", messages=messages, max_tokens=100, scopes=["team:a"])
    assert (db.action, db.max_tokens) == (de.action, de.max_tokens) == ("allow", 100)
    assert db.estimate == de.estimate


def test_the_policy_field_is_checked() -> None:
    """`estimate.input` takes bound_first or exact, nothing else."""
    from tb_plugins import ConfigError

    with pytest.raises(ConfigError, match="estimate"):
        BudgetGuard.from_dict({"ledger": "memory://", "estimate": {"input": "guess"}})
