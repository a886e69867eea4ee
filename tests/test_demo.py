"""`tb demo` shows every decision kind; its ledger equals the usage upstream reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


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
