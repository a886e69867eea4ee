"""The BudgetGuard: the decision ladder, settlement, alerts, fail modes and the async twins."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tb_plugins import (
    BudgetExceeded,
    BudgetGuard,
    LedgerUnavailable,
    LoopLimitExceeded,
    RequestTooLarge,
    UnpricedModel,
    Usage,
)
from tb_plugins.core.pricing import ModelPrice
from tb_plugins.core.usage import Amounts, UsageRecord
from tb_plugins.engine.alerts import Alert
from tb_plugins.errors import LedgerError
from tb_plugins.ledger import Ledger, ledger_from_url
from tb_plugins.ledger.base import Line, LineState, ReserveResult, SettleResult
from tb_plugins.warnings import FailOpenWarning, UnpricedModelWarning

T0 = 1_790_000_000.0  # 2026-09-21, a fixed instant
MSGS = [{"role": "user", "content": "Summarise the quarterly report in three bullet points."}]


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(budgets: list[dict[str, Any]], **policy: Any) -> BudgetGuard:
    data: dict[str, Any] = {"ledger": "memory://", "alerts": [], "budgets": budgets}
    data.update(policy)
    sinks = data.pop("sinks", ())
    clock = data.pop("clock", None) or Clock()
    return BudgetGuard.from_dict(data, clock=clock, alert_sinks=sinks)


def call(guard: BudgetGuard, scopes: Sequence[str] = ("team:a",), **kw: Any) -> Any:
    kw.setdefault("max_tokens", 100)
    return guard.check(model=kw.pop("model", "gpt-4o"), messages=MSGS, scopes=scopes, **kw)


def spend(guard: BudgetGuard, tokens: int, scopes: Sequence[str] = ("team:a",)) -> None:
    d = call(guard, scopes, max_tokens=1)
    guard.settle(d, Usage(input_tokens=tokens, output_tokens=0))


def test_allow_holds_the_estimate_on_every_scope_of_the_path() -> None:
    """An allowed call holds input + max_tokens on each budget until it is settled."""
    g = make(
        [
            {"scope": "team:a", "tokens": 10_000, "window": "day"},
            {"scope": "user:*", "tokens": 10_000, "window": "day"},
        ]
    )
    d = call(g, ["team:a", "user:bob"], max_tokens=200)
    assert (d.action, d.model, d.max_tokens) == ("allow", "gpt-4o", 200)
    assert d.scopes == ("global", "team:a", "user:bob")
    held = d.estimate.input_tokens + 200
    assert d.estimate.exact and d.estimate.usd is not None and d.estimate.usd > 0
    for s in (*g.status("team:a"), *g.status("user:bob")):
        assert (s.spent, s.reserved) == (0, held)
    g.settle(d, Usage(input_tokens=d.estimate.input_tokens, output_tokens=37))
    (s,) = g.status("user:bob")
    assert (s.spent, s.reserved) == (d.estimate.input_tokens + 37, 0)


def test_clamp_lowers_max_tokens_to_what_is_left() -> None:
    """Near the limit, max_tokens is lowered so the call fits exactly."""
    g = make([{"scope": "team:a", "tokens": 1000, "window": "day"}])
    spend(g, 800)
    d = call(g, max_tokens=500)
    assert d.action == "clamp"
    assert d.max_tokens == 200 - d.estimate.input_tokens
    assert g.status("team:a")[0].remaining == 0


def test_no_clamp_below_min_output_tokens() -> None:
    """If fewer than min_output_tokens fit, the call is refused instead of clamped."""
    g = make([{"scope": "team:a", "tokens": 1000, "window": "day"}], min_output_tokens=50)
    d0 = call(g)
    spend(g, 1000 - d0.estimate.input_tokens - 100 - 30)
    with pytest.raises(BudgetExceeded):
        call(g, max_tokens=500)


def test_downgrade_at_switches_to_the_cheaper_model() -> None:
    """Past downgrade_at the cheaper model is used and estimated with its own price."""
    g = make(
        [{"scope": "team:a", "tokens": 10_000, "window": "day", "downgrade_at": 0.5}],
        downgrade={"gpt-4o": "gpt-4o-mini"},
    )
    assert call(g).model == "gpt-4o"
    spend(g, 5000)
    d = call(g)
    assert (d.action, d.model, d.requested_model) == ("downgrade", "gpt-4o-mini", "gpt-4o")
    assert "downgrade_at" in d.reasons[0]
    assert d.estimate.usd is not None and d.estimate.usd < 0.001
    # the hold is for the model that will run, and only one hold exists
    assert g.status("team:a")[0].reserved == 2 * (d.estimate.input_tokens + 100)


def test_downgrade_when_only_the_cheaper_model_fits() -> None:
    """A dollar budget too small for gpt-4o but enough for gpt-4o-mini downgrades the call."""
    g = make(
        [{"scope": "team:a", "usd": 0.002, "window": "day"}],
        downgrade={"gpt-4o": "gpt-4o-mini"},
        min_output_tokens=500,
    )
    d = call(g, max_tokens=1000)
    assert (d.action, d.model, d.max_tokens) == ("downgrade", "gpt-4o-mini", 1000)
    assert "only the cheaper model" in d.reasons[0]


def test_deny_names_scope_budget_spent_limit_and_reset() -> None:
    """A refusal carries the binding scope, budget, unit, spent, limit, request and reset time."""
    g = make([{"scope": "team:a", "tokens": 1000, "window": "day"}])
    spend(g, 1000)
    with pytest.raises(BudgetExceeded) as info:
        call(g)
    e = info.value
    assert (e.scope, e.unit, e.spent, e.limit) == ("team:a", "tokens", 1000, 1000)
    assert e.budget == "team:a 1,000 tokens/day"
    assert e.resets_at is not None and e.resets_at > T0
    assert "the window resets at" in str(e) and e.to_dict()["scope"] == "team:a"
    assert not e.retryable


def test_the_refusal_reported_is_the_budget_that_resets_last() -> None:
    """When a minute and a day budget both refuse, the day budget is reported."""
    g = make(
        [
            {"scope": "team:a", "tokens": 100, "window": "minute"},
            {"scope": "user:*", "tokens": 100, "window": "day"},
        ]
    )
    spend(g, 100, ["team:a", "user:bob"])
    with pytest.raises(BudgetExceeded) as info:
        call(g, ["team:a", "user:bob"])
    assert info.value.scope == "user:bob"


def test_a_refused_call_holds_nothing_anywhere() -> None:
    """All or nothing: when one budget refuses, no other budget keeps a hold."""
    g = make(
        [
            {"scope": "team:a", "tokens": 100_000, "window": "day"},
            {"scope": "user:*", "tokens": 10, "window": "day"},
        ]
    )
    with pytest.raises(BudgetExceeded):
        call(g, ["team:a", "user:bob"])
    assert g.status("team:a")[0].reserved == 0


def test_calls_limit_cuts_the_loop_per_run() -> None:
    """The N+1th call of one run raises LoopLimitExceeded; another run is unaffected."""
    g = make([{"scope": "run:*", "calls": 3, "window": "total"}])
    for _ in range(3):
        g.settle(call(g, ["run:1"]), Usage(10, 10))
    with pytest.raises(LoopLimitExceeded) as info:
        call(g, ["run:1"])
    assert info.value.unit == "calls" and "never resets" in str(info.value)
    assert call(g, ["run:2"]).action == "allow"


def test_request_caps_clamp_output_and_refuse_long_input() -> None:
    """max_output_tokens clamps a request; max_input_tokens refuses a long one."""
    g = make([], request={"max_output_tokens": 50, "max_input_tokens": 20})
    d = call(g, max_tokens=500)
    assert (d.action, d.max_tokens) == ("clamp", 50)
    with pytest.raises(RequestTooLarge, match="per-request cap"):
        g.check(model="gpt-4o", messages=[{"role": "user", "content": "word " * 100}])


def test_no_max_tokens_reserves_the_default_output() -> None:
    """A request without max_tokens holds default_output_tokens and sends no max_tokens."""
    g = make([{"scope": "team:a", "tokens": 100_000, "window": "day"}], default_output_tokens=700)
    d = call(g, max_tokens=None)
    assert d.max_tokens is None and d.estimate.output_tokens == 700


def test_unpriced_models_follow_the_policy() -> None:
    """deny refuses; count_tokens_only warns and counts tokens; use_price charges that price."""
    deny = make([], unpriced="deny")
    with pytest.raises(UnpricedModel, match="no known price"):
        call(deny, model="my-house-model")
    counted = make([{"scope": "team:a", "tokens": 1000, "window": "day"}])
    with pytest.warns(UnpricedModelWarning, match="my-house-model"):
        d = call(counted, model="my-house-model")
    assert d.estimate.usd is None and d.estimate.tokens > 0 and not d.estimate.exact
    charge = counted.settle(d, Usage(10, 10))
    assert charge.usd is None
    priced = make([], unpriced={"use_price": {"input": "$1/1M", "output": "$2/1M"}})
    c = priced.settle(call(priced, model="my-house-model"), Usage(1_000_000, 1_000_000))
    assert c.usd == pytest.approx(3.0)


def test_price_overrides_in_the_policy_win() -> None:
    """A `prices:` entry replaces the bundled price of a model."""
    g = make([], prices={"gpt-4o": {"input": "$1/1M", "output": "$1/1M"}})
    assert g.settle(call(g), Usage(500_000, 500_000)).usd == pytest.approx(1.0)


def test_settle_charges_actual_usage_even_above_the_estimate() -> None:
    """Settlement charges what was used, also when it exceeds the hold, and blocks afterwards."""
    g = make([{"scope": "team:a", "tokens": 1000, "window": "day"}])
    d = call(g, max_tokens=10)
    g.settle(d, Usage(input_tokens=700, output_tokens=600))
    (s,) = g.status("team:a")
    assert (s.spent, s.reserved, s.remaining) == (1300, 0, 0)
    with pytest.raises(BudgetExceeded):
        call(g)


def test_settle_is_idempotent_and_release_returns_the_hold() -> None:
    """A second settle changes nothing; a released call leaves no hold and no spend."""
    g = make([{"scope": "team:a", "tokens": 10_000, "window": "day"}])
    d = call(g)
    assert g.settle(d, Usage(10, 10)).applied
    assert not g.settle(d, Usage(10, 10)).applied
    assert g.status("team:a")[0].spent == 20
    d2 = call(g)
    g.release(d2)
    (s,) = g.status("team:a")
    assert (s.spent, s.reserved) == (20, 0)


def test_settle_without_usage_charges_the_estimate() -> None:
    """settle(d, None) (e.g. a stream without usage) charges the estimate, never zero."""
    g = make([{"scope": "team:a", "tokens": 10_000, "window": "day"}])
    d = call(g, max_tokens=300)
    charge = g.settle(d, None)
    assert charge.estimated and charge.tokens == d.estimate.tokens
    assert g.status("team:a")[0].spent == d.estimate.tokens
    (record,) = g.ledger.records()
    assert record.estimated


def test_cached_tokens_are_billed_at_the_cached_rate() -> None:
    """Cached input tokens cost less than uncached ones."""
    g = make([])
    full = g.settle(call(g), Usage(10_000, 0)).usd
    cached = g.settle(call(g), Usage(10_000, 0, cached_input_tokens=8_000)).usd
    assert full is not None and cached is not None and cached < full


def test_alerts_fire_once_per_threshold_per_window_across_guards(tmp_path: Path) -> None:
    """Two guards on one SQLite ledger send each threshold once; a new window fires again."""
    fired: list[Alert] = []
    clock = Clock()
    policy = {
        "ledger": f"sqlite:///{tmp_path}/l.db",
        "budgets": [{"scope": "team:a", "tokens": 1000, "window": "day", "alerts": [0.5, 0.8]}],
    }
    g1 = make(**policy, sinks=[fired.append], clock=clock)  # type: ignore[arg-type]
    g2 = make(**policy, sinks=[fired.append], clock=clock)  # type: ignore[arg-type]
    spend(g1, 400)
    spend(g2, 200)  # 60%: crosses 0.5
    spend(g1, 100)  # 70%: nothing new
    spend(g2, 300)  # 100%: crosses 0.8
    fired[:] = [a for a in fired if a.kind == "threshold"]  # not the forecast alert
    assert [a.threshold for a in fired] == [0.5, 0.8]
    assert fired[0].scope == "team:a" and "crossed 50%" in fired[0].message
    clock.t += 86400
    spend(g1, 600)
    assert [a.threshold for a in fired if a.kind == "threshold"] == [0.5, 0.8, 0.5]


def test_a_failing_alert_sink_does_not_break_the_call() -> None:
    """A sink that raises is logged; settlement still succeeds."""

    def boom(alert: Alert) -> None:
        raise RuntimeError("sink down")

    budget = {"scope": "team:a", "tokens": 100, "window": "day", "alerts": [0.1]}
    g = make([{**budget, "forecast_alert": False}], sinks=[boom])
    charge = g.settle(call(g), Usage(50, 0))
    assert len(charge.alerts) == 1


class FlakyLedger(Ledger):
    """A real memory ledger that raises LedgerUnavailable while ``down`` is set."""

    schemes = ()

    def __init__(self) -> None:
        self.inner = ledger_from_url("memory://")
        self.down = False
        self.url = "flaky://"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Ledger:
        return cls()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise LedgerUnavailable("connection refused")
        return getattr(self.inner, name)(*args, **kwargs)

    def reserve(
        self, rid: str, lines: Sequence[Line], amounts: Amounts, *, now: float, expires_at: float
    ) -> ReserveResult:
        return self._call("reserve", rid, lines, amounts, now=now, expires_at=expires_at)  # type: ignore[no-any-return]

    def settle(
        self,
        rid: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        return self._call("settle", rid, lines, amounts, record, now=now, watch=watch)  # type: ignore[no-any-return]

    def release(self, rid: str, *, now: float) -> bool:
        return self._call("release", rid, now=now)  # type: ignore[no-any-return]

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        return self._call("status", lines, now=now)  # type: ignore[no-any-return]

    def scopes(self) -> list[tuple[str, str]]:
        return self._call("scopes")  # type: ignore[no-any-return]

    def claim_alert(self, key: str, *, expires_at: float | None) -> bool:
        return self._call("claim_alert", key, expires_at=expires_at)  # type: ignore[no-any-return]

    def append_usage(self, record: UsageRecord) -> None:
        self._call("append_usage", record)

    def usage(self, **kw: Any) -> Any:
        return self._call("usage", **kw)

    def records(self, **kw: Any) -> Any:
        return self._call("records", **kw)


def flaky_guard(mode: str) -> tuple[BudgetGuard, FlakyLedger, Clock]:
    ledger, clock = FlakyLedger(), Clock()
    guard = BudgetGuard.from_dict(
        {
            "on_ledger_error": mode,
            "alerts": [],
            "budgets": [{"scope": "team:a", "tokens": 100_000, "window": "day"}],
        },
        ledger=ledger,
        clock=clock,
    )
    return guard, ledger, clock


def test_fail_closed_refuses_when_the_ledger_is_down() -> None:
    """fail_closed: an unreachable ledger refuses the call with LedgerUnavailable."""
    guard, ledger, _ = flaky_guard("fail_closed")
    ledger.down = True
    with pytest.raises(LedgerUnavailable, match="fail_closed"):
        call(guard)


def test_fail_open_admits_warns_and_writes_the_spend_back_once() -> None:
    """fail_open admits with a warning, keeps the spend, and writes it exactly once later."""
    guard, ledger, clock = flaky_guard("fail_open")
    ledger.down = True
    with pytest.warns(FailOpenWarning, match="fail_open"):
        d = call(guard)
    assert d.local and d.action == "allow"
    guard.settle(d, Usage(100, 50))
    assert guard.pending == 1
    ledger.down = False
    clock.t += 10
    d2 = call(guard)  # the next call writes the kept spend first
    assert guard.pending == 0
    guard.settle(d2, Usage(10, 5))
    assert guard.flush() == 0
    assert guard.status("team:a")[0].spent == 165


def test_a_settle_during_an_outage_is_kept_even_under_fail_closed() -> None:
    """Spend of an admitted call is never lost: settled while down, written when back."""
    guard, ledger, _ = flaky_guard("fail_closed")
    d = call(guard)
    ledger.down = True
    charge = guard.settle(d, Usage(100, 50))
    assert charge.tokens == 150 and guard.pending == 1
    ledger.down = False
    assert guard.flush() == 1
    assert guard.status("team:a")[0].spent == 150


def test_a_backend_bug_is_reported_as_unavailable() -> None:
    """A raw exception from a backend becomes LedgerUnavailable (fail_closed), chained."""
    guard, ledger, _ = flaky_guard("fail_closed")

    def broken(*a: Any, **k: Any) -> Any:
        raise OSError("disk I/O error")

    ledger.inner.reserve = broken  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable) as info:
        call(guard)
    assert isinstance(info.value.__cause__, LedgerError | OSError)


def test_adjust_false_never_changes_the_request() -> None:
    """With adjust=False (an observing callback) the answer is allow or a refusal."""
    g = make(
        [{"scope": "team:a", "tokens": 1000, "window": "day", "downgrade_at": 0.1}],
        downgrade={"gpt-4o": "gpt-4o-mini"},
    )
    spend(g, 800)
    d = call(g, max_tokens=100, adjust=False)
    assert (d.action, d.model, d.max_tokens) == ("allow", "gpt-4o", 100)
    with pytest.raises(BudgetExceeded):
        call(g, max_tokens=500, adjust=False)


def test_scopes_must_be_kind_colon_name() -> None:
    """A malformed scope is refused with a clear ValueError; repeats are dropped."""
    g = make([])
    with pytest.raises(ValueError, match="kind:name"):
        call(g, ["alice"])
    assert g.scope_path(["team:a", "team:a", "global"]) == ("global", "team:a")


def test_usage_report_groups_by_scope_model_and_day() -> None:
    """The usage log totals settled calls and refusals per scope, model and day."""
    g = make([{"scope": "team:a", "tokens": 50, "window": "day"}])
    g.settle(call(g, ["team:a", "user:x"], max_tokens=5), Usage(20, 5))
    with pytest.raises(BudgetExceeded):
        call(g, ["team:a", "user:x"], max_tokens=40)
    by_scope = {r.key: r for r in g.usage(group_by="scope")}
    assert by_scope["user:x"].requests == 1 and by_scope["user:x"].denied == 1
    assert by_scope["team:a"].tokens == 25
    (by_model,) = g.usage(group_by="model")
    assert by_model.key == "gpt-4o"
    (by_day,) = g.usage(group_by="day")
    assert by_day.key == "2026-09-21"


def test_pattern_budgets_appear_in_status_once_used() -> None:
    """`tb status` lists concrete budgets and each user a `user:*` budget has seen."""
    g = make(
        [
            {"scope": "team:a", "tokens": 100, "window": "day"},
            {"scope": "user:*", "tokens": 100, "window": "day"},
        ]
    )
    spend(g, 5, ["user:ann"])
    scopes = sorted({s.scope for s in g.status()})
    assert scopes == ["team:a", "user:ann"]


async def test_async_twins_decide_exactly_like_sync() -> None:
    """acheck/asettle/arelease reach the same decisions and spend as the sync calls."""
    budgets = [{"scope": "team:a", "tokens": 1000, "window": "day"}]
    sync, asy = make(budgets), make(budgets)
    for g_is_async, g in ((False, sync), (True, asy)):
        for out in (300, 300, 300):
            if g_is_async:
                d = await g.acheck(model="gpt-4o", messages=MSGS, max_tokens=out, scopes=["team:a"])
                await g.asettle(d, Usage(d.estimate.input_tokens, d.max_tokens or 0))
            else:
                d = call(g, max_tokens=out)
                g.settle(d, Usage(d.estimate.input_tokens, d.max_tokens or 0))
        d = await g.acheck(model="gpt-4o", messages=MSGS, max_tokens=10, scopes=["team:a"])
        await g.arelease(d)
    assert [s.spent for s in sync.status("team:a")] == [
        s.spent for s in await asy.astatus("team:a")
    ]


async def test_acheck_counts_a_long_new_prompt_off_the_event_loop() -> None:
    """A long prompt is encoded in a worker thread; the decision equals the sync one."""
    from tb_plugins.counting import TokenCounter

    budgets = [{"scope": "team:a", "tokens": 10**6, "window": "day"}]
    long_prompt = [{"role": "user", "content": "quarterly revenue churn hiring " * 700}]
    threads: list[int] = []

    class Spy(TokenCounter):
        def count_messages(self, *args: Any, **kwargs: Any) -> int:
            threads.append(threading.get_ident())
            return super().count_messages(*args, **kwargs)

    policy = {"ledger": "memory://", "alerts": [], "budgets": budgets}
    asy = BudgetGuard.from_dict(policy, clock=Clock(), tokenizer=Spy())
    d = await asy.acheck(model="gpt-4o", messages=long_prompt, max_tokens=10, scopes=["team:a"])
    sync = BudgetGuard.from_dict(policy, clock=Clock(), tokenizer=TokenCounter(offload_chars=None))
    expected = sync.check(model="gpt-4o", messages=long_prompt, max_tokens=10, scopes=["team:a"])
    assert d.estimate == expected.estimate and d.action == expected.action == "allow"
    assert threads[0] != threading.get_ident()  # counted in a worker thread first,
    assert threads[-1] == threading.get_ident()  # then looked up by the check itself


async def test_concurrent_async_checks_never_overshoot() -> None:
    """50 concurrent acheck calls against room for exactly 7 admit exactly 7."""
    g = make([{"scope": "team:a", "requests": 7, "window": "day"}])

    async def one() -> bool:
        try:
            await g.acheck(model="gpt-4o", messages=MSGS, max_tokens=10, scopes=["team:a"])
            return True
        except BudgetExceeded:
            return False

    results = await asyncio.gather(*(one() for _ in range(50)))
    assert sum(results) == 7


def test_custom_price_table_and_tokenizer_plug_in() -> None:
    """A user price table and tokenizer replace the defaults (the extension protocols)."""

    class Flat:
        def price(self, model: str) -> ModelPrice | None:
            return ModelPrice(1e-6, 1e-6, source="flat")

    class Words:
        def count_messages(self, model: str, messages: Any, tools: Any = None) -> int:
            return sum(len(str(m["content"]).split()) for m in messages)

        def count_text(self, model: str, text: str) -> int:
            return len(text.split())

        def is_exact(self, model: str) -> bool:
            return True

    g = BudgetGuard.from_dict(
        {"ledger": "memory://", "alerts": []}, prices=Flat(), tokenizer=Words()
    )
    d = g.check(model="anything", messages=MSGS, max_tokens=0)
    assert d.estimate.input_tokens == 8 and d.estimate.usd == pytest.approx(8e-6)


def test_no_warnings_leak_from_a_plain_allowed_call() -> None:
    """A priced, allowed call emits no warning at all."""
    g = make([{"scope": "team:a", "tokens": 1000, "window": "day"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.settle(call(g), Usage(1, 1))


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_per_run_counters_are_pruned_once_the_run_is_idle(backend: str, tmp_path: Path) -> None:
    """A run's never-resetting counter is dropped from the ledger a while after its last call,
    so per-run budgets do not grow the ledger forever; a live run keeps its count."""
    clock = Clock()
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path}/l.db"
    g = make([{"scope": "run:*", "calls": 5, "window": "total"}], ledger=url, clock=clock)
    g.settle(call(g, ["run:old"]), Usage(10, 10))
    g.settle(call(g, ["run:live"]), Usage(10, 10))
    clock.t += 5 * 86400
    g.settle(call(g, ["run:live"]), Usage(10, 10))  # still active: its expiry moves on
    clock.t += 4 * 86400  # run:old idle 9 days, run:live 4 days
    g.settle(call(g, ["run:other"]), Usage(10, 10))  # a settle prunes what is long dead
    scopes = {s for s, _ in g.ledger.scopes()}
    assert "run:old" not in scopes
    assert "run:live" in scopes
    assert g.status("run:live")[0].spent == 2


def test_downgrade_hints_stay_small_and_do_not_leak_to_other_scopes() -> None:
    """Only lines past downgrade_at are remembered; a user past it does not make another
    user's call start on the cheaper model or cost an extra ledger round trip."""
    g = make(
        [{"scope": "user:*", "tokens": 1000, "window": "day", "downgrade_at": 0.5}],
        downgrade={"gpt-4o": "gpt-4o-mini"},
    )
    for i in range(200):
        g.settle(call(g, [f"user:u{i}"], max_tokens=5), Usage(10, 5))
    assert len(g._hints) == 0
    spend(g, 600, ["user:heavy"])
    assert call(g, ["user:heavy"], max_tokens=5).model == "gpt-4o-mini"
    reserves = []
    original = g.ledger.reserve

    def counting(*args: Any, **kwargs: Any) -> ReserveResult:
        reserves.append(1)
        return original(*args, **kwargs)

    g.ledger.reserve = counting  # type: ignore[method-assign]
    d = call(g, ["user:light"], max_tokens=5)
    assert (d.model, len(reserves)) == ("gpt-4o", 1)
    assert len(g._hints) == 1  # user:heavy's line only


def test_a_reused_scope_path_follows_every_window_as_it_moves_on() -> None:
    """Calls on the same path reuse its lines only while no window moves: a rolling bucket,
    a day boundary and a run's idle expiry all take effect at their instant."""
    clock = Clock(T0)
    g = make(
        [
            {"scope": "team:*", "tokens": 10**6, "window": "day"},
            {"scope": "user:*", "tokens": 10**6, "window": "rolling:1m"},
            {"scope": "run:*", "calls": 100, "window": "total"},
        ],
        clock=clock,
    )
    path = ("team:a", "user:u", "run:r")

    def lines() -> dict[str, Line]:
        d = call(g, path)
        g.release(d)
        return {lp.line.scope: lp.line for lp in d.lines}

    first = lines()
    clock.t += 0.25  # same rolling bucket (1 s), same day: the very same lines
    assert lines() == first
    clock.t = float(int(T0) + 1)  # the rolling bucket moves on
    moved = lines()
    assert moved["user:u"].bucket == first["user:u"].bucket + 1
    assert moved["team:a"].bucket == first["team:a"].bucket
    d = call(g, path)
    g.release(d)
    reset = next(lp.resets_at for lp in d.lines if lp.line.scope == "team:a")
    assert reset is not None
    clock.t = reset - 0.001  # the day's last instant
    before = lines()
    assert before["team:a"].bucket == first["team:a"].bucket
    clock.t = reset
    assert lines()["team:a"].bucket != first["team:a"].bucket
    run_expiry = lines()["run:r"].expires_at
    clock.t += 61  # a run's idle expiry keeps moving with its calls
    later = lines()["run:r"].expires_at
    assert run_expiry is not None and later is not None and later >= run_expiry + 60


def test_default_reservation_ids_are_uuid7_in_time_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard's own ids are version 7 UUIDs: 32 hex digits, ordered by the millisecond they
    were made in (so a ledger's index of settled ids grows at one end)."""
    import time
    import uuid

    from tb_plugins.engine import new_reservation_id

    ticks = iter([1_790_000_000_000_000_000 + k * 1_000_000 for k in range(50)])
    with monkeypatch.context() as patch:
        patch.setattr(time, "time_ns", lambda: next(ticks))
        ids = [new_reservation_id() for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    for rid in ids:
        u = uuid.UUID(rid)
        assert len(rid) == 32 and u.version == 7 and u.variant == uuid.RFC_4122
    assert int(ids[0][:12], 16) == 1_790_000_000_000
    g = make([{"scope": "team:*", "tokens": 10**6, "window": "day"}])
    assert uuid.UUID(call(g).reservation_id).version == 7


async def test_aclose_writes_pending_spend_and_closes_the_ledger() -> None:
    """aclose, the async twin of close, writes the spend kept during an outage first."""
    guard, ledger, _ = flaky_guard("fail_closed")
    d = call(guard)
    ledger.down = True
    guard.settle(d, Usage(100, 50))
    ledger.down = False
    await guard.aclose()
    assert guard.pending == 0
    assert ledger.inner.records()[-1].reservation_id == d.reservation_id
