"""The README teaches what works: its Python blocks run, its CLI reference is complete."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tb_plugins.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples() -> None:
    """The README carries runnable Python examples (so the next test is not vacuous)."""
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_python_block_runs(index: int, tmp_path: Path) -> None:
    """Each ```python block of the README runs as written, offline, in a fresh process."""
    script = tmp_path / f"block_{index}.py"
    script.write_text(BLOCKS[index])
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{run.stderr}"


def _commands(parser: object, prefix: str = "tb") -> list[str]:
    import argparse

    out = []
    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    out.extend(_commands(sub, f"{prefix} {name}"))
                else:
                    out.append(f"{prefix} {name}")
    return out


@pytest.mark.parametrize("command", _commands(build_parser()))
def test_every_command_is_in_the_cli_reference(command: str) -> None:
    """Each `tb` command appears in the README's CLI reference table."""
    reference = README.read_text().split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    assert f"`{command}" in reference
