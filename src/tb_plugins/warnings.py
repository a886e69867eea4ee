"""Warnings tb_plugins emits (tests turn these into errors unless a test expects one)."""

from __future__ import annotations

__all__ = [
    "ApproximateCountWarning",
    "FailOpenWarning",
    "TokenBudgetWarning",
    "UnpricedModelWarning",
]


class TokenBudgetWarning(UserWarning):
    """Base class of tb_plugins warnings."""


class FailOpenWarning(TokenBudgetWarning):
    """The ledger was unreachable and a call was admitted under ``on_ledger_error: fail_open``."""


class UnpricedModelWarning(TokenBudgetWarning):
    """A model has no known price; only its tokens are counted (``unpriced: count_tokens_only``)."""


class ApproximateCountWarning(TokenBudgetWarning):
    """Token counts are approximate because no tokenizer file is available offline."""
