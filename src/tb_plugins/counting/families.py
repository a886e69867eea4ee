"""Which tiktoken encoding, and which tool-definition constants, a model name gets.

OpenAI models are counted exactly, with their own encoding: ``o200k_base`` for gpt-4o,
gpt-4.1, gpt-4.5, gpt-5 and the o-series; ``cl100k_base`` for gpt-4, gpt-3.5 and the
embedding models; ``p50k_base`` for the old davinci and cushman models. Provider prefixes
(``openai/``, ``azure/``, ``openrouter/openai/``) and fine-tune names (``ft:gpt-4o-mini:...``)
are understood.

Other model families (Claude, Gemini, Llama, Mistral, unknown names) are approximated: the
``cl100k_base`` count of the same content, with the gpt-4 constants and the same image, audio
and file rules, times the counter's ``approximation_margin`` (default 1.2), rounded up.

Example:
    >>> family("openrouter/openai/gpt-4.1-mini").encoding
    'o200k_base'
    >>> family("claude-sonnet-4-5").own_encoding
    False
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "APPROXIMATION_ENCODING",
    "GPT4O_TOOL_RULES",
    "GPT4_TOOL_RULES",
    "Family",
    "ToolRules",
    "family",
    "openai_encoding",
]


class ToolRules(NamedTuple):
    """The constants of the cookbook's ``num_tokens_for_tools`` for one model family."""

    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


GPT4O_TOOL_RULES = ToolRules(7, 3, 3, -3, 3, 12)
GPT4_TOOL_RULES = ToolRules(10, 3, 3, -3, 3, 12)

APPROXIMATION_ENCODING = "cl100k_base"
"""The encoding that models without one of their own are counted with."""

_O200K_MODELS = re.compile(r"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4)(?:$|[-.:_])")
_CL100K_MODELS = re.compile(
    r"^(?:gpt-4(?:$|-)|gpt-3\.5-turbo|gpt-35-turbo|text-embedding-3-|text-embedding-ada-002)"
)
_P50K_MODELS = re.compile(r"^(?:text-davinci-00[23]|code-davinci-00[12]|code-cushman-00[12])")


class Family(NamedTuple):
    """How a model is counted."""

    encoding: str
    """The tiktoken encoding its text is counted with."""
    tool_rules: ToolRules
    """The constants its tool definitions are counted with."""
    own_encoding: bool
    """True for an OpenAI model (exact once the encoding is loaded); False: approximated."""


def _base_model(model: str) -> str:
    """``openrouter/openai/gpt-4o`` -> ``gpt-4o``; ``ft:gpt-4o-mini:org::id`` -> ``gpt-4o-mini``."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    return name


def openai_encoding(model: str) -> str | None:
    """Return the tiktoken encoding of an OpenAI model, or None for other models.

    Example:
        >>> openai_encoding("azure/gpt-4-turbo"), openai_encoding("gemini-2.5-pro")
        ('cl100k_base', None)
    """
    name = _base_model(model)
    if _O200K_MODELS.match(name):
        return "o200k_base"
    if _CL100K_MODELS.match(name):
        return "cl100k_base"
    if _P50K_MODELS.match(name):
        return "p50k_base"
    return None


def family(model: str) -> Family:
    """Return how ``model`` is counted: its encoding, tool constants, and whether it is exact.

    Example:
        >>> family("ft:gpt-4o-mini:acme::x1").tool_rules == GPT4O_TOOL_RULES
        True
    """
    name = openai_encoding(model)
    if name is None:
        return Family(APPROXIMATION_ENCODING, GPT4_TOOL_RULES, own_encoding=False)
    rules = GPT4O_TOOL_RULES if name == "o200k_base" else GPT4_TOOL_RULES
    return Family(name, rules, own_encoding=True)
