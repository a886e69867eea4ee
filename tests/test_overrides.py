"""Runtime budget overrides: set in one guard (or by `tb budgets set` in another process),
applied by every guard sharing the ledger within `override_refresh`, audited, expiring."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import _SERVER_NAMESPACES, make_ledger, require_server
from tb_plugins import BudgetExceeded, BudgetGuard, ConfigError
from tb_plugins.config import load_policy_dict
from tb_plugins.engine.overrides import Override, OverrideLog
from tb_plugins.ledger import Ledger

POLICY: dict[str, Any] = {
    "ledger": "memory://",
    "alerts": [],
    "budgets": [
        {"scope": "team:*", "limit": "1k tokens/day", "alerts": [0.5]},
        {"scope": "user:*", "limit": "$1/day"},
    ],
}


class Clocks:
    """A wall clock and a monotonic clock a test moves together."""

    def __init__(self, t: float | None = None) -> None:
        # Now by default: a guard on Redis or PostgreSQL follows the server's clock, which an
        # injected wall clock far ahead would hold back (the guard's time never steps back).
        self.t = time.time() if t is None else t
        self.mono = 0.0

    def wall(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.mono += seconds


def guard_on(ledger: Ledger, clocks: Clocks, **policy: Any) -> BudgetGuard:
    return BudgetGuard(
        load_policy_dict({**POLICY, **policy}),
        ledger,
        clock=clocks.wall,
        monotonic=clocks.monotonic,
    )


def call(guard: BudgetGuard, scope: str, tokens: int = 600) -> str:
    """Check and settle one call of `tokens` (input only); its action, or 'deny'."""
    try:
        d = guard.check(model="gpt-4o-mini", input_tokens=tokens, max_tokens=1, scopes=[scope])
    except BudgetExceeded:
        return "deny"
    guard.settle(d)
    return d.action


def test_raising_a_pattern_limit_for_one_scope_admits_more_on_every_ledger(ledger: Ledger) -> None:
    """An override on `team:search` replaces the file's `team:*` limit for that team only."""
    clocks = Clocks()
    guard = guard_on(ledger, clocks)
    assert call(guard, "team:search") == "allow"
    assert call(guard, "team:search") == "deny"  # 1,200 > 1k
    change = guard.set_budget("team:search", "3k tokens/day", reason="launch week")
    assert change.version == 1 and change.window == "day" and change.actor
    assert call(guard, "team:search") == "allow"  # 1,800 <= 3k: applied at once, same spend
    assert call(guard, "team:ads") == "allow"
    assert call(guard, "team:ads") == "deny"  # other teams keep the file's limit
    entries = {(e.scope, e.source): e for e in guard.budgets()}
    assert entries[("team:search", "override")].limit == "3,000 tokens"
    assert entries[("team:search", "override")].reason == "launch week"
    assert entries[("team:*", "file")].limit == "1,000 tokens"


def test_lowering_suspending_and_unsetting(ledger: Ledger) -> None:
    """A lower limit refuses sooner, `0` suspends a scope, unset restores the file's budget."""
    clocks = Clocks()
    guard = guard_on(ledger, clocks)
    guard.set_budget("team:search", "500 tokens/day")
    assert call(guard, "team:search") == "deny"
    guard.set_budget("key:ci-bot", 0, reason="runaway job")  # a scope no file budget names
    with pytest.raises(BudgetExceeded, match="suspended"):
        guard.check(model="gpt-4o-mini", input_tokens=1, max_tokens=1, scopes=["key:ci-bot"])
    assert call(guard, "key:other", 10) == "allow"
    guard.unset_budget("team:search")
    guard.unset_budget("key:ci-bot", window="total")
    assert call(guard, "team:search") == "allow"
    assert call(guard, "key:ci-bot", 10) == "allow"
    assert [e.source for e in guard.budgets()] == ["file", "file"]


def test_a_concrete_override_wins_over_a_pattern_override() -> None:
    """`team:search` keeps its own override when `team:*` is overridden too; per unit, the
    file's other limits still apply."""
    clocks = Clocks()
    guard = guard_on(make_ledger("memory", Path(".")), clocks, budgets=[
        {"scope": "team:*", "window": "day", "tokens": 1000, "requests": 2},
    ])  # fmt: skip
    guard.set_budget("team:*", "100 tokens/day")
    guard.set_budget("team:search", "5k tokens/day")
    assert call(guard, "team:ads", 200) == "deny"
    assert call(guard, "team:search", 2000) == "allow"
    assert call(guard, "team:search", 10) == "allow"
    assert call(guard, "team:search", 10) == "deny"  # the file's 2 requests/day still holds


def test_another_guard_applies_a_change_within_override_refresh(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A guard sharing the ledger sees a change at its first check after `override_refresh`
    seconds, and not before (injected monotonic clock)."""
    clocks_a, clocks_b = Clocks(), Clocks()
    a = guard_on(ledger, clocks_a)
    b = guard_on(ledger, clocks_b, override_refresh="10s")
    assert call(b, "team:search") == "allow"
    a.set_budget("team:search", "3k tokens/day")
    clocks_b.advance(9)
    assert call(b, "team:search") == "deny"  # not read yet
    clocks_b.advance(2)
    assert call(b, "team:search") == "allow"  # read at this check: 1,200 <= 3k
    a.unset_budget("team:search")
    clocks_b.advance(11)
    assert call(b, "team:search") == "deny"


def test_an_expired_override_stops_applying(ledger: Ledger) -> None:
    """`until` ends an override at the first check after it, in every guard (within a
    minute: a guard on Redis or PostgreSQL reads the server's clock again after that)."""
    clocks = Clocks()
    guard = guard_on(ledger, clocks)
    guard.set_budget("team:search", "5k tokens/day", until=guard.now() + 30)
    assert call(guard, "team:search") == "allow"
    assert call(guard, "team:search") == "allow"
    clocks.advance(31)
    assert call(guard, "team:search") == "deny"
    assert [e.source for e in guard.budgets()] == ["file", "file"]
    history = guard.budget_history()
    assert len(history) == 1 and history[0].change.until is not None


def test_history_shows_when_who_before_after_and_why(ledger: Ledger) -> None:
    """The audit trail keeps every change in order with the limit it replaced."""
    clocks = Clocks()
    guard = guard_on(ledger, clocks)
    guard.set_budget("team:search", "2k tokens/day", reason="first", actor="alice@ops")
    clocks.advance(5)
    guard.set_budget("team:search", "3k tokens/day", reason="more", actor="bob@ops")
    guard.unset_budget("team:search", reason="done", actor="alice@ops")
    rows = [h.to_dict() for h in guard.budget_history()]
    assert [(r["actor"], r["before"], r["limit"], r["reason"]) for r in rows] == [
        ("alice@ops", None, "2k tokens/day", "first"),
        ("bob@ops", "2k tokens/day", "3k tokens/day", "more"),
        ("alice@ops", "3k tokens/day", None, "done"),
    ]
    assert rows[1]["ts"] == rows[0]["ts"] + 5
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert guard.budget_history("team:other") == []


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("team:search", "3 bananas/day"), {}, "unknown unit 'bananas'"),
        (("team:search", "3k tokens"), {}, "cannot read '3k tokens'"),
        (("team:search", "3k tokens/fortnight"), {}, "unknown window"),
        (("team:search", "2000000000000000 tokens/day"), {}, "above the maximum"),
        (("team:search", "$5000000000/day"), {}, "above the maximum"),
        (("team:search", "3k tokens/day"), {"window": "hour"}, "contradicts"),
        (("planet:earth", "3k tokens/day"), {}, "unknown scope kind"),
        (("team:a\x1b[2J", "3k tokens/day"), {}, "control character"),
        (("team:search", "3k tokens/day"), {"until": 1.0}, "must be in the future"),
        (("team:search", "3k tokens/day"), {"until": float("nan")}, "expected a time"),
        (("team:search", "3k tokens/day"), {"reason": "x" * 501}, "at most 500"),
        (("team:search", "3k tokens/day"), {"reason": "a\x00b"}, "printable"),
        (("team:search", None), {}, "expected text"),
        (("run:x", "5 calls/day"), {}, None),  # allowed: calls on a run scope
        (("team:x", "5 calls/day"), {}, "calls limit applies to 'run:'"),
    ],
)
def test_a_bad_override_is_refused_clearly_and_writes_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str | None
) -> None:
    """The policy file's messages, naming the field; the ledger's log is unchanged."""
    clocks = Clocks()
    guard = guard_on(make_ledger("memory", Path(".")), clocks)
    if message is None:
        guard.set_budget(*args, **kwargs)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        guard.set_budget(*args, **kwargs)
    assert guard.ledger.overrides() == []


def test_unsetting_what_is_not_there_is_refused() -> None:
    """Unset names what it cannot find and writes nothing."""
    guard = guard_on(make_ledger("memory", Path(".")), Clocks())
    with pytest.raises(ConfigError, match="no override of 'team:search'"):
        guard.unset_budget("team:search")
    assert guard.ledger.overrides() == []


def test_an_unreadable_change_in_the_log_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A body no guard wrote (hand-edited log) is logged and skipped; later changes apply."""
    guard = guard_on(make_ledger("memory", Path(".")), Clocks())
    guard.ledger.append_override("{not json")
    bad_until = {"action": "set", "scope": "team:x", "window": "day", "until": "soon"}
    guard.ledger.append_override(json.dumps(bad_until))
    guard.set_budget("team:search", "3k tokens/day")
    assert [e.scope for e in guard.budgets() if e.source == "override"] == ["team:search"]
    assert "override 1 in the ledger is unreadable" in caplog.text
    assert "override 2 in the ledger is unreadable" in caplog.text


def test_the_ledger_refuses_an_oversized_change() -> None:
    """The ledger stores at most MAX_OVERRIDE_BODY characters per change."""
    from tb_plugins.errors import LedgerError

    ledger = make_ledger("memory", Path("."))
    with pytest.raises(LedgerError, match="longer than"):
        ledger.append_override("x" * 5000)
    with pytest.raises(LedgerError, match="whole number"):
        ledger.overrides(after=-1)


def test_an_override_takes_the_file_budgets_alerts() -> None:
    """Alerts fire against the override's limit, with the file budget's thresholds."""
    fired: list[Any] = []
    guard = BudgetGuard(
        load_policy_dict(POLICY), make_ledger("memory", Path(".")), alert_sinks=[fired.append]
    )
    guard.set_budget("team:search", "10k tokens/day")
    call(guard, "team:search", 4000)
    fired[:] = [a for a in fired if a.kind == "threshold"]  # a forecast alert may come too
    assert fired == []  # 40 % of the override (the file's 1k would be 400 %)
    call(guard, "team:search", 2000)
    fired[:] = [a for a in fired if a.kind == "threshold"]
    assert [a.threshold for a in fired] == [0.5]
    assert "(override)" in fired[0].budget


def test_async_twins() -> None:
    """aset_budget / aunset_budget / abudgets / abudget_history and the async check path."""

    async def main() -> None:
        guard = guard_on(make_ledger("memory", Path(".")), Clocks())
        await guard.aset_budget("team:search", "3k tokens/day")
        d = await guard.acheck(
            model="gpt-4o-mini", input_tokens=2000, max_tokens=1, scopes=["team:search"]
        )
        await guard.asettle(d)
        assert [e.source for e in await guard.abudgets()] == ["file", "file", "override"]
        await guard.aunset_budget("team:search")
        assert len(await guard.abudget_history()) == 2
        with pytest.raises(BudgetExceeded):
            await guard.acheck(
                model="gpt-4o-mini", input_tokens=10, max_tokens=1, scopes=["team:search"]
            )

    asyncio.run(main())


def test_fold_of_the_log() -> None:
    """OverrideLog keeps the last set per scope and window; an unset without a window clears
    every window of its scope."""
    log = OverrideLog()
    changes = [
        Override("set", "team:a", "day", "1k tokens/day"),
        Override("set", "team:a", "hour", "1k tokens/hour"),
        Override("set", "team:b", "day", "2k tokens/day"),
        Override("unset", "team:a", ""),
    ]
    assert log.add((i + 1, c.to_json()) for i, c in enumerate(changes))
    assert [o.scope for o in log.live(0)] == ["team:b"]
    assert not log.add([(2, changes[0].to_json())])  # already seen
    assert log.version == 4


# -- real processes: `tb budgets set` in one, a guard in another -----------------------------


def _ledger_url(backend: str, tmp_path: Path) -> str:
    from uuid import uuid4

    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if backend == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        prefix = f"tbtest-{uuid4().hex}"
        _SERVER_NAMESPACES.append(("redis", prefix))
        return f"redis://127.0.0.1:6379/15?prefix={prefix}"
    require_server("PostgreSQL", "127.0.0.1", 5432)
    schema = f"tbtest_{uuid4().hex}"
    _SERVER_NAMESPACES.append(("postgres", schema))
    return f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}"


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def test_tb_budgets_set_in_another_process_changes_this_guards_decisions(
    backend: str, tmp_path: Path
) -> None:
    """`tb budgets set` run as its own process reaches a running guard within its
    `override_refresh`; `tb budgets list` and `history` show it; `unset` takes it back."""
    import yaml

    url = _ledger_url(backend, tmp_path)
    policy = {**POLICY, "ledger": url, "override_refresh": 5}
    config = tmp_path / "budgets.yaml"
    config.write_text(yaml.safe_dump(policy))
    clocks = Clocks()
    guard = BudgetGuard(load_policy_dict(policy), clock=clocks.wall, monotonic=clocks.monotonic)
    try:
        assert call(guard, "team:search") == "allow"

        def tb(*argv: str) -> str:
            out = subprocess.run(
                [sys.executable, "-m", "tb_plugins.cli", "--config", str(config), *argv],
                capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            return out.stdout

        assert "[override 1]" in tb("budgets", "set", "team:search", "3k tokens/day",
                                    "--reason", "launch week", "--actor", "ops")  # fmt: skip
        assert call(guard, "team:search") == "deny"  # within the refresh: not yet
        clocks.advance(5)
        assert call(guard, "team:search") == "allow"  # the documented delay has passed
        listed = json.loads(tb("budgets", "list", "--json"))
        assert {"scope": "team:search", "window": "day", "limit": "3,000 tokens",
                "source": "override", "until": None, "reason": "launch week",
                "actor": "ops", "version": 1} in listed  # fmt: skip
        history = json.loads(tb("budgets", "history", "--json"))
        assert [(h["scope"], h["limit"], h["before"]) for h in history] == [
            ("team:search", "3k tokens/day", None)
        ]
        tb("budgets", "unset", "team:search")
        clocks.advance(5)
        assert call(guard, "team:search") == "deny"
    finally:
        guard.close()


def test_import_tb_plugins_loads_no_pydantic() -> None:
    """The override code validates with the policy's models, loaded with the first policy or
    override, not by `import tb_plugins` (which stays light)."""
    code = "import sys, tb_plugins; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
