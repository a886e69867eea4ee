"""The `tb` command: every command has help; status, report and budgets check work."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest

from tb_plugins import BudgetGuard, Usage
from tb_plugins.cli import build_parser, main, parse_since

POLICY = """
ledger: sqlite:///{db}
alerts: []
budgets:
  - scope: team:search
    tokens: 10k
    window: day
  - scope: user:*
    limit: 5k tokens/day
"""


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out.extend(commands(sub, (*prefix, name)))
    return out


ALL_COMMANDS = commands(build_parser())


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[" ".join(c) for c in ALL_COMMANDS])
def test_every_command_has_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb <command> --help` exits 0 and describes the command."""
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: tb" in capsys.readouterr().out


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    guard = BudgetGuard.from_config(path)
    for user, tokens in (("ann", 300), ("bob", 1200)):
        d = guard.check(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            scopes=["team:search", f"user:{user}"],
        )
        guard.settle(d, Usage(tokens, 100))
    guard.close()
    return path


def test_status_shows_each_budget_as_json(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tb status --json` lists the team budget and each user seen, with spend."""
    assert main(["--config", str(policy), "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    spent = {r["scope"]: r["spent"] for r in rows}
    assert spent == {"team:search": 1700, "user:ann": 400, "user:bob": 1300}
    assert all(r["resets_at_iso"] for r in rows)


def test_status_table_for_one_scope(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tb status --scope user:bob` prints a table for that scope only."""
    assert main(["--config", str(policy), "status", "--scope", "user:bob"]) == 0
    out = capsys.readouterr().out
    assert "user:bob" in out and "team:search" not in out and "1,300" in out


def test_report_by_scope_as_csv(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tb report --by scope --csv` (config from TB_PLUGINS_CONFIG) totals each scope."""
    monkeypatch.setenv("TB_PLUGINS_CONFIG", str(policy))
    assert main(["report", "--by", "scope", "--csv"]) == 0
    rows = {r["scope"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows["global"]["requests"] == "2" and rows["global"]["tokens"] == "1700"
    assert rows["user:ann"]["tokens"] == "400"


def test_report_by_model_and_since(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tb report --by model --since 1h` sees the recent calls; --since in the future sees none."""
    assert (
        main(["--config", str(policy), "report", "--by", "model", "--since", "1h", "--json"]) == 0
    )
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "gpt-4o" and row["requests"] == 2
    assert main(["--config", str(policy), "report", "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_budgets_check_accepts_a_good_file_and_refuses_a_bad_one(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb budgets check` prints ok for a good file, and exits 1 naming the field of a bad one."""
    assert main(["budgets", "check", str(policy)]) == 0
    assert "ok (2 budgets" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - scope: team:x\n    tokens: 5\n    window: fortnight\n")
    assert main(["budgets", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: budgets[0] (scope 'team:x'): field 'window'" in err


def test_a_missing_policy_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a policy file, `tb status` says how to name one."""
    monkeypatch.delenv("TB_PLUGINS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 1
    assert "pass --config FILE or set TB_PLUGINS_CONFIG" in capsys.readouterr().err


def test_since_reads_durations_dates_and_epochs() -> None:
    """--since takes 24h, an ISO date, or epoch seconds."""
    assert parse_since("24h", now=100_000.0) == 100_000.0 - 86400
    assert parse_since("1970-01-02") == 86400
    assert parse_since("12345") == 12345
    with pytest.raises(ValueError, match="cannot read time"):
        parse_since("yesterday-ish")
