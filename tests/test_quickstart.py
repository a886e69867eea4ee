"""The README's quickstart works as written: its policy, its script, then `tb status`/`tb report`.

The quickstart is three marked blocks of README.md: the policy (``<!-- quickstart:
budgets.yaml -->``, a yaml block), the script (``<!-- quickstart: quickstart.py -->``, fenced
``py`` so that tests/test_readme.py, which runs each ``python`` block alone, leaves it to this
test) and the session (``<!-- quickstart: session -->``, a console block whose ``$`` lines are
the commands to run).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block(name: str) -> str:
    """The fenced block right after the ``<!-- quickstart: NAME ... -->`` marker."""
    text = README.read_text()
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(
        rf"<!-- quickstart: {re.escape(name)}\b[^>]*-->\n```[a-z]*\n(.*?)```", section, re.S
    )
    assert match, f"README.md: no block marked 'quickstart: {name}' under ## Quickstart"
    return match.group(1)


def output_of(session: dict[str, str], program: str) -> str:
    """The stdout of the session's command that starts with ``program``."""
    outs = [text for line, text in session.items() if f"{line} ".startswith(f"{program} ")]
    assert outs, f"the quickstart session runs no `{program}` command"
    return outs[0]


def row(output: str, scope: str) -> str:
    """The line of a `tb` table for one scope (the test fails naming the scope if none)."""
    rows = [line for line in output.splitlines() if line.startswith(f"{scope} ")]
    assert rows, f"no row for {scope} in:\n{output}"
    return rows[0]


def command(line: str) -> list[str]:
    """A session line as argv: `python` is this interpreter, `tb` is `python -m tb_plugins.cli`."""
    argv = shlex.split(line)
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "tb":
        return [sys.executable, "-m", "tb_plugins.cli", *argv[1:]]
    raise AssertionError(f"the quickstart session runs python and tb only, not {line!r}")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run the quickstart in an empty directory; each command's stdout, by command line."""
    workdir = tmp_path_factory.mktemp("quickstart")
    (workdir / "budgets.yaml").write_text(quickstart_block("budgets.yaml"))
    (workdir / "quickstart.py").write_text(quickstart_block("quickstart.py"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("TB_PLUGINS_CONFIG", None)  # `tb` must find ./budgets.yaml, as the README says
    lines = [
        line.removeprefix("$ ")
        for line in quickstart_block("session").splitlines()
        if line.startswith("$ ")
    ]
    outputs = {}
    for line in lines:
        run = subprocess.run(
            command(line), cwd=workdir, env=env, capture_output=True, text=True, timeout=240
        )
        assert run.returncode == 0, f"`{line}` failed in the quickstart:\n{run.stderr}"
        outputs[line] = run.stdout
    return outputs


def test_the_session_runs_the_script_then_status_and_report(session: dict[str, str]) -> None:
    """The session runs the script, then `tb status` and `tb report`, in that order."""
    assert [line.split()[:2] for line in session] == [
        ["python", "quickstart.py"],
        ["tb", "status"],
        ["tb", "report"],
    ]


def test_the_script_is_allowed_once_then_refused(session: dict[str, str]) -> None:
    """The first call is allowed as asked; the over-budget call is refused with its budget."""
    out = output_of(session, "python quickstart.py")
    assert out.splitlines()[0] == "allow gpt-4o 500"
    assert "refused: budget 'team:search 20,000 tokens/day'" in out


def test_status_shows_the_spend_the_script_settled(session: dict[str, str]) -> None:
    """`tb status` reads ./budgets.yaml and its SQLite ledger and shows the settled spend."""
    out = output_of(session, "tb status")
    team, alice = row(out, "team:search"), row(out, "user:alice")
    assert re.search(r"\b129\b", team) and "20,000" in team  # 9 input + 120 output tokens
    assert "$0.0012" in alice  # gpt-4o's price of those tokens, on the $5/month budget


def test_report_shows_the_call_and_the_refusal(session: dict[str, str]) -> None:
    """`tb report` totals the settled call and counts the refused one, per scope."""
    out = output_of(session, "tb report")
    # requests, input, output, cached, usd, usd/request, clamped, downgraded, denied
    cells = ["1", "9", "120", "0", "$0.0012", "$0.0012", "0", "0", "1"]
    assert row(out, "team:search").split()[1:] == cells
