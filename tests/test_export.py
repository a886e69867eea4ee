"""`tb export FILE.db`: the usage log, budgets and status as a sqlite-utils database."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tb_plugins import BudgetExceeded, BudgetGuard, Usage
from tb_plugins.cli import main

sqlite_utils = pytest.importorskip("sqlite_utils")

POLICY = """
ledger: sqlite:///{db}
alerts: []
budgets:
  - scope: team:search
    limit: 10k tokens/day
    alerts: [0.8]
  - scope: user:*
    limit: 5k tokens/day
  - scope: team:search
    usd: 2
    window: month
"""

DAY = 86_400.0


def _call(guard: BudgetGuard, user: str, tokens: int, rid: str | None = None) -> None:
    d = guard.check(
        "gpt-4o",
        input_tokens=tokens,
        max_tokens=50,
        scopes=["team:search", f"user:{user}"],
        reservation_id=rid,
    )
    guard.settle(d, Usage(tokens, 50, cached_input_tokens=tokens // 4))


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """Two users on one team: two calls two days ago, three today and one refused today."""
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    now = time.time()
    old = BudgetGuard.from_config(path, clock=lambda: now - 2 * DAY)
    _call(old, "ann", 100)
    _call(old, "bob", 200)
    old.close()
    guard = BudgetGuard.from_config(path)
    _call(guard, "ann", 300)
    _call(guard, "bob", 1200)
    _call(guard, "ann", 40)
    with pytest.raises(BudgetExceeded):
        guard.check("gpt-4o", input_tokens=6000, scopes=["team:search", "user:carl"])
    guard.close()
    return path


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    return rows


def test_usage_has_one_row_per_record_of_the_log(policy: Path, tmp_path: Path) -> None:
    """`usage` holds every record of the ledger, keyed by reservation id, with ts in epoch
    and ISO form and scopes as JSON text."""
    out = tmp_path / "usage.db"
    assert main(["--config", str(policy), "export", str(out)]) == 0
    guard = BudgetGuard.from_config(policy)
    records = guard.ledger.records()
    guard.close()
    db = sqlite_utils.Database(out)
    assert db["usage"].count == len(records) == 6
    assert db["usage"].pks == ["reservation_id"]
    rows = {r["reservation_id"]: r for r in db["usage"].rows}
    assert set(rows) == {r.reservation_id for r in records}
    for rec in records:
        row = rows[rec.reservation_id]
        assert row["ts"] == rec.ts and row["ts_iso"].startswith("20")
        assert json.loads(row["scopes"]) == list(rec.scopes)
        assert (row["model"], row["action"], row["usd"]) == (rec.model, rec.action, rec.usd)
        assert row["cached_input_tokens"] == rec.cached_input_tokens
        assert row["priced"] == int(rec.priced) and row["estimated"] == int(rec.estimated)


def test_the_refused_call_is_exported_as_deny(policy: Path, tmp_path: Path) -> None:
    """The call refused for user:carl is a `deny` row with its scopes and no tokens."""
    out = tmp_path / "usage.db"
    assert main(["--config", str(policy), "export", str(out)]) == 0
    db = sqlite_utils.Database(out)
    (row,) = db["usage"].rows_where("action = ?", ["deny"])
    assert json.loads(row["scopes"]) == ["global", "team:search", "user:carl"]
    assert row["tokens"] == 0
    scopes = [
        r["scope"]
        for r in db["usage_scopes"].rows_where("reservation_id = ?", [row["reservation_id"]])
    ]
    assert sorted(scopes) == ["global", "team:search", "user:carl"]


def test_totals_per_scope_from_sql_equal_the_report(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grouping `usage_scopes` joined to `usage` by scope gives `tb report --by scope`'s
    totals, and `usage_scopes` references `usage` by a foreign key."""
    out = tmp_path / "usage.db"
    assert main(["--config", str(policy), "export", str(out)]) == 0
    report = _json(["--config", str(policy), "report", "--by", "scope", "--json"], capsys)
    db = sqlite_utils.Database(out)
    (fk,) = db["usage_scopes"].foreign_keys
    assert (fk.column, fk.other_table, fk.other_column) == (
        "reservation_id",
        "usage",
        "reservation_id",
    )
    sql = """
        SELECT s.scope, sum(u.action != 'deny') AS requests, sum(u.action = 'deny') AS denied,
               sum(u.input_tokens) AS input_tokens, sum(u.output_tokens) AS output_tokens,
               sum(u.cached_input_tokens) AS cached_input_tokens, sum(u.tokens) AS tokens,
               sum(u.usd) AS usd
        FROM usage_scopes s JOIN usage u USING (reservation_id)
        GROUP BY s.scope ORDER BY s.scope
    """
    exported = {r["scope"]: r for r in db.query(sql)}
    assert set(exported) == {r["scope"] for r in report}
    assert {"global", "team:search", "user:ann", "user:bob", "user:carl"} == set(exported)
    for row in report:
        got = exported[row["scope"]]
        for key in ("requests", "denied", "input_tokens", "output_tokens", "cached_input_tokens"):
            assert got[key] == row[key], (row["scope"], key)
        assert got["tokens"] == row["tokens"]
        assert got["usd"] == pytest.approx(row["usd"])


def test_budgets_and_status_tables(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`budgets` has one row per budget of the policy with its limit per unit and window;
    `status` has the rows `tb status --json` prints."""
    out = tmp_path / "usage.db"
    assert main(["--config", str(policy), "export", str(out)]) == 0
    status = _json(["--config", str(policy), "status", "--json"], capsys)
    db = sqlite_utils.Database(out)
    budgets = list(db["budgets"].rows_where(order_by="[index]"))
    assert [(b["scope"], b["window"]) for b in budgets] == [
        ("team:search", "day"),
        ("user:*", "day"),
        ("team:search", "month"),
    ]
    assert [(b["tokens"], b["usd"]) for b in budgets] == [
        (10_000, None),
        (5_000, None),
        (None, 2.0),
    ]
    assert json.loads(budgets[0]["alerts"]) == [0.8]
    assert [b["is_pattern"] for b in budgets] == [0, 1, 0]
    rows = list(db["status"].rows)
    key = ("scope", "budget", "window", "unit")
    assert sorted(tuple(r[k] for k in key) for r in rows) == sorted(
        tuple(s[k] for k in key) for s in status
    )
    spent = {(r["scope"], r["unit"]): r["spent"] for r in rows if r["window"] == "day"}
    assert spent[("user:bob", "tokens")] == 1250
    assert spent[("team:search", "tokens")] == 1690


def test_exporting_again_replaces_the_tables(policy: Path, tmp_path: Path) -> None:
    """A second export to the same file holds each row once, and a narrower one drops the
    rows it no longer covers; a table of the user's own in the file is kept."""
    out = tmp_path / "usage.db"
    assert main(["--config", str(policy), "export", str(out)]) == 0
    sqlite_utils.Database(out)["notes"].insert({"text": "mine"})
    assert main(["--config", str(policy), "export", str(out)]) == 0
    db = sqlite_utils.Database(out)
    counts = {t: db[t].count for t in ("usage", "usage_scopes", "budgets", "status")}
    assert counts["usage"] == 6 and counts["budgets"] == 3
    assert counts["usage_scopes"] == 18  # each call on global, team:search and one user
    assert main(["--config", str(policy), "export", str(out), "--since", "1d"]) == 0
    assert db["usage"].count == 4 and db["usage_scopes"].count == 12
    assert db["notes"].count == 1


def test_since_and_until_filter_the_usage_log(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--since 1d` keeps today's four records; `--until 1d` the two from two days ago."""
    recent, older = tmp_path / "recent.db", tmp_path / "older.db"
    assert main(["export", str(recent), "--since", "1d", "--config", str(policy)]) == 0
    assert "4 usage records, 3 budgets" in capsys.readouterr().out
    assert main(["--config", str(policy), "export", str(older), "--until", "1d"]) == 0
    cutoff = time.time() - DAY
    assert all(r["ts"] >= cutoff for r in sqlite_utils.Database(recent)["usage"].rows)
    rows = list(sqlite_utils.Database(older)["usage"].rows)
    assert len(rows) == 2 and all(r["ts"] < cutoff for r in rows)


def test_a_reused_reservation_id_keeps_every_record(tmp_path: Path) -> None:
    """Two records under one reservation id (a caller reusing its id) are both exported,
    the second keyed `<id>#2`."""
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    guard = BudgetGuard.from_config(path)
    with pytest.raises(BudgetExceeded):
        guard.check("gpt-4o", input_tokens=6000, scopes=["user:ann"], reservation_id="r1")
    _call(guard, "ann", 10, rid="r1")
    guard.close()
    out = tmp_path / "usage.db"
    assert main(["--config", str(path), "export", str(out)]) == 0
    db = sqlite_utils.Database(out)
    actions = {r["reservation_id"]: r["action"] for r in db["usage"].rows}
    assert actions == {"r1": "deny", "r1#2": "allow"}


def test_without_sqlite_utils_the_error_names_the_extra(
    policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without sqlite-utils, `tb export` exits 1 with the pip command for the extra."""
    monkeypatch.setitem(sys.modules, "sqlite_utils", None)
    assert main(["--config", str(policy), "export", str(tmp_path / "x.db")]) == 1
    assert "pip install 'tb-plugins[export]'" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()
