"""The `tb` command: every command has help; status, report and budgets check work."""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
import unicodedata
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tb_plugins import BudgetGuard, Usage
from tb_plugins._format import redact_url
from tb_plugins.cli import build_parser, by_bare_model, main, package_version, parse_since
from tb_plugins.core.models import bare_model

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


@pytest.mark.parametrize(
    ("kind", "keys"), [("user", {"user:ann", "user:bob"}), ("team", {"team:search"})]
)
def test_report_by_a_scope_kind_has_one_row_per_scope_of_that_kind(
    policy: Path, capsys: pytest.CaptureFixture[str], kind: str, keys: set[str]
) -> None:
    """`tb report --by user` (or team, key, agent, ...) totals each scope of that kind only,
    and the rows add up to what those scopes spent."""
    assert main(["--config", str(policy), "report", "--by", kind, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r[kind] for r in rows} == keys
    assert sum(r["tokens"] for r in rows) == 1700  # ann 400 + bob 1,300; team:search 1,700


def test_usage_refuses_an_unknown_grouping(policy: Path) -> None:
    """guard.usage(group_by=...) names the groupings it knows when given another."""
    guard = BudgetGuard.from_config(policy)
    with pytest.raises(ValueError, match="scope kind"):
        guard.usage(group_by="tenant")  # type: ignore[arg-type]
    guard.close()


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


HOSTILE_SCOPE = "user:ann\x1b[2J\x07"
HOSTILE_TEAM = "team:\x1b[31mred\r"
HOSTILE_MODEL = "gpt\x1b]0;owned\x07"


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A ledger holding scope and model names with terminal escapes, written through the
    ledger API (the guard itself refuses such scopes)."""
    from tb_plugins.core.usage import UsageRecord
    from tb_plugins.core.windows import parse_window
    from tb_plugins.ledger import ledger_from_url
    from tb_plugins.ledger.base import Line, line_key

    path = tmp_path / "budgets.yaml"
    path.write_text(POLICY.format(db=tmp_path / "ledger.db"))
    ledger = ledger_from_url(f"sqlite:///{tmp_path / 'ledger.db'}")
    now = time.time()
    slot = parse_window("day").slot(now, ZoneInfo("UTC"))
    line = Line(
        key=line_key(HOSTILE_SCOPE, "day"),
        scope=HOSTILE_SCOPE,
        window="day",
        bucket=slot.bucket,
        span=slot.span,
        width=slot.width,
        limits=(5000, None, None, None, None, None),
        expires_at=slot.expires_at,
    )
    charge = (10, 5, 5, 0, 1, 1)
    assert ledger.reserve("r1", [line], charge, now=now, expires_at=now + 600).ok
    record = UsageRecord(
        ts=now,
        reservation_id="r1",
        scopes=("global", HOSTILE_SCOPE),
        model=HOSTILE_MODEL,
        requested_model=HOSTILE_MODEL,
        action="allow",
        input_tokens=5,
        output_tokens=5,
    )
    ledger.settle("r1", [line], charge, record, now=now)
    ledger.append_usage(
        UsageRecord(
            ts=now,
            reservation_id="r2",
            scopes=("global", HOSTILE_TEAM),
            model="m\r\x1b[K\x9b",
            requested_model="m",
            action="deny",
        )
    )
    ledger.close()
    return path


def raw_controls(text: str) -> list[str]:
    """Control characters other than the line breaks the output itself is made of (CSV rows
    end in CRLF)."""
    return [c for c in text.replace("\r\n", "\n") if unicodedata.category(c) == "Cc" and c != "\n"]


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--csv"],
        ["report"],
        ["report", "--csv"],
        ["report", "--by", "model"],
        ["report", "--by", "model", "--csv"],
    ],
    ids=" ".join,
)
def test_tables_and_csv_escape_control_characters_in_names(
    hostile: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`tb status` / `tb report` (table or CSV) print scope and model names with control
    characters escaped, never raw: a name cannot clear the screen or retitle the terminal."""
    assert main(["--config", str(hostile), *argv]) == 0
    out = capsys.readouterr().out
    assert raw_controls(out) == []
    if "model" in argv:
        assert "gpt\\x1b]0;owned\\x07" in out and "m\\x0d\\x1b[K\\x9b" in out
    elif "report" in argv:
        assert "user:ann\\x1b[2J\\x07" in out and "team:\\x1b[31mred\\x0d" in out
    else:
        assert "user:ann\\x1b[2J\\x07" in out


@pytest.mark.parametrize("argv", [["status", "--json"], ["report", "--json"]], ids=" ".join)
def test_json_escapes_control_characters_and_keeps_the_names(
    hostile: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """JSON output escapes control characters itself and still round-trips the exact names."""
    assert main(["--config", str(hostile), *argv]) == 0
    out = capsys.readouterr().out
    assert raw_controls(out) == []
    assert HOSTILE_SCOPE in {r["scope"] for r in json.loads(out)}


def test_budgets_check_refuses_a_duplicate_budgets_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `budgets:` sections make `tb budgets check` fail naming the key and both lines,
    instead of printing ok for the second section alone."""
    bad = tmp_path / "dup.yaml"
    bad.write_text(
        "budgets:\n  - {scope: team:a, tokens: 5, window: day}\n"
        "budgets:\n  - {scope: team:b, tokens: 5, window: day}\n"
    )
    assert main(["budgets", "check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "ok" not in captured.out
    assert "duplicate key 'budgets': first at line 1, again at line 3" in captured.err


def test_error_messages_escape_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error quoting a file name with an escape sequence prints it escaped."""
    assert main(["budgets", "check", str(tmp_path / "x\x1b[2J.yaml")]) == 1
    err = capsys.readouterr().err
    assert raw_controls(err) == [] and "x\\x1b[2J.yaml" in err


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`tb --version` prints `tb` and the installed distribution's version, and exits 0."""
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tb {importlib.metadata.version('tb-plugins')}"


def test_version_falls_back_to_the_package_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without installed metadata (running from a source tree), the version is
    `tb_plugins.__version__`."""
    import importlib.metadata

    import tb_plugins

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == tb_plugins.__version__


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{policy}", "status", "--json"],
        ["status", "--config", "{policy}", "--json"],
        ["status", "--json", "--config", "{policy}"],
        ["--config", "{other}", "status", "--config", "{policy}", "--json"],
    ],
    ids=["before", "after", "last", "after-wins"],
)
def test_config_may_come_before_or_after_the_command(
    policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    """`--config FILE` works before and after `tb status`; given in both places the later
    wins, and either beats $TB_PLUGINS_CONFIG."""
    monkeypatch.setenv("TB_PLUGINS_CONFIG", str(tmp_path / "absent.yaml"))
    names = {"policy": str(policy), "other": str(tmp_path / "other.yaml")}
    assert main([a.format(**names) for a in argv]) == 0
    assert {r["scope"] for r in json.loads(capsys.readouterr().out)} >= {"team:search"}


def test_config_after_report_and_the_default_file(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tb report --config FILE` reads FILE; with no --config and no $TB_PLUGINS_CONFIG,
    `tb report` reads ./budgets.yaml."""
    assert main(["report", "--config", str(policy), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    monkeypatch.delenv("TB_PLUGINS_CONFIG", raising=False)
    monkeypatch.chdir(policy.parent)
    assert policy.name == "budgets.yaml"
    assert main(["report", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == after
    assert {r["scope"] for r in after} >= {"global", "team:search"}


def test_report_by_model_merges_provider_prefixed_names(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb report --by model` counts `openai/gpt-4o` and `gpt-4o` as one model, `gpt-4o`,
    with requests, tokens and dollars summed; other models keep rows of their own."""
    guard = BudgetGuard.from_config(policy)
    for model in ("openai/gpt-4o", "openai/gpt-4o-mini"):
        d = guard.check(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            scopes=["team:search", "user:ann"],
        )
        guard.settle(d, Usage(50, 5))
    guard.close()
    assert main(["--config", str(policy), "report", "--by", "model", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["gpt-4o", "gpt-4o-mini"]
    assert rows["gpt-4o"]["requests"] == 3 and rows["gpt-4o"]["tokens"] == 1700 + 55
    assert rows["gpt-4o"]["input_tokens"] == 300 + 1200 + 50
    assert rows["gpt-4o-mini"]["requests"] == 1 and rows["gpt-4o-mini"]["tokens"] == 55
    assert main(["--config", str(policy), "report", "--by", "model"]) == 0
    table = capsys.readouterr().out
    assert "openai/" not in table and table.count("gpt-4o ") == 1


def test_by_bare_model_sums_every_count() -> None:
    """Rows whose names differ only by a provider prefix become one row with every count
    summed, sorted by the bare name."""
    from tb_plugins.core.usage import UsageRow

    merged = by_bare_model(
        [
            UsageRow("gpt-4o", 1, 0, 10, 2, 1, 0.5),
            UsageRow("azure/o3", 1, 1, 0, 0, 0, 0.0),
            UsageRow("openai/gpt-4o", 2, 1, 20, 4, 3, 0.25),
        ]
    )
    assert merged == [
        UsageRow("gpt-4o", 3, 1, 30, 6, 4, 0.75),
        UsageRow("o3", 1, 1, 0, 0, 0, 0.0),
    ]


@pytest.mark.parametrize(
    ("name", "bare"),
    [
        ("gpt-4o", "gpt-4o"),
        ("openai/gpt-4o", "gpt-4o"),
        ("anthropic/claude-sonnet-4", "claude-sonnet-4"),
        ("openrouter/openai/gpt-4o", "openai/gpt-4o"),
        ("/gpt-4o", "/gpt-4o"),
        ("openai/", "openai/"),
        ("", ""),
    ],
)
def test_bare_model_strips_one_provider_segment(name: str, bare: str) -> None:
    """`bare_model` drops one leading `provider/` and leaves anything else as it is."""
    assert bare_model(name) == bare


@pytest.mark.parametrize(
    "module", ["tb_plugins.core.models", "tb_plugins._format", "tb_plugins.demo"]
)
def test_doctests(module: str) -> None:
    """The examples in the docstrings of the naming rule, the text helpers and the demo's
    step line hold."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:se/cr@et@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("rediss://:secret@h:6380/0", "rediss://:***@h:6380/0"),
        (
            "postgresql://u@h/db?sslmode=require&password=secret",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:///tmp/a:b@c.db", "sqlite:///tmp/a:b@c.db"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, shown: str) -> None:
    """A ledger URL is shown with its password as `***` (in the user info or a `password=`
    parameter), and otherwise unchanged."""
    assert redact_url(url) == shown


def test_budgets_check_hides_the_ledger_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb budgets check` names the policy's ledger without its password."""
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "ledger: postgresql://tb:s3cret-pw@db.internal:5432/budgets\n"
        "budgets:\n  - {scope: team:a, tokens: 5, window: day}\n"
    )
    assert main(["budgets", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ledger postgresql://tb:***@db.internal:5432/budgets)" in out
    assert "s3cret" not in out
