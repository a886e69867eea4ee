"""The examples run as written, offline."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tb_plugins import BudgetGuard, Usage, count_tokens

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROXY = EXAMPLES / "litellm_proxy"


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_jupyter_nbconvert_executes_a_notebook(tmp_path: Path) -> None:
    """`jupyter nbconvert --to notebook --execute` (from the [dev] extra) runs the first
    notebook offline and writes it with its outputs."""
    import json

    bin_dir = Path(sys.executable).parent
    (notebook,) = (EXAMPLES.parent / "notebooks").glob("01_*.ipynb")
    out = tmp_path / "executed.ipynb"
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "MPLBACKEND": "Agg",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = ["nbconvert", "--to", "notebook", "--execute", str(notebook), "--output", str(out)]
    run = subprocess.run(
        [str(bin_dir / "jupyter"), *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    cells = json.loads(out.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]


def proxy_scopes(api_key: str) -> list[str]:
    """The scopes the example proxy charges for ``api_key``, from ``DEMO_KEYS`` in its
    ``custom_auth.py`` (read as a literal: importing the module imports the proxy)."""
    tree = ast.parse((PROXY / "custom_auth.py").read_text())
    (keys,) = (
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "DEMO_KEYS"
    )
    assert keys is not None
    who = ast.literal_eval(keys)[api_key]
    return [
        f"key:{who['key_alias']}",
        f"user:{who['user_id']}",
        f"team:{who['team_id']}",
        f"org:{who['org_id']}",
    ]


def test_proxy_example_team_reaches_its_downgrade_before_any_refusal() -> None:
    """With the example proxy's budgets, Alice and Bob (team search) asking gpt-4o in turn
    reach the team's downgrade_at, and are served gpt-4o-mini, before any budget of theirs
    clamps or refuses a call (a minute passes between calls, as the keys' budgets roll)."""
    policy = yaml.safe_load((PROXY / "budgets.yaml").read_text())
    policy["ledger"] = "memory://"
    now = [1_800_000_000.0]
    guard = BudgetGuard.from_dict(policy, clock=lambda: now[0])
    (team,) = (b for b in policy["budgets"] if b["scope"] == "team:search")
    assert team.get("downgrade_at")
    messages = [{"role": "user", "content": "Hello"}]
    actions = []
    for i in range(1_000):
        d = guard.check(
            model="gpt-4o",
            messages=messages,
            max_tokens=2_000,
            scopes=proxy_scopes(("sk-alice", "sk-bob")[i % 2]),
        )
        actions.append(d.action)
        if d.action != "allow":
            break
        guard.settle(d, Usage(count_tokens("gpt-4o", messages), 2_000))
        now[0] += 61
    assert actions[-1] == "downgrade", actions[-3:]
    assert d.model == "gpt-4o-mini"
    (status,) = guard.status("team:search")
    assert status.utilization >= team["downgrade_at"]
    guard.close()
