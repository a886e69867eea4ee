"""`tb demo` shows every decision kind; its ledger equals the usage upstream reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tb_plugins._format import wrap
from tb_plugins.demo import step_line

REFUSAL = (
    "budget 'team:demo 450 tokens/day' for scope 'team:demo' is exhausted: 450 tokens of 450 "
    "tokens used, this call needs 36 tokens; the window resets at 2026-12-08 00:00:00 UTC"
)


@pytest.mark.slow
def test_demo_json_walks_every_decision_and_the_ledger_matches_upstream(tmp_path: Path) -> None:
    """`tb demo --json --keep DIR` exits 0, shows allow, alert, downgrade, clamp, deny and the
    loop cutoff, and the ledger's spend equals the usage the fake server reported."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    run = subprocess.run(
        [sys.executable, "-m", "tb_plugins.cli", "demo", "--json", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    for kind in ("allow", "downgrade", "clamp", "deny", "cutoff"):
        assert summary["decisions"].get(kind, 0) >= 1, (kind, summary["decisions"])
    assert [a["threshold"] for a in summary["alerts"]] == [0.5, 0.8, 1.0]
    assert summary["ledger_tokens"] == summary["server_tokens"] > 0
    assert summary["ledger_matches_server"] is True
    refused = [s for s in summary["steps"] if s["decision"] in ("deny", "cutoff")]
    assert refused and all(s["model"] is None and s["max_tokens"] is None for s in refused)
    assert all(s["note"].endswith(("UTC", "(window: total)")) for s in refused), refused
    downgraded = [s for s in summary["steps"] if s["decision"] == "downgrade"]
    assert downgraded[0]["model"] == "gpt-4o-mini"  # the cheaper model really served it
    # the kept ledger is readable by the CLI afterwards
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "tb_plugins.cli",
            "--config",
            str(tmp_path / "budgets.yaml"),
            "status",
            "--scope",
            "team:demo",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    (team,) = json.loads(status.stdout)
    assert team["spent"] <= team["limit"] and team["reserved"] == 0


def test_a_refused_step_shows_no_model() -> None:
    """A refused call's line shows `-` where a served call shows its model: it ran on none."""
    served = step_line("allow", "gpt-4o", 200, "fits the budget", 120)
    refused = step_line("deny", None, None, "the budget is spent", 120)
    assert served.split()[:4] == ["→", "allow", "gpt-4o,", "max_tokens=200"]
    assert refused.split()[:3] == ["→", "deny", "-"] and "gpt-4o" not in refused


@pytest.mark.parametrize("width", [60, 80, 100, 120, 200])
def test_a_long_reason_is_wrapped_never_cut(width: int) -> None:
    """A reason longer than the line is wrapped between words: every word, number and quoted
    name is printed whole, the lines keep to the width and line up under the first."""
    text = step_line("deny", None, None, REFUSAL, width)
    first, *rest = text.split("\n")
    lead = first.index("budget")
    assert [line[:lead].strip() for line in rest] == [""] * len(rest)
    assert " ".join(line[lead:] for line in [first, *rest]) == REFUSAL
    assert max(len(line) for line in [first, *rest]) <= max(width, lead + 40)
    assert "…" not in text


def test_wrap_keeps_quoted_names_whole() -> None:
    """`wrap` breaks only between words and never inside a quoted name, even when the name
    alone is longer than the line."""
    text = "refused by 'team:a very long budget name 1,500 tokens/day' at 1,500 of 1,500"
    lines = wrap(text, 20)
    assert " ".join(lines) == text
    assert "'team:a very long budget name 1,500 tokens/day'" in lines
    assert wrap("", 20) == [""]


def test_demo_does_not_import_the_cli() -> None:
    """The demo takes its table helpers from `tb_plugins._format`: importing it loads
    neither `tb_plugins.cli` (no import cycle) nor any framework."""
    code = (
        "import sys, tb_plugins.demo; "
        "print(sorted(m for m in ('tb_plugins.cli', 'litellm', 'langchain') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert run.stdout.strip() == "[]"
