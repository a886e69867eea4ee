"""Model prices, offline: LiteLLM's bundled cost map plus the policy file's overrides.

The cost map is read as plain JSON from LiteLLM's package folder (LiteLLM itself is never
imported), lazily and once per table. A model the map does not know has no price
(``None``), never a silent $0: the guard's ``unpriced:`` policy decides what happens then.

Example:
    >>> from tb_plugins.core.pricing import ModelPrice, Pricing, parse_price
    >>> pricing = Pricing(overrides={"my-model": ModelPrice(parse_price("$2/1M"), 8e-6)})
    >>> pricing.cost("my-model", input_tokens=1_000_000, output_tokens=0)
    2.0
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tb_plugins.core.usage import MAX_PRICE

__all__ = [
    "LiteLLMPriceTable",
    "ModelPrice",
    "PriceTable",
    "Pricing",
    "parse_price",
    "strip_thousands_separators",
]


@dataclass(frozen=True)
class ModelPrice:
    """USD per token for one model.

    Attributes:
        input_per_token: Price of one uncached input token.
        output_per_token: Price of one output token.
        cached_input_per_token: Price of one input token read from the provider's prompt
            cache, or None if the model has no separate cached rate.
        source: Where the price came from (``"litellm"``, ``"override"``, ...).

    Example:
        >>> ModelPrice(input_per_token=2.5e-6, output_per_token=1e-5).cached_input_per_token
    """

    input_per_token: float
    output_per_token: float
    cached_input_per_token: float | None = None
    source: str = "litellm"

    def __post_init__(self) -> None:
        for field in ("input_per_token", "output_per_token", "cached_input_per_token"):
            value = getattr(self, field)
            if value is None and field == "cached_input_per_token":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"ModelPrice.{field} must be a finite number >= 0, got {value!r}")


@runtime_checkable
class PriceTable(Protocol):
    """Anything that can price a model: the extension point for your own price source.

    Example:
        >>> class Flat:
        ...     def price(self, model):
        ...         return ModelPrice(1e-6, 2e-6, source="flat")
        >>> isinstance(Flat(), PriceTable)
        True
    """

    def price(self, model: str) -> ModelPrice | None:
        """Return the price of ``model``, or None if unknown."""
        ...


# Tried, in order, for a bare name the map only knows with a provider prefix.
_PROVIDER_PREFIXES = (
    "openai",
    "anthropic",
    "gemini",
    "vertex_ai",
    "mistral",
    "deepseek",
    "xai",
    "groq",
    "cohere",
    "azure",
    "bedrock",
)
_DATE_SUFFIX = re.compile(r"(?:[-@]\d{8}|-\d{4}-\d{2}-\d{2}|-\d{4})(?:-v\d+(?::\d+)?)?$")
_MAX_RESOLVED = 4096


def _name_candidates(model: str) -> Iterator[str]:
    """Names to try for ``model``, most specific first."""
    seen: set[str] = set()
    for name in (model.strip(), model.strip().lower()):
        stripped = [name]
        while "/" in stripped[-1]:
            stripped.append(stripped[-1].split("/", 1)[1])
        for candidate in stripped:
            if candidate and candidate not in seen:
                seen.add(candidate)
                yield candidate
    bare = model.strip().lower().rsplit("/", 1)[-1]
    for prefix in _PROVIDER_PREFIXES:
        candidate = f"{prefix}/{bare}"
        if candidate not in seen:
            seen.add(candidate)
            yield candidate
    undated = _DATE_SUFFIX.sub("", bare)
    if undated and undated != bare and undated not in seen:
        yield undated


class LiteLLMPriceTable:
    """Prices from LiteLLM's bundled ``model_prices_and_context_window_backup.json``.

    The file is read as data (LiteLLM is not imported) on the first lookup, once, under a
    lock. If LiteLLM is not installed the table is empty and every lookup returns None.

    A name is looked up as given; then without its provider prefix
    (``openrouter/openai/gpt-4o`` -> ``openai/gpt-4o`` -> ``gpt-4o``); then with common
    provider prefixes (``gemini/...``); then without a trailing date
    (``claude-sonnet-4-5-20990101`` -> ``claude-sonnet-4-5``); and finally an undated alias
    resolves to the newest dated entry (``claude-haiku-4-5`` -> ``claude-haiku-4-5-20251001``
    if only the dated key existed). Entries without a per-token price (image, audio,
    per-query rerank models) have no price.

    Args:
        path: A cost-map JSON file to read instead of LiteLLM's bundled one. Reading it
            on the first lookup raises OSError if it is missing and ValueError if it is
            not JSON.

    Example:
        >>> table = LiteLLMPriceTable()
        >>> price = table.price("openai/gpt-4o")
        >>> price is None or price.input_per_token > 0
        True
        >>> table.price("no-such-model-anywhere") is None
        True
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, ModelPrice] | None = None
        self._aliases: dict[str, str] = {}
        self._resolved: dict[str, ModelPrice | None] = {}

    def price(self, model: str) -> ModelPrice | None:
        """Return the price of ``model`` from the cost map, or None if it has none."""
        if model in self._resolved:
            return self._resolved[model]
        entries = self._load()
        found: ModelPrice | None = None
        for candidate in _name_candidates(model):
            found = entries.get(candidate)
            if found is None and candidate in self._aliases:
                found = entries.get(self._aliases[candidate])
            if found is not None:
                break
        if len(self._resolved) >= _MAX_RESOLVED:  # names can come from clients: stay bounded
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def _load(self) -> dict[str, ModelPrice]:
        if self._entries is not None:
            return self._entries
        with self._lock:
            if self._entries is None:
                path = self._path
                if path is None:
                    from tb_plugins.core import _assets  # pathlib and hashlib: only when needed

                    bundled = _assets.litellm_model_cost_map()
                    path = None if bundled is None else os.fspath(bundled)
                raw: object = {} if path is None else _read_json(path)
                entries, self._aliases = _parse_cost_map(raw)
                self._entries = entries  # last: it is what lock-free readers check
            return self._entries


def _read_json(path: str) -> object:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid model cost map: {exc}") from exc


def _parse_cost_map(raw: object) -> tuple[dict[str, ModelPrice], dict[str, str]]:
    entries: dict[str, ModelPrice] = {}
    dated: dict[str, str] = {}
    if not isinstance(raw, Mapping):
        return entries, dated
    for key, spec in raw.items():
        if key == "sample_spec" or not isinstance(key, str) or not isinstance(spec, Mapping):
            continue
        price = _entry_price(spec)
        if price is None:
            continue
        entries[key] = price
        undated = _DATE_SUFFIX.sub("", key)
        if undated != key and (undated not in dated or key > dated[undated]):
            dated[undated] = key
    return entries, {alias: key for alias, key in dated.items() if alias not in entries}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _entry_price(spec: Mapping[str, Any]) -> ModelPrice | None:
    input_price = _number(spec.get("input_cost_per_token"))
    if input_price is None:
        return None
    output_price = _number(spec.get("output_cost_per_token")) or 0.0
    if input_price == 0 and output_price == 0 and _billed_otherwise(spec):
        return None
    return ModelPrice(
        input_per_token=input_price,
        output_per_token=output_price,
        cached_input_per_token=_number(spec.get("cache_read_input_token_cost")),
        source="litellm",
    )


def _billed_otherwise(spec: Mapping[str, Any]) -> bool:
    """True if a 0/0 per-token entry is really billed per query, second, image..."""
    return any(
        "cost" in key and (_number(value) or 0) > 0
        for key, value in spec.items()
        if key not in ("input_cost_per_token", "output_cost_per_token")
    )


_default_table_lock = threading.Lock()
_default_table: LiteLLMPriceTable | None = None


def _shared_table() -> LiteLLMPriceTable:
    global _default_table
    if _default_table is None:
        with _default_table_lock:
            if _default_table is None:
                _default_table = LiteLLMPriceTable()
    return _default_table


class Pricing:
    """Prices with overrides: the policy file's prices first, then a price table.

    Overrides are matched with the same name forms as the table (so an override for
    ``gpt-4o`` also prices ``openai/gpt-4o`` and ``gpt-4o-2024-08-06``), and every form is
    tried against the overrides before the table is consulted.

    Args:
        overrides: Model name -> price, taking precedence over ``table``.
        table: Where other prices come from; by default one shared
            :class:`LiteLLMPriceTable` per process.

    Example:
        >>> pricing = Pricing(overrides={"gpt-4o": ModelPrice(2e-6, 8e-6, 1e-6, "override")})
        >>> pricing.price("openai/gpt-4o").source
        'override'
        >>> round(pricing.cost("gpt-4o", 1000, 100, cached_input_tokens=400), 6)
        0.0024
    """

    def __init__(
        self,
        overrides: Mapping[str, ModelPrice] | None = None,
        table: PriceTable | None = None,
    ) -> None:
        self._overrides = dict(overrides or {})
        for name, price in self._overrides.items():
            if not isinstance(price, ModelPrice):
                raise TypeError(
                    f"override for {name!r} must be a ModelPrice, got {type(price).__name__}"
                )
        self._table = table if table is not None else _shared_table()

    def price(self, model: str) -> ModelPrice | None:
        """Return the price of ``model``: an override if one matches, else the table's."""
        if self._overrides:
            for candidate in _name_candidates(model):
                override = self._overrides.get(candidate)
                if override is not None:
                    return override
        return self._table.price(model)

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
    ) -> float | None:
        """Return the USD cost of a call, or None if the model has no known price.

        ``cached_input_tokens`` are part of ``input_tokens`` (as OpenAI reports them) and
        are billed at the cached rate when the model has one, else at the input rate.

        Raises:
            ValueError: If a token count is negative or ``cached_input_tokens`` exceeds
                ``input_tokens``.

        Example:
            >>> pricing = Pricing(overrides={"m": ModelPrice(1e-6, 2e-6)})
            >>> round(pricing.cost("m", input_tokens=100, output_tokens=10), 8)
            0.00012
            >>> pricing.cost("no-such-model-anywhere", 1, 1) is None
            True
        """
        for label, value in (
            ("input_tokens", input_tokens),
            ("output_tokens", output_tokens),
            ("cached_input_tokens", cached_input_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an int >= 0, got {value!r}")
        if cached_input_tokens > input_tokens:
            raise ValueError(
                f"cached_input_tokens ({cached_input_tokens}) cannot exceed input_tokens "
                f"({input_tokens}): cached tokens are part of the input"
            )
        price = self.price(model)
        if price is None:
            return None
        cached_rate = price.cached_input_per_token
        if cached_rate is None:
            cached_rate = price.input_per_token
        return (
            (input_tokens - cached_input_tokens) * price.input_per_token
            + cached_input_tokens * cached_rate
            + output_tokens * price.output_per_token
        )


_PRICE = re.compile(
    r"""^\s*(?:usd\s*)?\$?\s*
    (?P<amount>(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)
    \s*(?:usd)?\s*
    (?:(?P<per>/|per\b)\s*
        (?P<count>\d+(?:\.\d+)?(?:e[-+]?\d+)?)?\s*
        (?P<unit>k|m|thousand|million)?\s*
        (?P<tokens>tokens?|tok)?
    )?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_UNITS = {"k": 1e3, "thousand": 1e3, "m": 1e6, "million": 1e6}


def parse_price(text: str | float | int, *, maximum: float = MAX_PRICE) -> float:
    """Return USD per token from a readable price.

    Accepts a number (already per token) or a string such as ``"$2.50/1M"``,
    ``"2.5/1M tokens"``, ``"$0.002/1k"``, ``"$3 per million"``, ``"$3e-6"``; a string without
    ``/`` is per token. A comma only separates thousands (``"$1/1,000,000"``); a decimal comma
    (``"$2,50/1M"``) is refused rather than read as 250.

    Args:
        text: the price.
        maximum: the highest price per token accepted, by default
            :data:`~tb_plugins.core.usage.MAX_PRICE` ($0.01 per token, $10,000 per 1M tokens).

    Raises:
        ValueError: If the value is not a finite price in ``[0, maximum]`` in one of those forms
            (text longer than 200 characters included).

    Example:
        >>> parse_price("$2.50/1M")
        2.5e-06
        >>> parse_price("$0.002/1k"), parse_price(3e-6)
        (2e-06, 3e-06)
    """
    if isinstance(text, bool):
        raise ValueError(f"not a price: {text!r}")
    if isinstance(text, int | float):
        if isinstance(text, int) and text > maximum:  # before float(): a huge int overflows it
            raise ValueError(
                f"not a price: {_short(text)} per token is above the maximum of ${maximum:g}"
            )
        value = float(text)
    elif isinstance(text, str):
        value = _parse_price_text(text)
    else:
        raise ValueError(
            f"not a price: a {type(text).__name__} (expected a number or text like '$2.50/1M')"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a price: {_short(text)} (must be a finite number >= 0)")
    if value > maximum:
        raise ValueError(
            f"not a price: {_short(text)} is ${value:g} per token, above the maximum of "
            f"${maximum:g} per token (${maximum * 1e6:,.0f} per 1M tokens)"
        )
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-10:]} ({len(text):,} characters)"


_NUMBER_RUN = re.compile(r"[\d.,]+")  # linear: a required "," inside would backtrack
_GROUPED = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def strip_thousands_separators(text: str) -> str:
    """``text`` without the commas that separate thousands: ``"2,000,000"`` -> ``"2000000"``.

    A comma counts as a thousands separator only between groups of exactly three digits in
    the whole part of a number (``1,500.25``). Any other comma is refused, since in much of
    the world ``1,5`` means one and a half and must not be read as fifteen.

    Raises:
        ValueError: a comma that is not a thousands separator (the message suggests the same
            number written with a decimal point).

    Example:
        >>> strip_thousands_separators("$1,000/1,000,000")
        '$1000/1000000'
    """
    if "," not in text:
        return text
    out: list[str] = []
    pos = 0
    for m in _NUMBER_RUN.finditer(text):
        run = m.group()
        if "," not in run:
            continue
        if not _GROUPED.fullmatch(run):
            if run.count(",") == 1 and "." not in run and run.strip(",") == run:
                hint = _short(text[: m.start()] + run.replace(",", ".") + text[m.end() :])
            else:
                hint = "'1.5M'"
            raise ValueError(
                f"{_short(text)}: a comma only separates thousands, in groups of three digits "
                f"(2,000,000); write decimals with a point, e.g. {hint}"
            )
        out.append(text[pos : m.start()])
        out.append(run.replace(",", ""))
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


_MAX_PRICE_TEXT = 200


def _parse_price_text(text: str) -> float:
    if len(text) > _MAX_PRICE_TEXT:
        raise ValueError(f"not a price: {_short(text)} is longer than {_MAX_PRICE_TEXT} characters")
    # One space per gap: _PRICE's neighbouring optional spaces would otherwise backtrack
    # polynomially on a long run of blanks.
    try:
        plain = strip_thousands_separators(" ".join(text.replace("_", "").split()))
    except ValueError as exc:
        raise ValueError(f"not a price: {exc}") from None
    match = _PRICE.match(plain)
    if match is None:
        raise ValueError(
            f"not a price: {_short(text)} (expected USD per token like 3e-6, or per block like "
            "'$2.50/1M', '$0.002/1k', '$3 per million tokens')"
        )
    amount = float(match["amount"])
    if match["per"] is None:
        return amount
    count = float(match["count"]) if match["count"] else None
    unit = _UNITS[match["unit"].lower()] if match["unit"] else None
    if count is None and unit is None and match["tokens"] is None:
        raise ValueError(f"not a price: {_short(text)} (nothing after {match['per']!r})")
    divisor = (count if count is not None else 1.0) * (unit if unit is not None else 1.0)
    if divisor <= 0:
        raise ValueError(f"not a price: {_short(text)} (divides by zero tokens)")
    # amount / 1e6 rounds differently from amount * 1e-6; dividing keeps 2.5/1M == 2.5e-06.
    return amount / divisor
