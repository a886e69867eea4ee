"""Shadow mode (decide and record, do not enforce) and `tb replay` (the usage log through
another policy): what shadow mode admits and records, on every ledger; that a replay of a
shadow log under the same policy reproduces its verdicts; the replay's shortcuts against the
full ladder; the JSON and table of `tb replay` and `tb report --shadow`; bad inputs."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import make_ledger
from tb_plugins import BudgetExceeded, BudgetGuard, ConfigError, Usage
from tb_plugins.cli import main
from tb_plugins.config import load_policy_dict
from tb_plugins.core.ladder import LIFTED
from tb_plugins.core.usage import UsageRecord
from tb_plugins.engine import replay as replay_module
from tb_plugins.engine.replay import Replay, replay
from tb_plugins.engine.usage_log import iter_records
from tb_plugins.ledger import Ledger, ledger_from_url

LOCAL = ("memory", "sqlite")
T0 = 1_790_000_000.0  # 2026-09-21 14:13 UTC, a fixed instant


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy_data(**extra: Any) -> dict[str, Any]:
    """team:a clamps then denies (1,050 tokens a day, calls of 100); team:b downgrades past
    half of its 2,000 and denies once even the cheaper model does not fit."""
    data: dict[str, Any] = {
        "ledger": "memory://",
        "alerts": [],
        "downgrade": {"gpt-4o": "gpt-4o-mini"},
        "request": {"max_input_tokens": 500},
        "budgets": [
            {"scope": "team:a", "tokens": 1050, "window": "day"},
            {"scope": "team:b", "tokens": 2000, "window": "day", "downgrade_at": 0.5},
            {"scope": "user:*", "limit": "100k tokens/day"},
        ],
    }
    data.update(extra)
    return data


def run_calls(guard: BudgetGuard, clock: Clock, n: int = 30) -> list[Any]:
    """``n`` calls, alternately on team:b and team:a, 10 s apart: each estimated at 10 input +
    90 output tokens and using exactly that. Refusals are returned as the error."""
    out: list[Any] = []
    for i in range(n):
        team = "team:a" if i % 2 else "team:b"
        try:
            d = guard.check(
                model="gpt-4o", input_tokens=10, max_tokens=90, scopes=[team, f"user:u{i % 3}"]
            )
        except BudgetExceeded as err:
            out.append(err)
        else:
            guard.settle(d, Usage(10, 90))
            out.append(d)
        clock.t += 10
    return out


EXPECTED = {  # what enforcement decides for run_calls: per team, in call order
    "team:a": ["allow"] * 10 + ["clamp"] + ["deny"] * 4,
    "team:b": ["allow"] * 10 + ["downgrade"] * 5,
}


@pytest.fixture(params=[pytest.param(n, marks=getattr(pytest.mark, n)) for n in LOCAL])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A memory and a SQLite ledger: they follow the injected clock (a server ledger follows
    its server's, so the calls of these tests would land on today's date)."""
    led = make_ledger(request.param, tmp_path)
    yield led
    led.close()


def shadow_guard(ledger: Ledger, **extra: Any) -> tuple[BudgetGuard, Clock]:
    clock = Clock()
    return BudgetGuard(load_policy_dict(policy_data(**extra)), ledger, clock=clock), clock


# -- shadow mode ---------------------------------------------------------------------------------


def test_policy_shadow_admits_every_call_unchanged_and_records_what_enforcement_would_do(
    local: Ledger,
) -> None:
    """Under `mode: shadow` every call is allowed as asked (model, max_tokens), its spend is
    charged, and the decision and the usage row say what enforcement would have done: the
    same clamps, downgrades and denials an enforcing guard makes, naming the budget."""
    guard, clock = shadow_guard(local, mode="shadow")
    decisions = run_calls(guard, clock)
    assert all((d.action, d.model, d.max_tokens) == ("allow", "gpt-4o", 90) for d in decisions)
    by_team: dict[str, list[str]] = {"team:a": [], "team:b": []}
    for d in decisions:
        by_team[d.scopes[1]].append(d.shadow.action)
    assert by_team == EXPECTED
    clamp = next(d.shadow for d in decisions if d.shadow.action == "clamp")
    assert (clamp.model, clamp.max_tokens, clamp.budget, clamp.unit) == (
        "gpt-4o", 40, "team:a 1,050 tokens/day", "tokens",
    )  # fmt: skip
    down = next(d.shadow for d in decisions if d.shadow.action == "downgrade")
    assert (down.model, down.budget, down.unit) == ("gpt-4o-mini", "team:b 2,000 tokens/day", None)
    deny = next(d.shadow for d in decisions if d.shadow.action == "deny")
    assert (deny.scope, deny.budget, deny.unit) == ("team:a", "team:a 1,050 tokens/day", "tokens")
    assert "exhausted" in deny.reasons[-1]
    # Spend is charged as the calls ran: both teams are past their limits.
    spent = {s.scope: s.spent for s in guard.status("team:a") + guard.status("team:b")}
    assert spent == {"team:a": 1500, "team:b": 1500}
    rows = guard.ledger.records()
    assert [r.action for r in rows] == ["allow"] * 30
    assert Counter(r.extra["shadow"]["action"] for r in rows) == Counter(
        allow=20, clamp=1, downgrade=5, deny=4
    )
    row = next(r for r in rows if r.extra["shadow"]["action"] == "deny")
    assert row.extra["shadow"]["budget"] == "team:a 1,050 tokens/day"
    assert row.extra["shadow"]["request"] == {"input_tokens": 10, "max_tokens": 90}
    guard.close()


def test_enforcing_the_same_policy_makes_the_decisions_shadow_mode_recorded(
    local: Ledger,
) -> None:
    """The shadow verdicts are the enforcing guard's decisions, call for call (what an
    enforced guard denies never runs; the calls here are sized so that this does not change
    what the later ones see)."""
    guard, clock = shadow_guard(local)
    got: dict[str, list[str]] = {"team:a": [], "team:b": []}
    for i, d in enumerate(run_calls(guard, clock)):
        team = "team:a" if i % 2 else "team:b"
        got[team].append("deny" if isinstance(d, BudgetExceeded) else d.action)
    assert got == EXPECTED
    guard.close()


def test_a_shadow_budget_is_not_enforced_while_the_others_are(local: Ledger) -> None:
    """`mode: shadow` on one budget: its verdicts are only recorded (team:b's downgrades), the
    other budgets still clamp and refuse (team:a), and a call on neither has no verdict."""
    data = policy_data()
    data["budgets"][1]["mode"] = "shadow"
    clock = Clock()
    guard = BudgetGuard(load_policy_dict(data), local, clock=clock)
    results = run_calls(guard, clock)
    team_a, team_b = results[1::2], results[0::2]
    assert [r.action if not isinstance(r, BudgetExceeded) else "deny" for r in team_a] == (
        EXPECTED["team:a"]
    )
    assert all(r.shadow is None for r in team_a if not isinstance(r, BudgetExceeded))
    assert all((d.action, d.model) == ("allow", "gpt-4o") for d in team_b)
    assert [d.shadow.action for d in team_b] == EXPECTED["team:b"]
    d = guard.check(model="gpt-4o", input_tokens=10, max_tokens=90, scopes=["team:c"])
    assert d.shadow is None
    guard.release(d)
    guard.close()


def test_a_shadow_limit_on_a_shared_line_does_not_hold_back_the_enforced_one(
    ledger: Ledger,
) -> None:
    """An enforced and a shadow budget on one scope and window share a ledger line: the
    reservation sees only the enforced limit, the verdict the shadow one, and what the
    decision says is left is read with every limit in force (no lifted limit leaks out). On
    every backend: the lifted limit is stored as each one stores limits."""
    data = {
        "ledger": "memory://",
        "alerts": [],
        "budgets": [
            {"scope": "user:*", "tokens": 5000, "window": "day"},
            {"scope": "user:*", "tokens": 300, "window": "day", "mode": "shadow"},
            {"scope": "user:*", "usd": 0.001, "window": "day", "mode": "shadow"},
        ],
    }
    guard = BudgetGuard(load_policy_dict(data), ledger, clock=Clock())
    actions = []
    for _ in range(5):
        d = guard.check(model="gpt-4o", input_tokens=10, max_tokens=90, scopes=["user:ann"])
        guard.settle(d, Usage(10, 90))
        actions.append((d.action, d.shadow.action))
        assert all(v < 10**12 for v in d.remaining.values())
    assert actions[0] == ("allow", "allow")
    assert all(a == "allow" for a, _ in actions) and actions[-1][1] == "deny"
    assert d.remaining["tokens"] == 0
    status = {(s.unit, s.limit) for s in guard.status("user:ann")}
    assert status == {("tokens", 5000), ("tokens", 300), ("usd", 0.001)}
    assert all(s.limit < LIFTED for s in guard.status("user:ann"))
    guard.close()


def test_shadow_policy_lets_a_request_over_the_input_cap_through(local: Ledger) -> None:
    """Under `mode: shadow` the per-request caps are not enforced either: a prompt above
    request.max_input_tokens runs, recorded as a would-be deny of that cap."""
    guard, _clock = shadow_guard(local, mode="shadow")
    d = guard.check(model="gpt-4o", input_tokens=600, max_tokens=20, scopes=["team:a"])
    assert (d.action, d.max_tokens) == ("allow", 20)
    assert (d.shadow.action, d.shadow.budget, d.shadow.scope) == (
        "deny", "request.max_input_tokens", "request",
    )  # fmt: skip
    guard.settle(d, Usage(600, 20))
    (row,) = guard.ledger.records()
    assert (row.action, row.extra["shadow"]["action"]) == ("allow", "deny")
    guard.close()


def test_a_budget_mode_wins_over_the_policy_mode() -> None:
    """A budget's own `mode: enforce` is enforced under a policy in shadow mode; a bad mode
    is refused naming the field."""
    data = policy_data(mode="shadow")
    data["budgets"][0]["mode"] = "enforce"
    guard = BudgetGuard.from_dict(data, clock=Clock())
    assert [b.shadow for b in guard.planner.budgets] == [False, True, True]
    results = run_calls(guard, Clock())
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 4  # team:a refuses
    guard.close()
    with pytest.raises(ConfigError, match="mode"):
        load_policy_dict(policy_data(mode="dryrun"))


def test_shadow_mode_adds_no_ledger_round_trip() -> None:
    """A shadow verdict is worked out from the states the reservation returned: a check
    costs one reservation, shadow budgets or not, and reads nothing else."""
    calls: Counter[str] = Counter()

    class Counting(type(ledger_from_url("memory://"))):  # type: ignore[misc]
        def reserve(self, *a: Any, **k: Any) -> Any:
            calls["reserve"] += 1
            return super().reserve(*a, **k)

        def status(self, *a: Any, **k: Any) -> Any:
            calls["status"] += 1
            return super().status(*a, **k)

    for mode in ("enforce", "shadow"):
        calls.clear()
        guard = BudgetGuard(load_policy_dict(policy_data(mode=mode)), Counting(), clock=Clock())
        d = guard.check(model="gpt-4o", input_tokens=10, max_tokens=90, scopes=["team:a"])
        assert (d.shadow is None) == (mode == "enforce")
        assert calls == {"reserve": 1}
        guard.settle(d, Usage(10, 90))
        (row,) = guard.ledger.records()
        assert ("shadow" in row.extra) == (mode == "shadow")
        guard.close()


def test_async_check_records_the_same_shadow_verdicts() -> None:
    """acheck runs the same flow: the same verdicts, recorded the same way."""

    async def go() -> list[str]:
        clock = Clock()
        guard = BudgetGuard(load_policy_dict(policy_data(mode="shadow")), clock=clock)
        out = []
        for _ in range(12):
            d = await guard.acheck(
                model="gpt-4o", input_tokens=10, max_tokens=90, scopes=["team:a"]
            )
            await guard.asettle(d, Usage(10, 90))
            out.append(d.shadow.action)
        await guard.aclose()
        return out

    assert asyncio.run(go()) == ["allow"] * 10 + ["clamp", "deny"]


# -- replay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_replaying_a_shadow_log_under_its_policy_reproduces_its_verdicts(
    backend: str, tmp_path: Path
) -> None:
    """The log of a shadow run, replayed under the same policy (enforced), gives as many
    clamps, downgrades and denials as shadow mode recorded, on the budgets it named, and
    saves what the denied calls spent and the clamp cut."""
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    guard, clock = shadow_guard(ledger_from_url(url), mode="shadow")
    run_calls(guard, clock)
    records = list(iter_records(guard.ledger, page=7))  # pages of 7: every page boundary
    assert len(records) == 30
    recorded = Counter(r.extra["shadow"]["action"] for r in records)
    report = replay(load_policy_dict(policy_data(mode="shadow")), records)
    t = report.totals
    assert (t.calls, t.allowed, t.clamped, t.downgraded, t.denied) == (
        30, recorded["allow"], recorded["clamp"], recorded["downgrade"], recorded["deny"],
    )  # fmt: skip
    assert report.recorded == {
        "allow": 30, "would_allow": 20, "would_clamp": 1, "would_downgrade": 5, "would_deny": 4,
    }  # fmt: skip
    named = Counter(
        (r.extra["shadow"]["budget"], r.extra["shadow"]["action"])
        for r in records
        if r.extra["shadow"]["action"] != "allow"
    )
    by_budget = {b.budget: b for b in report.budgets}
    for (budget, action), n in named.items():
        tally = by_budget[budget]
        assert {"clamp": tally.clamped, "downgrade": tally.downgraded, "deny": tally.denied}[
            action
        ] == n
    assert by_budget["user:* 100,000 tokens/day"].calls == 30
    assert by_budget["user:* 100,000 tokens/day"].allowed == 30
    assert t.tokens_saved == 4 * 100 + 50  # four denials; the clamp cut 90 output tokens to 40
    guard.close()


def test_replay_json_has_every_field() -> None:
    """ReplayReport.to_dict: the counts, the period, totals, one entry per budget, and the
    decisions and shadow verdicts found in the log."""
    rows = [
        UsageRecord(T0 + i, f"r{i}", ("global", "team:a"), "gpt-4o", "gpt-4o", "allow",
                    input_tokens=100, output_tokens=300, usd=0.0035)
        for i in range(3)
    ] + [UsageRecord(T0 + 3, "r3", ("global", "team:a"), "gpt-4o", "gpt-4o", "deny")]  # fmt: skip
    policy = load_policy_dict({"budgets": [{"scope": "team:a", "limit": "1k tokens/day"}]})
    out = replay(policy, rows).to_dict()
    assert set(out) == {
        "records", "replayed", "not_replayed", "since", "until", "totals", "budgets", "recorded",
    }  # fmt: skip
    assert (out["records"], out["replayed"], out["not_replayed"]) == (4, 3, 1)
    assert (out["since"], out["until"]) == (T0, T0 + 2)
    fields = {
        "budget", "scope", "window", "calls", "allowed", "clamped", "downgraded", "denied",
        "tokens_saved", "usd_saved",
    }  # fmt: skip
    assert set(out["totals"]) == fields
    (budget,) = out["budgets"]
    assert set(budget) == fields
    assert (budget["budget"], budget["scope"], budget["window"]) == (
        "team:a 1,000 tokens/day", "team:a", "day",
    )  # fmt: skip
    assert (budget["calls"], budget["allowed"], budget["clamped"]) == (3, 2, 1)
    assert budget["tokens_saved"] == 200  # the third call clamped from 300 to 100 output
    assert 0 < budget["usd_saved"] < 0.0035
    assert out["recorded"] == {"allow": 3, "deny": 1}
    json.dumps(out)


def test_replay_windows_reset_and_roll() -> None:
    """A calendar window starts afresh the next day; a rolling window forgets spend older
    than its length: a replay charges calls to the windows of their own time."""
    day, hour = 86400.0, 3600.0
    policy = load_policy_dict({"budgets": [
        {"scope": "user:*", "limit": "250 tokens/day"},
        {"scope": "team:*", "limit": "250 tokens/rolling:1h"},
    ]})  # fmt: skip

    def rec(i: int, ts: float, scope: str) -> UsageRecord:
        return UsageRecord(ts, f"r{i}", ("global", scope), "gpt-4o", "gpt-4o", "allow",
                           input_tokens=20, output_tokens=80)  # fmt: skip

    user = [rec(i, T0 + i, "user:ann") for i in range(3)] + [rec(3, T0 + day, "user:ann")]
    team = [rec(i, T0 + i * 600, "team:x") for i in range(3)] + [rec(3, T0 + 2 * hour, "team:x")]
    for rows in (user, team):
        t = replay(policy, rows).totals
        assert (t.allowed, t.clamped, t.denied) == (3, 1, 0)  # only the third is clamped


def test_replay_shortcuts_agree_with_the_full_ladder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay decides the commonest steps itself (a downgrade past downgrade_at, a deny
    no clamp or cheaper model avoids); with those shortcuts off, every call going through
    core.ladder.decide, a random log replays to the very same report."""
    rng = random.Random(7)
    models = ("gpt-4o", "gpt-4o-mini", "o3")
    rows = []
    for i in range(3000):
        user = rng.randrange(12)
        extra = {}
        if i % 3 == 0:
            asked = rng.choice((None, 200, 600))
            extra = {"shadow": {"action": "allow", "request": {"input_tokens": 300,
                                                               "max_tokens": asked}}}  # fmt: skip
        rows.append(
            UsageRecord(T0 + i * 37, f"r{i}", ("global", f"team:{user % 3}", f"user:{user}"),
                        rng.choice(models), rng.choice(models), rng.choice(("allow", "clamp")),
                        input_tokens=rng.randint(50, 900), output_tokens=rng.randint(1, 700),
                        usd=rng.random() / 100, extra=extra)
        )  # fmt: skip
    policy = load_policy_dict({
        "downgrade": {"gpt-4o": "gpt-4o-mini", "o3": "gpt-4o-mini"},
        "request": {"max_output_tokens": 500},
        "min_output_tokens": 50,
        "budgets": [
            {"scope": "team:*", "tokens": 250_000, "window": "day", "downgrade_at": 0.5},
            {"scope": "team:*", "usd": 0.6, "window": "day"},
            {"scope": "user:*", "limit": "60k tokens/day"},
            {"scope": "user:*", "limit": "15k tokens/rolling:2h"},
            {"scope": "global", "requests": 2000, "window": "month"},
        ],
    })  # fmt: skip
    fast = replay(policy, rows).to_dict()
    t = fast["totals"]

    assert min(t["clamped"], t["downgraded"], t["denied"]) > 20  # every step is exercised
    monkeypatch.setattr(Replay, "_hopeless", lambda self, plan, lines: None)
    monkeypatch.setattr(replay_module, "fits", lambda plan, lines: False)
    slow = replay(policy, rows).to_dict()
    assert slow == fast


def test_iter_records_reads_every_record_once_across_pages_of_one_instant() -> None:
    """Paging by ts reads records that share an instant exactly once, in order, even when
    more of them share it than a page holds."""
    ledger = ledger_from_url("memory://")
    stamps = [T0] * 5 + [T0 + 1] * 2 + [T0 + 2] * 7 + [T0 + 3]
    for i, ts in enumerate(stamps):
        ledger.append_usage(UsageRecord(ts, f"r{i:02d}", ("global",), "m", "m", "deny"))
    for page in (1, 2, 3, 4, 100):
        got = [r.reservation_id for r in iter_records(ledger, page=page)]
        assert got == [f"r{i:02d}" for i in range(len(stamps))], page
    since = [r.reservation_id for r in iter_records(ledger, since=T0 + 1, until=T0 + 3, page=2)]
    assert since == [f"r{i:02d}" for i in range(5, 14)]
    ledger.close()


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
def shadow_log(tmp_path: Path) -> Path:
    """A policy file in shadow mode on a SQLite ledger, and the log of run_calls under it."""
    data = policy_data(mode="shadow", ledger=f"sqlite:///{tmp_path / 'ledger.db'}")
    path = tmp_path / "budgets.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    clock = Clock()
    guard = BudgetGuard.from_config(path, clock=clock)
    run_calls(guard, clock)
    guard.close()
    enforce = tmp_path / "enforce.yaml"
    enforce.write_text(json.dumps({**data, "mode": "enforce"}))
    return path


def test_tb_replay_json(shadow_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tb replay --policy NEW --json` replays the current policy's ledger through NEW and
    prints the report, with the policy's path and the seconds it took."""
    new = shadow_log.parent / "enforce.yaml"
    assert main(["--config", str(shadow_log), "replay", "--policy", str(new), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == str(new) and out["seconds"] >= 0
    t = out["totals"]
    assert (t["calls"], t["clamped"], t["downgraded"], t["denied"]) == (30, 1, 5, 4)
    assert [b["budget"] for b in out["budgets"]] == [
        "team:a 1,050 tokens/day", "team:b 2,000 tokens/day", "user:* 100,000 tokens/day",
    ]  # fmt: skip
    args = ["replay", "--policy", str(new), "--since", str(T0 + 100), "--until", str(T0 + 200)]
    assert main(["--config", str(shadow_log), *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == 10


def test_tb_replay_table_fits_80_columns(
    shadow_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table: a line on what was replayed, then a row per budget and one for all calls,
    within 80 columns."""
    new = shadow_log.parent / "enforce.yaml"
    ledger = ledger_from_url(f"sqlite:///{shadow_log.parent / 'ledger.db'}")
    ledger.append_usage(UsageRecord(T0 + 1, "r", ("global", "team:a"), "o3", "o3", "deny"))
    ledger.close()
    assert main(["replay", "--policy", str(new), "--config", str(shadow_log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "30 calls replayed from 2026-09-21 14:13 UTC to 2026-09-21 14:18 UTC"
    assert lines.pop(1) == "1 refusals in the log not replayed (they did not run)"
    assert lines[1].split() == ["budget", "calls", "allow", "clamp", "down", "deny", "tok",
                                "saved", "usd", "saved"]  # fmt: skip
    team_a = next(line for line in lines if line.startswith("team:a"))
    assert team_a.split()[3:10] == ["15", "10", "1", "0", "4", "450", team_a.split()[-1]]
    assert lines[-1].split()[:7] == ["all", "calls", "30", "20", "1", "5", "4"]
    assert max(len(line) for line in lines) <= 80


def test_tb_report_shadow(shadow_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tb report --shadow` counts the shadow verdicts per scope (or model, day, kind): what
    enforcement would have allowed, clamped, downgraded and denied, and what the would-be
    denials spent; the table fits 80 columns."""
    assert main(["--config", str(shadow_log), "report", "--shadow", "--json"]) == 0
    rows = {r["scope"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["team:a"] == {
        "scope": "team:a", "requests": 15, "shadowed": 15, "would_allow": 10, "would_clamp": 1,
        "would_downgrade": 0, "would_deny": 4, "would_deny_tokens": 400,
        "would_deny_usd": pytest.approx(4 * (10 * 2.5e-6 + 90 * 1e-5)),
    }  # fmt: skip
    assert rows["global"]["would_downgrade"] == 5
    assert main(["--config", str(shadow_log), "report", "--shadow", "--by", "team"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["team", "reqs", "shadow", "allow", "clamp", "down", "deny",
                                "deny", "tok", "deny", "usd"]  # fmt: skip
    assert [line.split()[0] for line in lines[2:]] == ["team:a", "team:b"]
    assert max(len(line) for line in lines) <= 80


def test_tb_replay_bad_inputs(
    shadow_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or malformed new policy, and a --since it cannot read, are one clear line on
    stderr and exit status 1; --policy is required."""
    base = ["--config", str(shadow_log), "replay"]
    assert main([*base, "--policy", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml: cannot read the policy file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - {scope: team:a, tokens: lots, window: day}\n")
    assert main([*base, "--policy", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "tokens" in err
    good = str(shadow_log.parent / "enforce.yaml")
    assert main([*base, "--policy", good, "--since", "last tuesday"]) == 1
    assert "cannot read time 'last tuesday'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(base)
    assert info.value.code == 2
    assert "--policy" in capsys.readouterr().err
    missing = ["--config", str(tmp_path / "none.yaml"), "replay", "--policy", good]
    assert main(missing) == 1
    assert "no policy file" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["tb_plugins.core.ladder", "tb_plugins.engine.replay"])
def test_doctests(module: str) -> None:
    """The examples in the docstrings of the ladder and the replay hold."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
