"""The estimate of a call before it runs: input tokens (counted, or given), the output cap,
and the price per token of the model that would run, as a :class:`~tb_plugins.core.policy.Plan`.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from tb_plugins.core.policy import Plan
from tb_plugins.core.pricing import ModelPrice, PriceTable, Pricing
from tb_plugins.core.request import Request
from tb_plugins.core.scopes import escape_text
from tb_plugins.core.usage import MAX_CALL_TOKENS, NANO, Usage, check_count
from tb_plugins.engine.holds import OutputHolds
from tb_plugins.errors import UnpricedModel
from tb_plugins.warnings import UnpricedModelWarning

if TYPE_CHECKING:
    from tb_plugins.config import Policy
    from tb_plugins.counting import Tokenizer

__all__ = ["Estimator", "check_model", "with_output"]

logger = logging.getLogger("tb_plugins")
_MAX_MODEL_NAME = 512


class Estimator:
    """Estimates calls and prices usage under one policy.

    Args:
        policy: the validated policy (request caps, default output, prices, unpriced rule,
            downgrade table).
        tokenizer: counts input tokens; None loads the default counter on first need (a
            call that passes ``input_tokens`` never loads it).
        prices: a price table under the policy's overrides (default: LiteLLM's bundled map).
    """

    def __init__(
        self, policy: Policy, tokenizer: Tokenizer | None, prices: PriceTable | None
    ) -> None:
        from tb_plugins.config import UsePrice

        self.policy = policy
        self._tokenizer = tokenizer
        overrides = {
            m: ModelPrice(p.input, p.output, p.cached_input, source="policy")
            for m, p in policy.prices.items()
        }
        self.pricing = Pricing(overrides, prices)
        self.unpriced_price = (
            ModelPrice(
                policy.unpriced.use_price.input,
                policy.unpriced.use_price.output,
                policy.unpriced.use_price.cached_input,
                source="policy:unpriced",
            )
            if isinstance(policy.unpriced, UsePrice)
            else None
        )
        self._warned_unpriced: set[str] = set()
        mode = policy.output_hold
        self.holds = OutputHolds(mode) if mode != "max_tokens" else None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (the process-wide default counter unless one was given)."""
        if self._tokenizer is None:
            from tb_plugins.counting import default_counter

            self._tokenizer = default_counter()
        return self._tokenizer

    def plan(
        self, request: Request, model: str | None = None, *, bound: bool = False
    ) -> tuple[Plan, list[str]]:
        """The estimate of ``request`` if ``model`` (default: the one asked for) runs it, and
        the reasons the request was changed (an output cap above the per-request cap).

        With ``bound``, the input side is an upper bound that encodes nothing
        (``plan.bound``; see :mod:`tb_plugins.counting.bound`) when the tokenizer offers one
        and no ``input_tokens`` were given; else it is counted.

        Raises:
            TypeError, ValueError: a bad model name, ``max_tokens`` or ``input_tokens``, or
                neither messages, prompt nor input_tokens.
            UnpricedModel: no price is known and the policy says ``unpriced: deny``.
        """
        model = request.model if model is None else model
        reasons: list[str] = []
        check_model(model)
        max_tokens = request.max_tokens
        if max_tokens is not None:
            check_count("max_tokens", max_tokens)
        input_tokens = request.input_tokens
        exact = True
        is_bound = False
        if input_tokens is not None:
            check_count("input_tokens", input_tokens)
        else:
            tokenizer = self.tokenizer
            bounds = bound and hasattr(tokenizer, "bound_messages")
            if bounds and request.messages is not None:
                input_tokens = tokenizer.bound_messages(  # type: ignore[attr-defined]
                    model, request.messages, request.tools
                )
                is_bound = True
            elif bounds and request.prompt is not None:
                prompt = request.prompt
                texts = [prompt] if isinstance(prompt, str) else list(prompt)
                input_tokens = sum(tokenizer.bound_text(model, t) for t in texts)  # type: ignore[attr-defined]
                is_bound = True
            elif request.messages is not None:
                input_tokens = tokenizer.count_messages(model, request.messages, request.tools)
            elif request.prompt is not None:
                prompt = request.prompt
                texts = [prompt] if isinstance(prompt, str) else list(prompt)
                input_tokens = sum(tokenizer.count_text(model, t) for t in texts)
            else:
                raise ValueError("check() needs messages, prompt or input_tokens")
            if input_tokens > MAX_CALL_TOKENS:
                if is_bound:  # a bound past the maximum says nothing: count
                    return self.plan(request, model)
                check_count("the request's input tokens", input_tokens)
            exact = False if is_bound else tokenizer.is_exact(model)
        caps = self.policy.request
        out = self.policy.default_output_tokens if max_tokens is None else max_tokens
        applied = max_tokens
        if caps.max_output_tokens is not None and out > caps.max_output_tokens:
            if max_tokens is not None:
                reasons.append(
                    f"max_tokens {max_tokens} above the per-request cap {caps.max_output_tokens}"
                )
            out = applied = caps.max_output_tokens
        price, priced = self.price(model)
        if self.holds is not None:  # a learned percentile, never above the cap (applied)
            out = self.holds.hold(model, out)
        plan = Plan(
            model=model,
            input_tokens=input_tokens,
            output_tokens=out,
            max_tokens=applied,
            input_nano_per_token=(price.input_per_token * NANO) if price else 0.0,
            output_nano_per_token=(price.output_per_token * NANO) if price else 0.0,
            priced=priced,
            exact=exact,
            bound=is_bound,
        )
        return plan, reasons

    def price(self, model: str) -> tuple[ModelPrice | None, bool]:
        """The price of ``model`` and whether it is priced (the unpriced rule applied)."""
        price = self.pricing.price(model)
        if price is not None:
            return price, True
        if self.policy.unpriced == "deny":
            raise UnpricedModel(model)
        if self.unpriced_price is not None:
            return self.unpriced_price, True
        if model not in self._warned_unpriced:
            self._warned_unpriced.add(model)
            msg = (
                f"tb_plugins: model {model!r} has no known price; counting its tokens only "
                f"(usd budgets do not see it). Add it under 'prices:' in the policy."
            )
            logger.warning(msg)
            warnings.warn(msg, UnpricedModelWarning, stacklevel=5)
        return None, False

    def cost(self, usage: Usage, served: str, decided: str) -> float | None:
        """The dollars of ``usage``: as reported, else priced for the model that served it,
        else for the one decided, else at the unpriced rule's price; None if unpriced."""
        if usage.usd is not None:
            return usage.usd
        usd = self.pricing.cost(
            served, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        )
        if usd is None and served != decided:
            usd = self.pricing.cost(
                decided, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
            )
        if usd is None and self.unpriced_price is not None:
            p = self.unpriced_price
            usd = usage.input_tokens * p.input_per_token + usage.output_tokens * p.output_per_token
        return usd

    def downgrade_model(self, model: str) -> str | None:
        """The cheaper model ``model`` maps to (a ``provider/`` prefix kept), if any."""
        table = self.policy.downgrade
        if model in table:
            return table[model]
        prefix, sep, bare = model.rpartition("/")
        if sep and bare in table:
            return f"{prefix}/{table[bare]}"
        return None


def check_model(model: object) -> None:
    """Refuse a model name the ledger could not store or print.

    Raises:
        TypeError: not a non-empty string.
        ValueError: over 512 characters, or a control character or lone surrogate in it.
    """
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a model name, got {model!r}")
    if len(model) > _MAX_MODEL_NAME:
        raise ValueError(
            f"model name {model[:40]!r}... is longer than {_MAX_MODEL_NAME} characters"
        )
    if not model.isprintable() and escape_text(model) != model:
        raise ValueError(f"model name {model!r} contains a control character or lone surrogate")


def with_output(plan: Plan, output_tokens: int) -> Plan:
    """``plan`` with its output cap lowered to ``output_tokens``."""
    return Plan(
        model=plan.model,
        input_tokens=plan.input_tokens,
        output_tokens=output_tokens,
        max_tokens=output_tokens,
        input_nano_per_token=plan.input_nano_per_token,
        output_nano_per_token=plan.output_nano_per_token,
        priced=plan.priced,
        exact=plan.exact,
    )
