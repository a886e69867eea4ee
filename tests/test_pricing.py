"""Prices: LiteLLM's bundled cost map read offline, overrides, cached-token billing."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tb_plugins.core import _assets, pricing
from tb_plugins.core.pricing import LiteLLMPriceTable, ModelPrice, PriceTable, Pricing, parse_price


@pytest.fixture(scope="module")
def cost_map() -> dict[str, Any]:
    """The bundled cost map, read directly as the reference."""
    path = _assets.litellm_model_cost_map()
    if path is None:
        pytest.skip("litellm is not installed")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def write_map(tmp_path: Path, entries: dict[str, Any]) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_gpt_4o_price_comes_from_the_bundled_map(cost_map: dict[str, Any]) -> None:
    """gpt-4o's input, output and cached rates are the map's, with or without a prefix."""
    entry = cost_map["gpt-4o"]
    expected = ModelPrice(
        input_per_token=entry["input_cost_per_token"],
        output_per_token=entry["output_cost_per_token"],
        cached_input_per_token=entry["cache_read_input_token_cost"],
        source="litellm",
    )
    table = LiteLLMPriceTable()
    assert table.price("gpt-4o") == expected
    assert table.price("openai/gpt-4o") == expected
    assert table.price("GPT-4o") == expected


def test_claude_prices_come_from_the_bundled_map_under_every_name_form(
    cost_map: dict[str, Any],
) -> None:
    """Claude resolves exactly, with a provider prefix, and with an unknown date suffix."""
    entry = cost_map["claude-sonnet-4-5"]
    table = LiteLLMPriceTable()
    for name in (
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        "anthropic/claude-sonnet-4-5",
        "anthropic/claude-sonnet-4-5-20990101",
    ):
        price = table.price(name)
        assert price is not None, name
        assert price.input_per_token == entry["input_cost_per_token"]
        assert price.output_per_token == entry["output_cost_per_token"]
        assert price.cached_input_per_token == entry["cache_read_input_token_cost"]


def test_non_chat_modes_are_still_priced(cost_map: dict[str, Any]) -> None:
    """An embedding model is priced per input token with output 0."""
    price = LiteLLMPriceTable().price("text-embedding-3-small")
    assert price is not None
    assert price.input_per_token == cost_map["text-embedding-3-small"]["input_cost_per_token"]
    assert price.output_per_token == 0.0


def test_unknown_model_has_no_price_and_no_cost() -> None:
    """A model the map lacks is None, never a silent $0."""
    assert LiteLLMPriceTable().price("acme-imaginary-model-9000") is None
    assert Pricing().price("acme-imaginary-model-9000") is None
    assert Pricing().cost("acme-imaginary-model-9000", 1000, 1000) is None


def test_overrides_win_over_the_table_for_every_name_form() -> None:
    """An override for gpt-4o prices gpt-4o, openai/gpt-4o and gpt-4o-2024-08-06."""
    override = ModelPrice(1e-6, 2e-6, source="override")
    prices = Pricing(overrides={"gpt-4o": override})
    for name in ("gpt-4o", "openai/gpt-4o", "gpt-4o-2024-08-06"):
        assert prices.price(name) is override
    assert prices.price("gpt-4o-mini") != override


def test_overrides_price_models_the_table_lacks() -> None:
    """A private model gets its price from the overrides."""
    prices = Pricing(overrides={"in-house-llm": ModelPrice(parse_price("$1/1M"), 0.0)})
    assert prices.cost("in-house-llm", 2_000_000, 10) == pytest.approx(2.0)


def test_cached_tokens_are_billed_at_the_cached_rate(cost_map: dict[str, Any]) -> None:
    """Cached tokens are part of input and cost the cached rate; uncached the input rate."""
    entry = cost_map["gpt-4o"]
    cost = Pricing().cost("gpt-4o", input_tokens=1000, output_tokens=200, cached_input_tokens=600)
    expected = (
        400 * entry["input_cost_per_token"]
        + 600 * entry["cache_read_input_token_cost"]
        + 200 * entry["output_cost_per_token"]
    )
    assert cost == pytest.approx(expected)


def test_cached_tokens_fall_back_to_the_input_rate_without_a_cached_price() -> None:
    """A model with no cached rate bills cached tokens as ordinary input."""
    prices = Pricing(overrides={"m": ModelPrice(input_per_token=1e-6, output_per_token=3e-6)})
    assert prices.cost("m", 1000, 100, cached_input_tokens=900) == pytest.approx(1000e-6 + 300e-6)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, 0), "input_tokens"),
        ((10, -5, 0), "output_tokens"),
        ((10, 0, 11), "cannot exceed"),
        ((1.5, 0, 0), "input_tokens"),
    ],
)
def test_cost_rejects_impossible_token_counts(args: tuple[Any, ...], match: str) -> None:
    """Negative counts, non-integers and more cached than input tokens are errors."""
    with pytest.raises(ValueError, match=match):
        Pricing(overrides={"m": ModelPrice(1e-6, 1e-6)}).cost("m", *args)


def test_model_price_rejects_negative_or_nan_rates() -> None:
    """A price must be a finite number >= 0."""
    with pytest.raises(ValueError, match="input_per_token"):
        ModelPrice(-1e-6, 1e-6)
    with pytest.raises(ValueError, match="cached_input_per_token"):
        ModelPrice(1e-6, 1e-6, float("nan"))


def test_without_litellm_the_table_is_empty_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """If LiteLLM is not installed, every lookup is None."""
    monkeypatch.setattr(_assets, "litellm_model_cost_map", lambda: None)
    assert LiteLLMPriceTable().price("gpt-4o") is None


def test_a_custom_map_resolves_prefixes_dates_and_aliases(tmp_path: Path) -> None:
    """Bare names find provider-prefixed keys; undated aliases find the newest dated key."""
    table = LiteLLMPriceTable(
        write_map(
            tmp_path,
            {
                "gemini/zeta-pro": {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                "foo-model-20240101": {"input_cost_per_token": 5e-6, "output_cost_per_token": 1e-5},
                "foo-model-20250101": {"input_cost_per_token": 3e-6, "output_cost_per_token": 6e-6},
            },
        )
    )
    assert table.price("zeta-pro") == ModelPrice(1e-6, 2e-6)
    assert table.price("foo-model") == ModelPrice(3e-6, 6e-6)
    assert table.price("foo-model-20240101") == ModelPrice(5e-6, 1e-5)
    assert table.price("foo-model-20990101") == ModelPrice(3e-6, 6e-6)


def test_entries_without_a_per_token_price_have_no_price(tmp_path: Path) -> None:
    """Image models and 0/0 entries billed per query are None; a truly free model is 0/0."""
    table = LiteLLMPriceTable(
        write_map(
            tmp_path,
            {
                "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
                "pixels": {"mode": "image_generation", "input_cost_per_pixel": 1e-8},
                "reranker": {
                    "mode": "rerank",
                    "input_cost_per_token": 0.0,
                    "output_cost_per_token": 0.0,
                    "input_cost_per_query": 0.002,
                },
                "free-local": {
                    "mode": "chat",
                    "input_cost_per_token": 0,
                    "output_cost_per_token": 0,
                },
            },
        )
    )
    assert table.price("sample_spec") is None
    assert table.price("pixels") is None
    assert table.price("reranker") is None
    assert table.price("free-local") == ModelPrice(0.0, 0.0)


def test_the_map_is_read_once_even_under_concurrent_first_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Eight threads racing on a fresh table read the file exactly once."""
    path = write_map(tmp_path, {"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 0}})
    reads: list[str] = []
    original = pricing._read_json

    def counting_read(p: str) -> object:
        reads.append(p)
        return original(p)

    monkeypatch.setattr(pricing, "_read_json", counting_read)
    table = LiteLLMPriceTable(path)
    barrier = threading.Barrier(8)
    results: list[ModelPrice | None] = []

    def look_up() -> None:
        barrier.wait()
        results.append(table.price("m"))

    threads = [threading.Thread(target=look_up) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == [str(path)]
    assert results == [ModelPrice(1e-6, 0.0)] * 8


def test_a_broken_explicit_map_is_reported_with_its_path(tmp_path: Path) -> None:
    """A custom map that is not JSON raises ValueError naming the file."""
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json"):
        LiteLLMPriceTable(path).price("x")


def test_price_table_protocol_accepts_custom_tables() -> None:
    """Any object with price(model) is a PriceTable and can back Pricing."""

    class Flat:
        def price(self, model: str) -> ModelPrice | None:
            return ModelPrice(1e-6, 1e-6, source="flat") if model.startswith("x") else None

    assert isinstance(Flat(), PriceTable)
    assert isinstance(LiteLLMPriceTable(), PriceTable)
    prices = Pricing(table=Flat())
    assert prices.cost("x-1", 10, 10) == pytest.approx(2e-5)
    assert prices.price("gpt-4o") is None


@pytest.mark.parametrize(
    ("text", "per_token"),
    [
        ("$2.50/1M", 2.5e-6),
        ("2.5/1M", 2.5e-6),
        ("$0.002/1k", 2e-6),
        ("$0.50/1K tokens", 5e-4),
        ("$3e-6", 3e-6),
        ("3E-6", 3e-6),
        (3e-6, 3e-6),
        (0, 0.0),
        ("$3 per million tokens", 3e-6),
        ("$1.25 / 1M tokens", 1.25e-6),
        ("$15/M", 1.5e-5),
        ("1/1000", 1e-3),
        ("$1/1,000,000", 1e-6),
        ("$0.0004 per token", 4e-4),
        ("  $10/1m  ", 1e-5),
    ],
)
def test_parse_price_reads_common_forms(text: str | float, per_token: float) -> None:
    """Readable prices become USD per token."""
    assert parse_price(text) == pytest.approx(per_token, rel=1e-12)


def test_parse_price_keeps_exact_decimal_results() -> None:
    """$2.50/1M is exactly 2.5e-06, not a float-multiplication neighbour."""
    assert parse_price("$2.50/1M") == 2.5e-06


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "$-1/1M",
        "-3e-6",
        "$2.50/",
        "2.5/0",
        "1/1G",
        "$2.50/1M/1k",
        True,
        float("nan"),
        -1,
    ],
)
def test_parse_price_rejects_anything_else_with_a_clear_message(text: Any) -> None:
    """Unparseable, negative or non-finite prices raise ValueError saying 'not a price'."""
    with pytest.raises(ValueError, match="not a price"):
        parse_price(text)
