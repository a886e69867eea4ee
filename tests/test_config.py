"""The policy file: readable quantities, and every malformed file refused with a named field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tb_plugins.config import load_policy, load_policy_dict, parse_quantity, parse_usd
from tb_plugins.errors import ConfigError

FULL = """
ledger: sqlite:///tb_ledger.db
timezone: Europe/Paris
on_ledger_error: fail_open
default_output_tokens: 1024
min_output_tokens: 16
reservation_ttl: 10m
unpriced: count_tokens_only
downgrade:
  gpt-4o: gpt-4o-mini
  claude-sonnet-4-5: claude-haiku-4-5
request:
  max_input_tokens: 32000
  max_output_tokens: 4096
prices:
  my-local-model: {input: "$0.50/1M", output: "$1.50/1M"}
budgets:
  - scope: global
    tokens: 50_000_000
    window: month
  - scope: team:search
    tokens: 2M
    usd: $40
    window: day
    alerts: [0.5, 0.8, 1.0]
    downgrade_at: 0.8
  - scope: user:*
    limit: 100k tokens/day
  - scope: user:*
    tokens: 20_000
    window: rolling:1m
  - scope: run:*
    calls: 25
    tokens: 50_000
    window: total
alerts:
  - log: warning
  - webhook: http://127.0.0.1:9000/hook
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    return path


def test_the_design_example_policy_loads_with_readable_quantities(tmp_path: Path) -> None:
    """The policy of DESIGN.md §3 loads, and 2M, $40, 100k and 50_000_000 read as numbers."""
    policy = load_policy(write(tmp_path, FULL))
    b = policy.compiled_budgets()
    assert b[0].limits[0] == 50_000_000
    assert b[1].limits[0] == 2_000_000 and b[1].limits[3] == 40 * 10**9
    assert b[2].limits[0] == 100_000 and b[2].window.spec == "day"
    assert b[3].window.spec == "rolling:1m"
    assert b[4].limits[5] == 25
    assert policy.reservation_ttl == 600
    assert policy.prices["my-local-model"].input == pytest.approx(0.5e-6)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, 1000),
        ("2_000_000", 2_000_000),
        ("2,000", 2000),
        ("200k", 200_000),
        ("1.5M", 1_500_000),
        ("3b", 3_000_000_000),
        (12.0, 12),
        ("2,000,000", 2_000_000),
        ("999,999,999,999,999", 999_999_999_999_999),
        ("1.000000000000001G", 1_000_000_000),
    ],
)
def test_quantities_are_readable(value: object, expected: int) -> None:
    """Token quantities accept underscores, thousands commas and k/M/B suffixes."""
    assert parse_quantity(value) == expected


def test_a_quantity_may_be_bounded_by_the_caller() -> None:
    """`maximum=` caps a quantity (MAX_LIMIT by default) and the error states the maximum."""
    assert parse_quantity("1k", maximum=1000) == 1000
    with pytest.raises(ValueError, match="above the maximum of 1,000"):
        parse_quantity("1001", maximum=1000)
    with pytest.raises(ValueError, match="above the maximum of 1,000,000,000,000,000"):
        parse_quantity("1000001G")


def test_dollars_are_readable() -> None:
    """Dollar amounts accept a leading $ and suffixes."""
    assert parse_usd("$40") == 40.0
    assert parse_usd("$1.5k") == 1500.0
    assert parse_usd(2.5) == 2.5


def budget(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"scope": "team:search", "tokens": 1000, "window": "day"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


MALFORMED: list[tuple[str, object, str]] = [
    ("unknown window", {"budgets": [budget(window="fortnight")]}, "field 'window'"),
    ("no window", {"budgets": [budget(window=None)]}, "field 'window' is required"),
    ("unknown scope kind", {"budgets": [budget(scope="teams:x")]}, "field 'scope'"),
    ("scope without name", {"budgets": [budget(scope="team:")]}, "field 'scope'"),
    ("no limit", {"budgets": [budget(tokens=None)]}, "no limit given"),
    ("text tokens", {"budgets": [budget(tokens="lots")]}, "field 'tokens'"),
    ("negative tokens", {"budgets": [budget(tokens=-5)]}, "field 'tokens'"),
    ("bad usd", {"budgets": [budget(usd="forty")]}, "field 'usd'"),
    ("alert above 1", {"budgets": [budget(alerts=[0.5, 2])]}, "field 'alerts'"),
    ("downgrade_at zero", {"budgets": [budget(downgrade_at=0)]}, "field 'downgrade_at'"),
    ("calls on a team", {"budgets": [budget(calls=5)]}, "field 'calls'"),
    ("misspelt field", {"budgets": [budget(windw="day")]}, "field 'windw'"),
    ("bad rolling", {"budgets": [budget(window="rolling:soon")]}, "field 'window'"),
    (
        "bad one-line limit",
        {"budgets": [{"scope": "team:a", "limit": "5 bananas/day"}]},
        "field 'limit'",
    ),
    (
        "limit twice",
        {"budgets": [{"scope": "team:a", "limit": "5 tokens/day", "tokens": 3}]},
        "field 'limit'",
    ),
    ("budgets not a list", {"budgets": "nope"}, "field 'budgets'"),
    ("unknown ledger", {"ledger": "mysql://x"}, "field 'ledger'"),
    ("unknown timezone", {"timezone": "Mars/Olympus"}, "field 'timezone'"),
    ("unknown fail mode", {"on_ledger_error": "shrug"}, "field 'on_ledger_error'"),
    ("unknown unpriced", {"unpriced": "free"}, "field 'unpriced'"),
    ("bad price", {"prices": {"m": {"input": "abc", "output": 1}}}, "field 'input'"),
    ("price missing output", {"prices": {"m": {"input": "$1/1M"}}}, "field 'output'"),
    ("bad alert sink", {"alerts": [{"log": "loud"}]}, "field 'log'"),
    ("webhook not http", {"alerts": [{"webhook": "ftp://x"}]}, "webhook"),
    ("negative cap", {"request": {"max_input_tokens": -5}}, "field 'max_input_tokens'"),
    ("bad ttl", {"reservation_ttl": "soon"}, "field 'reservation_ttl'"),
    ("self downgrade", {"downgrade": {"a": "a"}}, "field 'downgrade'"),
    (
        "min above default",
        {"min_output_tokens": 2000, "default_output_tokens": 100},
        "min_output_tokens",
    ),
    ("unknown top-level field", {"budget": []}, "field 'budget'"),
]


@pytest.mark.parametrize(("case", "data", "names"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_malformed_policy_is_refused_naming_the_field(
    case: str, data: object, names: str
) -> None:
    """A malformed policy raises ConfigError whose message names the source and the field."""
    with pytest.raises(ConfigError) as info:
        load_policy_dict(data, source="budgets.yaml")
    message = str(info.value)
    assert message.startswith("budgets.yaml: ")
    assert names in message


def test_a_bad_budget_entry_is_named_by_index_and_scope() -> None:
    """The error for a budget entry says which entry (index and scope) it is."""
    data = {"budgets": [budget(), budget(scope="user:*", window="fortnight")]}
    with pytest.raises(ConfigError, match=r"budgets\[1\] \(scope 'user:\*'\): field 'window'"):
        load_policy_dict(data, source="budgets.yaml")


def test_a_file_with_errors_is_refused_whole(tmp_path: Path) -> None:
    """One bad entry among good ones refuses the whole file: nothing half-loads."""
    text = FULL.replace("window: month", "window: monthly")
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, text))
    assert str(tmp_path / "budgets.yaml") in str(info.value)
    assert "budgets[0] (scope 'global'): field 'window'" in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error is refused with the file name and the line."""
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2"):
        load_policy(write(tmp_path, "budgets:\n\t- scope: team:a\n"))


def test_empty_missing_and_non_mapping_files_are_refused(tmp_path: Path) -> None:
    """Empty, missing and non-mapping files each get their own clear error."""
    with pytest.raises(ConfigError, match="empty"):
        load_policy(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_policy(write(tmp_path, "- 1\n- 2\n"))


def test_one_line_limits_set_unit_and_window() -> None:
    """`limit: $5/month` and `limit: 200k tokens/rolling:1h` expand to unit and window."""
    p = load_policy_dict(
        {
            "budgets": [
                {"scope": "user:*", "limit": "$5/month"},
                {"scope": "team:a", "limit": "200k tokens/rolling:1h"},
            ]
        }
    )
    assert p.budgets[0].usd == 5.0 and p.budgets[0].window == "month"
    assert p.budgets[1].tokens == 200_000 and p.budgets[1].window == "rolling:1h"


def test_budget_patterns_match_scopes() -> None:
    """`user:*` matches every user and nothing else; exact scopes match only themselves."""
    p = load_policy_dict({"budgets": [budget(scope="user:*"), budget(scope="team:search")]})
    pattern, exact = p.compiled_budgets()
    assert pattern.matches("user:alice") and pattern.matches("user:x:y")
    assert not pattern.matches("team:alice")
    assert exact.matches("team:search") and not exact.matches("team:search2")
