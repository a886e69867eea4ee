"""Model names: one name per model, whichever way a caller spelled it.

LiteLLM names a model with its provider in front (``openai/gpt-4o``); the provider's own API
and the LangChain integrations name it without (``gpt-4o``). Both are the same model, so
reports group them under the bare name.

The rule is deliberately simple: drop one leading ``provider/`` segment, whatever the provider.
A name with more segments keeps the rest (``openrouter/openai/gpt-4o`` is
``openai/gpt-4o``); a name without a ``/``, or with nothing on one side of it, is unchanged.

Example:
    >>> bare_model("openai/gpt-4o")
    'gpt-4o'
    >>> bare_model("gpt-4o")
    'gpt-4o'
    >>> bare_model("openrouter/openai/gpt-4o")
    'openai/gpt-4o'
"""

from __future__ import annotations

__all__ = ["bare_model"]


def bare_model(name: str) -> str:
    """``name`` without one leading ``provider/`` segment (see the module docstring).

    Args:
        name: a model name as a caller or a provider reported it.

    Returns:
        The name after the first ``/``, or ``name`` itself when it has no ``/`` or nothing
        before or after it.

    Example:
        >>> bare_model("azure/gpt-4o-mini"), bare_model("/gpt-4o"), bare_model("openai/")
        ('gpt-4o-mini', '/gpt-4o', 'openai/')
    """
    provider, sep, rest = name.partition("/")
    return rest if sep and provider and rest else name
