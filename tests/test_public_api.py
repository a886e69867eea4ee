"""The public surface is small, pinned, typed, and `import tb_plugins` stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tb_plugins
from tb_plugins._lazy import require

PUBLIC = {
    "BudgetExceeded",
    "BudgetGuard",
    "BudgetRefused",
    "BudgetStatus",
    "Charge",
    "ConfigError",
    "Decision",
    "Estimate",
    "LedgerError",
    "LedgerUnavailable",
    "LoopLimitExceeded",
    "RequestTooLarge",
    "TokenBudgetError",
    "UnpricedModel",
    "Usage",
    "__version__",
    "count_tokens",
    "ledger_from_url",
}
HEAVY = (
    "litellm",
    "langchain",
    "langchain_core",
    "langgraph",
    "redis",
    "psycopg",
    "tiktoken",
    "pydantic_core._pydantic_core_never",
)


def test_exported_members_are_exactly_the_contract() -> None:
    """`tb_plugins.__all__` is the curated list, and every name in it exists."""
    assert set(tb_plugins.__all__) == PUBLIC
    for name in tb_plugins.__all__:
        assert hasattr(tb_plugins, name), name


def test_integrations_are_not_re_exported() -> None:
    """Integrations are imported by their own path, never from the top level."""
    code = (
        "import tb_plugins\n"
        "names = [n for n in dir(tb_plugins) if 'integration' in n.lower() or 'Handler' in n\n"
        "         or 'Logger' in n or 'Middleware' in n]\n"
        "print(names)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_loads_no_framework_or_backend() -> None:
    """`import tb_plugins` in a fresh process loads no litellm, langchain, redis or psycopg."""
    code = (
        "import sys, json, tb_plugins\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_guard_with_sqlite_does_not_load_frameworks(tmp_path: Path) -> None:
    """Deciding a call on the SQLite ledger loads no litellm, langchain, redis or psycopg."""
    code = (
        "import sys, json\n"
        "from tb_plugins import BudgetGuard, Usage\n"
        f"g = BudgetGuard.from_dict({{'ledger': 'sqlite:///{tmp_path}/l.db', 'alerts': []}})\n"
        "d = g.check(model='gpt-4o', messages=[{'role': 'user', 'content': 'hi'}])\n"
        "g.settle(d, Usage(5, 5))\n"
        "heavy = ('litellm', 'langchain_core', 'redis', 'psycopg')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_call_that_gives_its_input_tokens_loads_no_tokenizer() -> None:
    """check(input_tokens=...) decides and settles without loading tiktoken or any encoding."""
    code = (
        "import sys, json\n"
        "from tb_plugins import BudgetGuard, Usage\n"
        "g = BudgetGuard.from_dict({'ledger': 'memory://', 'alerts': [], 'budgets': [\n"
        "    {'scope': 'team:a', 'limit': '10k tokens/day'}]})\n"
        "d = g.check('gpt-4o', input_tokens=120, max_tokens=30, scopes=['team:a'])\n"
        "g.settle(d, Usage(120, 30))\n"
        "print(json.dumps([d.estimate.exact, 'tiktoken' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False]


def test_a_missing_optional_dependency_names_its_extra() -> None:
    """An absent optional dependency fails with the pip command for its extra."""
    with pytest.raises(ImportError, match=r"pip install 'tb-plugins\[redis\]'"):
        require("tb_plugins_no_such_module", "redis")


def test_the_package_is_typed() -> None:
    """The package ships py.typed (PEP 561)."""
    assert (Path(tb_plugins.__file__).parent / "py.typed").exists()


def test_unknown_ledger_scheme_lists_the_known_ones() -> None:
    """ledger_from_url refuses an unknown scheme and lists every known scheme."""
    with pytest.raises(tb_plugins.ConfigError, match=r"memory://, sqlite://, redis://"):
        tb_plugins.ledger_from_url("mysql://localhost/x")
