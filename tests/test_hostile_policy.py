"""Hostile or careless policy files are refused whole with a ConfigError, never loaded wrong,
never a traceback, and never an amount that would overflow a ledger later."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

import tb_plugins.config
from tb_plugins.config import (
    MAX_LEDGER_TIMEOUT,
    MAX_POLICY_BYTES,
    MAX_RESERVATION_TTL,
    MAX_YAML_DEPTH,
    load_policy,
    load_policy_dict,
    parse_quantity,
    parse_usd,
)
from tb_plugins.core import scopes
from tb_plugins.core.pricing import parse_price
from tb_plugins.core.usage import MAX_CALL_TOKENS, MAX_LIMIT, MAX_LIMIT_USD, MAX_PRICE
from tb_plugins.core.windows import MAX_ROLLING
from tb_plugins.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "budgets.yaml") + ": ")
    return message


# -- repeated keys ----------------------------------------------------------------------------

DUPLICATES: list[tuple[str, str, str, int, int]] = [
    (
        "two budgets sections",
        "budgets:\n"
        "  - {scope: team:a, tokens: 5, window: day}\n"
        "ledger: memory://\n"
        "budgets:\n"
        "  - {scope: team:b, tokens: 5, window: day}\n",
        "budgets",
        1,
        4,
    ),
    (
        "a field twice in one budget",
        "budgets:\n  - scope: team:a\n    tokens: 5\n    window: day\n    tokens: 500\n",
        "tokens",
        3,
        5,
    ),
    (
        "a field twice in a flow mapping",
        "budgets:\n  - {scope: team:a, window: day,\n     window: month, tokens: 5}\n",
        "window",
        2,
        3,
    ),
    (
        "a model priced twice",
        "prices:\n  m: {input: 1e-6, output: 1e-6}\n  m: {input: 2e-6, output: 1e-6}\n",
        "m",
        2,
        3,
    ),
    (
        "a request cap twice",
        "request:\n  max_input_tokens: 5\n  max_input_tokens: 6\n",
        "max_input_tokens",
        2,
        3,
    ),
    (
        "the same key quoted and plain",
        "downgrade:\n  gpt-4o: gpt-4o-mini\n  'gpt-4o': gpt-3.5\n",
        "gpt-4o",
        2,
        3,
    ),
    (
        "a top-level scalar twice",
        "timezone: UTC\n\n\ntimezone: Europe/Paris\n",
        "timezone",
        1,
        4,
    ),
    (
        "a key twice inside a merged mapping",
        "budgets:\n  - {scope: team:a, tokens: 5, window: day}\n"
        "  - <<: {scope: team:b, scope: team:c}\n    tokens: 5\n    window: day\n",
        "scope",
        3,
        3,
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "key", "first", "again"), DUPLICATES, ids=[d[0] for d in DUPLICATES]
)
def test_a_repeated_key_at_any_level_is_refused_naming_the_key_and_both_lines(
    tmp_path: Path, case: str, text: str, key: str, first: int, again: int
) -> None:
    """A key written twice in one mapping is an error naming it and both lines, not a silent
    replacement of the first."""
    message = refused(tmp_path, text)
    assert f"duplicate key {key!r}" in message
    assert f"first at line {first}, again at line {again}" in message


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: *anchor` followed by a key the anchor also has is an override, not a duplicate."""
    policy = load_policy(
        write(
            tmp_path,
            "budgets:\n"
            "  - &base {scope: team:a, tokens: 5, window: day}\n"
            "  - {<<: *base, scope: team:b, tokens: 7}\n"
            "  - <<: [*base]\n    window: month\n",
        )
    )
    assert [(b.scope, b.tokens, b.window) for b in policy.budgets] == [
        ("team:a", 5, "day"),
        ("team:b", 7, "day"),
        ("team:a", 5, "month"),
    ]


# -- nesting, size and alias bombs ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "budgets: " + "[" * 10_000,
        "budgets: " + "{a: " * 10_000,
        "budgets: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "budgets:\n" + "".join(" " * i + "-\n" for i in range(1, 1_000)),
        "x: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1) + "\n",
    ],
    ids=["10k open brackets", "10k open braces", "10k closed brackets", "block lists", "just over"],
)
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path, text: str) -> None:
    """Nesting deeper than MAX_YAML_DEPTH is refused with a ConfigError naming the limit."""
    assert "deeper than 32 levels" in refused(tmp_path, text)


def test_nesting_through_aliases_counts_too(tmp_path: Path) -> None:
    """Anchors that each nest a little cannot chain into a structure too deep to walk."""
    lines = ["a0: &a0 [1]"]
    for i in range(1, 200):
        lines.append(f"a{i}: &a{i} [[[[[*a{i - 1}]]]]]")
    assert "deeper than 32 levels" in refused(tmp_path, "\n".join(lines) + "\n")


def billion_laughs(levels: int, *, mapping: bool = False) -> str:
    if mapping:
        out = ["l0: &l0 {" + ", ".join(f"k{j}: lol" for j in range(9)) + "}"]
        for i in range(1, levels):
            out.append(f"l{i}: &l{i} {{" + ", ".join(f"k{j}: *l{i - 1}" for j in range(9)) + "}")
    else:
        out = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
        for i in range(1, levels):
            out.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(out) + f"\nbudgets: [{{scope: team:a, tokens: *l{levels - 1}, window: day}}]\n"


@pytest.mark.parametrize(
    "text",
    [billion_laughs(9), billion_laughs(9, mapping=True), billion_laughs(30)],
    ids=["lists", "mappings", "thirty levels"],
)
def test_an_alias_bomb_is_refused_at_once(tmp_path: Path, text: str) -> None:
    """A billion-laughs file is refused while parsing, before anything walks or prints it."""
    started = time.perf_counter()
    message = refused(tmp_path, text)
    assert "aliases expand this to more than 1,000,000 values" in message
    assert time.perf_counter() - started < 5
    assert len(message) < 500


def test_a_bomb_built_in_python_gives_a_short_message() -> None:
    """A dict policy sharing one list a billion times is refused without printing it."""
    bomb: object = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    with pytest.raises(ConfigError) as info:
        load_policy_dict({"budgets": [{"scope": "team:a", "tokens": bomb, "window": "day"}]})
    assert len(str(info.value)) < 500 and "a list of 9 items" in str(info.value)


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a [1, [2, *a]]\n"])
def test_a_recursive_alias_is_refused(tmp_path: Path, text: str) -> None:
    """An alias inside the node it names is refused, not turned into a cyclic structure."""
    assert "an alias refers to a node that contains it" in refused(tmp_path, text)


def test_modest_anchors_are_fine(tmp_path: Path) -> None:
    """Anchors and aliases used normally (a shared alert list) load."""
    policy = load_policy(
        write(
            tmp_path,
            "budgets:\n"
            "  - {scope: team:a, tokens: 5, window: day, alerts: &th [0.5, 0.8, 1.0]}\n"
            "  - {scope: team:b, tokens: 5, window: day, alerts: *th}\n",
        )
    )
    assert policy.budgets[1].alerts == [0.5, 0.8, 1.0]


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    """One byte over MAX_POLICY_BYTES is refused unread; a file exactly that size loads."""
    body = "budgets:\n  - {scope: team:a, tokens: 5, window: day}\n"
    exact = body + "#" * (MAX_POLICY_BYTES - len(body) - 1) + "\n"
    assert len(exact.encode()) == MAX_POLICY_BYTES == 1 << 20
    assert load_policy(write(tmp_path, exact)).budgets[0].tokens == 5
    message = refused(tmp_path, exact + "\n")
    assert "larger than 1,048,576 bytes (1 MiB)" in message
    message = refused(tmp_path, "budgets: [" + "{scope: team:a, tokens: 5, window: day}, " * 30_000)
    assert "larger than" in message


def test_an_endless_file_is_read_only_up_to_the_limit() -> None:
    """/dev/zero is refused as too large instead of being read forever."""
    if not Path("/dev/zero").exists():  # pragma: no cover - not on Windows
        pytest.skip("no /dev/zero")
    with pytest.raises(ConfigError, match="larger than"):
        load_policy("/dev/zero")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("budgets:\n  - {scope: team:a, tokens: " + "9" * 5000 + ", window: day}\n", "digits"),
        ("budgets: []\nx: 2001-13-45\n", "month must be in 1..12"),
        (b"budgets: []\n# \xff\xfe\n", "not UTF-8"),
    ],
    ids=["5000-digit integer", "impossible date", "not utf-8"],
)
def test_values_yaml_cannot_build_are_config_errors(
    tmp_path: Path, text: str | bytes, expected: str
) -> None:
    """What the YAML constructor itself chokes on is a ConfigError, not a ValueError traceback."""
    path = tmp_path / "budgets.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=expected):
        load_policy(path)


# -- decimal commas ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1,5M", "1,50", "12,3456", "1,000,00", ",5", "1,,000", "2,5k"])
def test_a_decimal_comma_in_tokens_is_refused(text: str) -> None:
    """A comma that is not a thousands separator is refused (never 1,5M read as 15M)."""
    with pytest.raises(ValueError, match="a comma only separates thousands"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["$1,5", "1,50", "$2,5k", "$0,99"])
def test_a_decimal_comma_in_dollars_is_refused(text: str) -> None:
    """`$1,5` is refused, not read as $15."""
    with pytest.raises(ValueError, match="a comma only separates thousands"):
        parse_usd(text)


@pytest.mark.parametrize("text", ["$2,50/1M", "2,5e-6", "$1/1,000,00"])
def test_a_decimal_comma_in_a_price_is_refused(text: str) -> None:
    """`$2,50/1M` is refused, not read as $250 per million."""
    with pytest.raises(ValueError, match=r"not a price: .*a comma only separates thousands"):
        parse_price(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2,000,000", 2_000_000), ("1,500.5k", 1_500_500), ("12,345", 12_345), ("1,000k", 10**6)],
)
def test_thousands_separators_still_read(text: str, expected: int) -> None:
    """Commas between groups of three digits are thousands separators."""
    assert parse_quantity(text) == expected


def test_dollar_and_price_thousands_separators_still_read() -> None:
    """`$2,000` and `$1,000/1,000,000` keep working."""
    assert parse_usd("$2,000") == 2000.0
    assert parse_price("$1,000/1,000,000") == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("limit", "hint"),
    [("1,5M tokens/day", "'1.5M'"), ("$1,5/month", "'$1.5'"), ("2,5k requests/hour", "'2.5k'")],
)
def test_a_decimal_comma_in_a_one_line_limit_is_refused_with_a_hint(limit: str, hint: str) -> None:
    """`limit: 1,5M tokens/day` is refused in field 'limit', suggesting the decimal point."""
    with pytest.raises(ConfigError) as info:
        load_policy_dict({"budgets": [{"scope": "team:a", "limit": limit}]}, source="b.yaml")
    message = str(info.value)
    assert "b.yaml: budgets[0] (scope 'team:a'): field 'limit'" in message
    assert f"e.g. {hint}" in message


# -- amounts that validate but would overflow later -------------------------------------------


def budget(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"scope": "team:search", "tokens": 1000, "window": "day"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


TOO_BIG: list[tuple[str, dict[str, object], str, str]] = [
    (
        "tokens 2**63",
        {"budgets": [budget(tokens=2**63)]},
        "field 'tokens'",
        "1,000,000,000,000,000",
    ),
    ("tokens 2**64 text", {"budgets": [budget(tokens=str(2**64))]}, "field 'tokens'", "maximum"),
    ("tokens 1e20", {"budgets": [budget(tokens=1e20)]}, "field 'tokens'", "maximum"),
    ("tokens 10**400", {"budgets": [budget(tokens=10**400)]}, "field 'tokens'", "maximum"),
    ("tokens one over", {"budgets": [budget(tokens=MAX_LIMIT + 1)]}, "field 'tokens'", "maximum"),
    ("tokens 2000000G", {"budgets": [budget(tokens="2000000G")]}, "field 'tokens'", "maximum"),
    ("input tokens", {"budgets": [budget(input_tokens=2**63)]}, "field 'input_tokens'", "max"),
    ("output tokens", {"budgets": [budget(output_tokens=2**70)]}, "field 'output_tokens'", "max"),
    ("requests", {"budgets": [budget(requests=2**63)]}, "field 'requests'", "maximum"),
    (
        "calls",
        {"budgets": [budget(scope="run:*", calls=10**16)]},
        "field 'calls'",
        "1,000,000,000,000,000",
    ),
    ("usd 1e11", {"budgets": [budget(usd=100_000_000_000)]}, "field 'usd'", "$1,000,000,000"),
    ("usd 1e11 float", {"budgets": [budget(usd=1e11)]}, "field 'usd'", "$1,000,000,000"),
    ("usd text", {"budgets": [budget(usd="$2000000k")]}, "field 'usd'", "$1,000,000,000"),
    ("usd 10**400", {"budgets": [budget(usd=10**400)]}, "field 'usd'", "maximum"),
    ("usd inf", {"budgets": [budget(usd=math.inf)]}, "field 'usd'", "finite"),
    ("usd nan", {"budgets": [budget(usd=math.nan)]}, "field 'usd'", "finite"),
    (
        "one-line usd",
        {"budgets": [{"scope": "team:a", "limit": "$2000000000/day"}]},
        "field 'limit'",
        "$1,000,000,000",
    ),
    (
        "one-line tokens",
        {"budgets": [{"scope": "team:a", "limit": "99999999999999999999 tokens/day"}]},
        "field 'limit'",
        "1,000,000,000,000,000",
    ),
    (
        "max input",
        {"request": {"max_input_tokens": 2**63}},
        "field 'max_input_tokens'",
        "1,000,000,000",
    ),
    (
        "max output",
        {"request": {"max_output_tokens": "2B"}},
        "field 'max_output_tokens'",
        "maximum",
    ),
    (
        "default output",
        {"default_output_tokens": 10**10},
        "field 'default_output_tokens'",
        "maximum",
    ),
    ("min output", {"min_output_tokens": 10**12}, "field 'min_output_tokens'", "maximum"),
    ("price", {"prices": {"m": {"input": "$20000/1M", "output": 0}}}, "field 'input'", "$0.01"),
    ("price number", {"prices": {"m": {"input": 0, "output": 1.0}}}, "field 'output'", "maximum"),
    ("price inf", {"prices": {"m": {"input": math.inf, "output": 0}}}, "field 'input'", "finite"),
    ("price nan", {"prices": {"m": {"input": 0, "output": math.nan}}}, "field 'output'", "finite"),
    (
        "cached price",
        {"prices": {"m": {"input": 0, "output": 0, "cached_input": 10**400}}},
        "field 'cached_input'",
        "maximum",
    ),
    (
        "use_price",
        {"unpriced": {"use_price": {"input": "$1/1", "output": 0}}},
        "use_price: field 'input'",
        "maximum",
    ),
    (
        "use_price inf",
        {"unpriced": {"use_price": {"input": 0, "output": math.inf}}},
        "use_price: field 'output'",
        "finite",
    ),
    (
        "rolling 1e20 days",
        {"budgets": [budget(window="rolling:99999999999999999999d")]},
        "field 'window'",
        "366d",
    ),
    ("rolling 367d", {"budgets": [budget(window="rolling:367d")]}, "field 'window'", "366d"),
    ("rolling 53w", {"budgets": [budget(window="rolling:53w")]}, "field 'window'", "366d"),
    ("ttl nan", {"reservation_ttl": math.nan}, "field 'reservation_ttl'", "finite"),
    ("ttl inf", {"reservation_ttl": math.inf}, "field 'reservation_ttl'", "finite"),
    ("ttl 8d", {"reservation_ttl": "8d"}, "field 'reservation_ttl'", "at most 1w"),
    ("ttl 10**400", {"reservation_ttl": 10**400}, "field 'reservation_ttl'", "at most 1w"),
    ("ttl zero", {"reservation_ttl": 0}, "field 'reservation_ttl'", "positive"),
    ("timeout inf", {"ledger_timeout": math.inf}, "field 'ledger_timeout'", "finite"),
    ("timeout 61s", {"ledger_timeout": "61s"}, "field 'ledger_timeout'", "at most 1m"),
    ("timeout 1h", {"ledger_timeout": 3600}, "field 'ledger_timeout'", "at most 1m"),
    ("timeout negative", {"ledger_timeout": -1}, "field 'ledger_timeout'", "positive"),
    ("alert nan", {"budgets": [budget(alerts=[0.5, math.nan])]}, "field 'alerts'", "(0, 1]"),
    ("alert inf", {"budgets": [budget(alerts=[math.inf])]}, "field 'alerts'", "(0, 1]"),
    ("alert bool", {"budgets": [budget(alerts=[True])]}, "field 'alerts'", "fraction"),
    ("downgrade_at nan", {"budgets": [budget(downgrade_at=math.nan)]}, "downgrade_at", "(0, 1]"),
    ("downgrade_at -inf", {"budgets": [budget(downgrade_at=-math.inf)]}, "downgrade_at", "(0, 1]"),
    ("downgrade_at bool", {"budgets": [budget(downgrade_at=True)]}, "downgrade_at", "fraction"),
]


@pytest.mark.parametrize(("case", "data", "field", "bound"), TOO_BIG, ids=[t[0] for t in TOO_BIG])
def test_an_amount_past_its_maximum_is_refused_naming_field_and_maximum(
    case: str, data: dict[str, object], field: str, bound: str
) -> None:
    """Each amount has a documented maximum (or must be finite), checked in the policy: the
    error names the source, the field and the bound instead of the ledger failing later."""
    with pytest.raises(ConfigError) as info:
        load_policy_dict(data, source="budgets.yaml")
    message = str(info.value)
    assert message.startswith("budgets.yaml: ")
    assert field in message and bound in message
    assert len(message) < 1000


@pytest.mark.parametrize(
    "text",
    [
        "reservation_ttl: .nan\n",
        "ledger_timeout: .inf\n",
        "budgets:\n  - {scope: team:a, usd: .inf, window: day}\n",
        "budgets:\n  - {scope: team:a, usd: 1.0e+11, window: day}\n",
        "budgets:\n  - {scope: team:a, tokens: .nan, window: day}\n",
        "budgets:\n  - {scope: team:a, tokens: 9223372036854775808, window: day}\n",
        "budgets:\n  - {scope: team:a, tokens: 5, window: 'rolling:99999999999999999999d'}\n",
        "budgets:\n  - {scope: team:a, tokens: 5, window: day, downgrade_at: .nan}\n",
        "unpriced: {use_price: {input: .inf, output: 0}}\n",
    ],
)
def test_yaml_special_floats_and_huge_numbers_are_refused(tmp_path: Path, text: str) -> None:
    """YAML's .nan, .inf and 20-digit numbers are refused in the file as in a dict."""
    refused(tmp_path, text)


def test_every_maximum_itself_loads_and_fits_64_bits() -> None:
    """The maxima are accepted, and the compiled limits stay below 2**63."""
    policy = load_policy_dict(
        {
            "reservation_ttl": MAX_RESERVATION_TTL,
            "ledger_timeout": MAX_LEDGER_TIMEOUT,
            "default_output_tokens": MAX_CALL_TOKENS,
            "request": {"max_input_tokens": MAX_CALL_TOKENS, "max_output_tokens": "1B"},
            "prices": {"m": {"input": MAX_PRICE, "output": "$10,000/1M"}},
            "budgets": [
                budget(
                    tokens=MAX_LIMIT,
                    input_tokens="1,000,000,000,000,000",
                    usd=MAX_LIMIT_USD,
                    requests=MAX_LIMIT,
                ),
                budget(scope="run:*", calls=MAX_LIMIT, window=f"rolling:{int(MAX_ROLLING)}s"),
            ],
        }
    )
    compiled = policy.compiled_budgets()
    assert compiled[1].window.spec == "rolling:366d"
    for b in compiled:
        assert all(limit is None or 0 <= limit < 2**63 for limit in b.limits)


# -- scope patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    ["team:a\x1b[2J", "user:\x00", "user:a\nb", "user:\x7f", "user:\x85x", "team:\u200b\x07"],
    ids=["escape", "nul", "newline", "del", "c1", "bell"],
)
def test_a_control_character_in_a_scope_pattern_is_refused(scope: str) -> None:
    """A policy scope with a control character is refused, and the message shows it escaped."""
    with pytest.raises(ConfigError) as info:
        load_policy_dict({"budgets": [budget(scope=scope)]}, source="budgets.yaml")
    message = str(info.value)
    assert "field 'scope'" in message and "control character" in message
    assert not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in message)


def test_scope_patterns_are_normalized_like_call_scopes() -> None:
    """Policy scopes go through normalize_scope: outer whitespace dropped, long ones refused."""
    policy = load_policy_dict({"budgets": [budget(scope="  user:*  ")]})
    assert policy.budgets[0].scope == "user:*"
    with pytest.raises(ConfigError, match="above the maximum of 512"):
        load_policy_dict({"budgets": [budget(scope="user:" + "x" * 600)]})
    with pytest.raises(ConfigError, match="whitespace around its name"):
        load_policy_dict({"budgets": [budget(scope="user: *")]})


def test_known_kinds_are_the_core_list() -> None:
    """tb_plugins.config.KNOWN_KINDS is tb_plugins.core.scopes.KNOWN_KINDS, the same object."""
    assert tb_plugins.config.KNOWN_KINDS is scopes.KNOWN_KINDS


def test_a_control_character_in_a_budget_name_is_refused() -> None:
    """A budget's display name is printable text too."""
    with pytest.raises(ConfigError, match=r"field 'name'.*control character"):
        load_policy_dict({"budgets": [budget(name="daily\x1b[2J")]})


# -- text built to make a parser backtrack ------------------------------------------------------

LONG_TEXT = [
    ("limit", {"budgets": [{"scope": "team:a", "limit": "1" + " " * 500_000 + "x"}]}),
    ("limit tabs", {"budgets": [{"scope": "team:a", "limit": "1\t" * 100 + "/day"}]}),
    ("price", {"prices": {"m": {"input": "1/" + " " * 500_000 + "x", "output": 0}}}),
    ("short price", {"prices": {"m": {"input": "1/" + " " * 190 + "x", "output": 0}}}),
    ("ttl", {"reservation_ttl": "1" * 500_000 + "x"}),
    ("rolling", {"budgets": [budget(window="rolling:" + "1" * 500_000 + "x")]}),
    ("tokens", {"budgets": [budget(tokens="1" * 500_000 + "x,")]}),
    ("usd", {"budgets": [budget(usd="1," * 250_000)]}),
]


@pytest.mark.parametrize(("case", "data"), LONG_TEXT, ids=[t[0] for t in LONG_TEXT])
def test_long_crafted_text_is_refused_in_linear_time(case: str, data: dict[str, object]) -> None:
    """Half a megabyte of blanks or digits in a field is refused at once with a short message,
    not parsed by a regular expression that backtracks for hours."""
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_policy_dict(data, source="budgets.yaml")
    assert time.perf_counter() - started < 2
    assert len(str(info.value)) < 1000
