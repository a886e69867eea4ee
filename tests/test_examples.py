"""The examples run as written, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["langchain_agent.py", "litellm_sdk.py"])
def test_example_runs(name: str, tmp_path: Path) -> None:
    """The example script exits 0 against the local fake server."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_langchain_example_downgrades_then_ends_gracefully(tmp_path: Path) -> None:
    """The LangChain example is served by gpt-4o-mini past downgrade_at and ends gracefully."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "langchain_agent.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    assert "'gpt-4o-mini'" in out and "I have to stop here" in out and "chain refused" in out
