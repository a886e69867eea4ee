"""`tb report` (requests, tokens, dollars and decisions), `tb status` and `tb watch` in a
terminal: the report's numbers are the usage log's, on every ledger, and every table fits 80
columns."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import make_ledger
from tb_plugins import BudgetGuard, Usage
from tb_plugins.cli import main, report, status, watch
from tb_plugins.core.models import bare_model
from tb_plugins.core.usage import UsageRecord, UsageRow
from tb_plugins.core.windows import parse_window
from tb_plugins.errors import BudgetRefused, LedgerUnavailable
from tb_plugins.ledger import Ledger, Line, line_key

MSGS = [{"role": "user", "content": "Summarise the quarterly report in three bullet points."}]
LONG_USER = "user:" + "a-very-long-user-name-" * 5

POLICY: dict[str, Any] = {
    "alerts": [],
    "downgrade": {"gpt-4o": "gpt-4o-mini"},
    "request": {"max_output_tokens": 50, "max_input_tokens": 2000},
    "budgets": [
        {"scope": "team:search", "tokens": 20_000, "window": "day", "downgrade_at": 0.5},
        {"scope": "user:*", "limit": "50k tokens/day"},
        {"scope": "team:closed", "tokens": 1, "window": "day"},
    ],
}


def drive(guard: BudgetGuard) -> None:
    """Calls that end in every decision: allow, clamp (max_tokens above the per-request cap),
    downgrade (team:search past downgrade_at), deny (team:closed, and a prompt above the
    per-request input cap); some report cached tokens, one a provider-prefixed model."""

    def call(scopes: Sequence[str], usage: tuple[int, int, int], **kw: Any) -> None:
        kw.setdefault("max_tokens", 20)
        kw.setdefault("messages", MSGS)
        try:
            d = guard.check(model=kw.pop("model", "gpt-4o"), scopes=scopes, **kw)
        except BudgetRefused:
            return
        guard.settle(d, Usage(usage[0], usage[1], cached_input_tokens=usage[2]))

    call(["team:search", "user:ann"], (120, 20, 0))
    call(["team:search", "user:bob"], (300, 40, 100), max_tokens=500)  # clamp
    call(["team:docs", "user:ann"], (80, 10, 0), model="openai/gpt-4o")
    call(["team:search", LONG_USER], (11_000, 30, 4_000))  # past downgrade_at
    call(["team:search", "user:ann"], (90, 15, 0))  # downgrade
    call(["team:search", "user:bob"], (95, 12, 5), max_tokens=400)  # downgrade, clamped too
    call(["team:closed", "user:bob"], (1, 1, 0))  # deny: the budget
    call(["user:ann"], (1, 1, 0), messages=[{"role": "user", "content": "word " * 3000}])
    call(["team:docs"], (50, 5, 0))


@pytest.fixture
def guard(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BudgetGuard]:
    """A guard on a fresh ledger of each backend, after :func:`drive`, that the CLI commands
    open instead of the policy file's (the command's close of the ledger is put off until
    the test ends, since each ``memory://`` open is a new ledger)."""
    ledger = make_ledger(backend, tmp_path)
    g = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"}, ledger=ledger)
    drive(g)
    real_close = ledger.close
    monkeypatch.setattr(ledger, "close", lambda: None)
    for module in (report, status, watch):
        monkeypatch.setattr(module, "open_guard", lambda args: g)
    try:
        yield g
    finally:
        g.flush()
        real_close()


def expected(records: Sequence[UsageRecord], by: str) -> dict[str, dict[str, Any]]:
    """Report rows computed from the usage log itself: a record counts once under each of
    its scopes (by scope or scope kind), its bare model name, or its UTC day."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for r in records:
        if by == "model":
            keys = [bare_model(r.model)]
        elif by == "day":
            keys = [datetime.fromtimestamp(r.ts, tz=timezone.utc).strftime("%Y-%m-%d")]
        else:
            keys = [s for s in dict.fromkeys(r.scopes) if by == "scope" or s.startswith(by + ":")]
        for key in keys:
            row = rows[key]
            if r.action == "deny":
                row["denied"] += 1
                continue
            row["requests"] += 1
            row[{"allow": "allowed", "clamp": "clamped", "downgrade": "downgraded"}[r.action]] += 1
            row["input_tokens"] += r.input_tokens
            row["output_tokens"] += r.output_tokens
            row["cached_input_tokens"] += r.cached_input_tokens
            row["tokens"] += r.input_tokens + r.output_tokens
            row["usd"] += r.usd
    for row in rows.values():
        row["usd_per_request"] = row["usd"] / row["requests"] if row["requests"] else 0.0
    return dict(rows)


FIELDS = (
    "requests",
    "allowed",
    "clamped",
    "downgraded",
    "denied",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "tokens",
    "usd",
    "usd_per_request",
)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    assert main(["report", *argv, "--json"]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


@pytest.mark.parametrize("by", ["scope", "model", "day", "user"])
def test_report_json_is_the_sum_of_the_usage_log_with_every_decision(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    """`tb report --json` rows, by scope, model, day or user, are the sums of the usage log's
    records, decisions included: allowed + clamped + downgraded = requests, denied apart."""
    records = guard.ledger.records()
    assert {r.action for r in records} == {"allow", "clamp", "downgrade", "deny"}
    rows = {r[by]: {f: r[f] for f in FIELDS} for r in run_json(capsys, "--by", by)}
    want = expected(records, by)
    assert rows.keys() == want.keys()
    for key, row in rows.items():
        usd = {f: pytest.approx(want[key][f]) for f in ("usd", "usd_per_request")}
        assert row == {**want[key], **usd}, key
        assert row["allowed"] + row["clamped"] + row["downgraded"] == row["requests"]
    if by in ("model", "day"):  # each record counts once: the rows add up to the whole log
        for f in ("requests", "clamped", "downgraded", "denied", "tokens"):
            assert sum(r[f] for r in rows.values()) == sum(w[f] for w in want.values())
        assert sum(r["denied"] for r in rows.values()) == 2
    if by == "scope":
        assert (rows["global"]["clamped"], rows["global"]["downgraded"]) == (1, 2)
        assert rows["global"]["denied"] == 2 and rows["team:closed"]["requests"] == 0


def test_report_csv_reads_back_to_the_json_numbers(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tb report --csv` read with the csv module gives the same rows and numbers as --json."""
    by_json = {r["scope"]: r for r in run_json(capsys)}
    assert main(["report", "--csv"]) == 0
    by_csv = {r["scope"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert by_csv.keys() == by_json.keys()
    for key, row in by_csv.items():
        assert list(row) == ["scope", *FIELDS]
        for f in FIELDS:
            value = float(row[f]) if f.startswith("usd") else int(row[f])
            assert value == pytest.approx(by_json[key][f]), (key, f)


def test_report_since_until_keep_only_that_period(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--since` / `--until` bound the records a report counts (until is exclusive)."""
    t = guard.ledger.records()[0].ts
    assert run_json(capsys, "--until", str(t)) == []
    rows = {r["scope"]: r for r in run_json(capsys, "--since", str(t))}
    assert rows["global"]["requests"] + rows["global"]["denied"] == len(guard.ledger.records())


class _Stub:
    """A guard that reports the given rows (for the table's layout alone)."""

    def __init__(self, rows: list[UsageRow]) -> None:
        self.rows = rows
        self.ledger = self

    def usage(self, **kw: Any) -> list[UsageRow]:
        return self.rows

    def close(self) -> None:
        pass


@pytest.mark.parametrize("by", ["scope", "day", "model"])
def test_the_report_table_fits_80_columns_at_any_size(
    by: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table keeps within 80 columns with the largest counts and long names (a name too
    long goes on its own line above its row), rounding large counts (1.23M, 950k)."""
    huge = UsageRow(LONG_USER, 10**15, 10**15, 10**18, 10**18, 10**18, 10**9,
                    clamped=999_999, downgraded=10**12)  # fmt: skip
    rows = [
        UsageRow(
            "2026-11-01" if by == "day" else "global",
            *(950_123, 50_321, 1_234_567, 95_432, 1_000, 4537.12),
            clamped=30_123,
            downgraded=9_999,
        ),
        UsageRow("team:a", 3, 0, 400, 100, 0, 0.0021),
        huge,
    ]
    monkeypatch.setattr(report, "open_guard", lambda args: _Stub(rows))
    assert main(["report", "--by", by]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80, lines
    assert lines[0].split() == [by, *report.REPORT_HEADERS]
    assert lines[2].split()[1:] == cells("950k 1.23M 95.4k 1,000 $4,537 $0.0048 30.1k 9,999 50.3k")
    assert lines[3].split() == cells("team:a 3 400 100 0 $0.0021 $0.0007 0 0 0")
    assert lines[4] + lines[5] == LONG_USER
    assert lines[6].split() == cells("1P 1000P 1000P 1000P $1B $0.0000 1M 1T 1P")


def cells(text: str) -> list[str]:
    return text.split()


def test_report_table_reads_the_ledger(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `tb report` table shows each scope's requests and decisions from the ledger."""
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80
    team = next(line for line in out.splitlines() if line.startswith("team:search "))
    # requests, ..., clamp, down, deny
    cells = team.split()
    assert (cells[1], cells[-3], cells[-2], cells[-1]) == ("5", "1", "2", "0")


# -- a terminal ----------------------------------------------------------------------------

ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """A policy on a SQLite file, after :func:`drive` (a user with a very long name too)."""
    path = tmp_path / "budgets.yaml"
    path.write_text(
        json.dumps({**POLICY, "ledger": f"sqlite:///{tmp_path / 'ledger.db'}"}, indent=2)
    )
    g = BudgetGuard.from_config(path)
    drive(g)
    g.close()
    return path


def in_terminal(
    argv: Sequence[str], columns: int = 80, lines: int = 40, *, interrupt: bool = False
) -> str:
    """What ``tb argv`` writes to a pseudo-terminal of ``columns`` x ``lines`` (with
    ``interrupt``, Ctrl-C is sent once the first frame is drawn)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "LINES": str(lines), "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tb_plugins.cli", *argv],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if interrupt and watch.CLEAR_BELOW.encode() in out:
                proc.send_signal(signal.SIGINT)
                interrupt = False
    finally:
        os.close(master)
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode().replace("\r\n", "\n")


def screen_lines(out: str) -> list[str]:
    return ESCAPE.sub("", out).split("\n")


def test_status_fits_80_columns_in_a_terminal(policy_file: Path) -> None:
    """`tb status` in an 80-column terminal: no line wider than 80, every budget shown (the
    long user name on lines of its own)."""
    shown = screen_lines(in_terminal(["status", "--config", str(policy_file)]))
    assert max(map(len, shown)) <= 80
    text = "\n".join(shown)
    for scope in ("team:search", "team:closed", "user:ann", "user:bob", "20,000 tokens/day"):
        assert scope in text
    assert LONG_USER in "".join(shown)


def test_watch_redraws_in_place_within_80_columns(policy_file: Path) -> None:
    """`tb watch` in a terminal draws each frame from the top left over the last one, within
    80 columns, showing every budget, and gives the cursor back at the end."""
    argv = ["watch", "--count", "2", "--interval", "0.05", "--config", str(policy_file)]
    out = in_terminal(argv)
    assert out.count(watch.HOME) == 2 and out.count(watch.CLEAR_BELOW) == 2
    assert out.startswith(watch.HIDE_CURSOR) and out.endswith(watch.SHOW_CURSOR)
    shown = screen_lines(out)
    assert max(map(len, shown)) <= 80
    frames = ESCAPE.sub("", out.split(watch.HOME)[2])
    assert frames.startswith("tb watch ") and "every 0.05s" in frames
    for scope in ("team:search", "team:closed", "user:ann", "user:bob", LONG_USER[:60]):
        assert scope in frames


def test_watch_runs_until_ctrl_c_and_gives_the_cursor_back(policy_file: Path) -> None:
    """Without --count, `tb watch` redraws until Ctrl-C, then exits 0 with the cursor shown."""
    out = in_terminal(["watch", "--interval", "60", "--config", str(policy_file)], interrupt=True)
    assert out.count(watch.HOME) == 1 and out.endswith(watch.SHOW_CURSOR)
    assert "Traceback" not in out


def test_watch_cuts_a_frame_to_the_terminal_height(policy_file: Path) -> None:
    """A frame taller than the terminal is cut, saying how many lines were left out."""
    out = in_terminal(["watch", "--count", "1", "--config", str(policy_file)], lines=8)
    frame = ESCAPE.sub("", out.split(watch.HOME)[1]).rstrip("\n").split("\n")
    assert len(frame) == 7 and re.fullmatch(r"\.\.\. \d+ more lines .*", frame[-1])


def test_watch_off_a_terminal_prints_plain_frames(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped, `tb watch --count 2` prints two frames one after the other, with no escape."""
    assert main(["watch", "--count", "2", "--interval", "0.01", "--scope", "team:search"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("tb watch ") == 2
    assert out.count("team:search") == 2 and "user:ann" not in out


def test_watch_refuses_a_bad_interval_or_count(capsys: pytest.CaptureFixture[str]) -> None:
    """`--interval` must be positive and `--count` at least 1."""
    assert main(["watch", "--interval", "0"]) == 1
    assert main(["watch", "--count", "0"]) == 1
    err = capsys.readouterr().err
    assert "--interval must be a positive" in err and "--count must be at least 1" in err


class _Down:
    """A guard whose ledger cannot be reached."""

    class ledger:
        url = "redis://:secret@10.0.0.1:6379/0"

    def now(self) -> float:
        return time.time()

    def status(self, scope: str | None) -> list[Any]:
        raise LedgerUnavailable("Redis at 10.0.0.1:6379 did not answer within 2s")


def test_a_watch_frame_shows_a_ledger_error_and_hides_its_password() -> None:
    """A frame whose ledger cannot be read shows the error in place of the table (the next
    frame tries again), and the ledger's URL without its password."""
    text = watch.frame(_Down(), None, 2.0)  # type: ignore[arg-type]
    assert "did not answer" in text and "secret" not in text and "redis://:***@" in text
    assert max(map(len, text.split("\n"))) <= 80


def test_render_status_is_the_status_table(
    guard: BudgetGuard, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tb status` prints what `render_status` draws (one renderer for status and watch)."""
    now = guard.now()
    monkeypatch.setattr(guard, "now", lambda: now)
    assert main(["status"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == status.render_status(guard.status(), guard.now())
    assert status.render_status([], 0.0) == "(nothing to show)"


# -- the ledgers ----------------------------------------------------------------------------


def test_every_ledger_counts_clamped_and_downgraded_records(ledger: Ledger) -> None:
    """usage() counts each record's decision, also for scope lists holding a NUL (which the
    SQL ledgers group apart), under scope, model and day."""
    now = time.time()
    odd = "user:a\x00b"
    for n, action in enumerate(["allow", "clamp", "clamp", "downgrade", "deny"]):
        scopes = ("global", odd if n % 2 else "user:x")
        record = UsageRecord(now, f"r{n}", scopes, "gpt-4o", "gpt-4o", action, 10, 1, 0, 0.5)
        if action == "deny":
            ledger.append_usage(record)
            continue
        slot = parse_window("total").slot(now, timezone.utc)
        ln = Line(key=line_key("global", "total"), scope="global", window="total",
                  bucket=slot.bucket, span=slot.span, width=slot.width, limits=(None,) * 6,
                  expires_at=slot.expires_at)  # fmt: skip
        assert ledger.reserve(f"r{n}", [ln], (11, 10, 1, 0, 1, 1), now=now, expires_at=now + 60).ok
        assert ledger.settle(f"r{n}", [ln], (11, 10, 1, 0, 1, 1), record, now=now).applied
    rows = {r.key: r for r in ledger.usage(group_by="scope")}
    assert (rows["global"].requests, rows["global"].denied) == (4, 1)
    assert (rows["global"].clamped, rows["global"].downgraded, rows["global"].allowed) == (2, 1, 1)
    assert (rows[odd].clamped, rows[odd].downgraded, rows[odd].requests) == (1, 1, 2)
    assert (rows["user:x"].clamped, rows["user:x"].allowed, rows["user:x"].denied) == (1, 1, 1)
    (model,) = ledger.usage(group_by="model")
    (day,) = ledger.usage(group_by="day")
    assert model.clamped == day.clamped == 2 and model.downgraded == day.downgraded == 1
    assert model.usd_per_request == pytest.approx(0.5)
