"""The downgrade helper for plain chains: the cheaper model and a lower ``max_tokens`` as a
budget runs low."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage, BaseMessageChunk
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config

from tb_plugins.core.request import Request
from tb_plugins.engine import BudgetGuard, Decision
from tb_plugins.errors import (
    BudgetRefused,
)
from tb_plugins.integrations.langchain import adapters as lc
from tb_plugins.integrations.langchain.errors import _lc_error
from tb_plugins.integrations.langchain.handler import _GUARDED

logger = logging.getLogger("tb_plugins")

# -- chain downgrade ---------------------------------------------------------------------------


class BudgetDowngrade(Runnable[LanguageModelInput, BaseMessage]):
    """A chat model step that runs ``model`` or ``cheaper_model`` as the guard decides.

    Built by :func:`with_budget_downgrade`; see there.
    """

    def __init__(
        self,
        model: Runnable[LanguageModelInput, BaseMessage],
        cheaper_model: Runnable[LanguageModelInput, BaseMessage],
        guard: BudgetGuard,
        scopes: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.cheaper_model = cheaper_model
        self.guard = guard
        self.scopes = tuple(scopes)
        self.name = "BudgetDowngrade"

    def _plan(
        self, input: LanguageModelInput, config: RunnableConfig
    ) -> tuple[Request, list[BaseMessage]]:
        base, settings = lc.unwrap_chat_model(self.model)
        messages = base._convert_input(input).to_messages()
        call = Request(
            model=lc.model_name(base),
            messages=lc.openai_messages(messages),
            tools=lc.openai_tools(settings.get("tools")),
            max_tokens=lc.requested_max_tokens(base, settings),
            scopes=(*self.scopes, *lc.metadata_scopes(config.get("metadata"))),
            priority=lc.metadata_priority(config.get("metadata")),
        )
        return call, messages

    def _choose(
        self, call: Request, decision: Decision
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        chosen = self.model if decision.model == call.model else self.cheaper_model
        if decision.max_tokens is not None and (
            decision.max_tokens != call.max_tokens or chosen is not self.model
        ):
            key = lc.max_tokens_key(lc.unwrap_chat_model(chosen)[0])
            chosen = chosen.bind(**{key: decision.max_tokens})
        return chosen

    def _check(self, call: Request) -> Decision:
        try:
            return self.guard.check_request(call)
        except BudgetRefused as err:
            raise _lc_error(err) from None

    async def _acheck(self, call: Request) -> Decision:
        try:
            return await self.guard.acheck_request(call)
        except BudgetRefused as err:
            raise _lc_error(err) from None

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> BaseMessage:
        """Check, run the model the decision names, settle."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = self._check(call)
        token = _GUARDED.set(True)
        try:
            out = self._choose(call, decision).invoke(messages, config, **kwargs)
        except BaseException as exc:
            lc.finish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        lc.finish(self.guard, decision, lc.usage_from_message(out, decision.model))
        return out

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> BaseMessage:
        """Async :meth:`invoke`."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = await self._acheck(call)
        token = _GUARDED.set(True)
        try:
            out = await self._choose(call, decision).ainvoke(messages, config, **kwargs)
        except BaseException as exc:
            await lc.afinish(self.guard, decision, lc.failure_cost(exc, decision.model))
            raise
        finally:
            _GUARDED.reset(token)
        await lc.afinish(self.guard, decision, lc.usage_from_message(out, decision.model))
        return out

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[BaseMessage]:
        """Stream from the model the decision names; settle when the stream ends (its
        estimate if it reports no usage or is abandoned)."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = self._check(call)
        merged: BaseMessageChunk | None = None
        chunks = self._choose(call, decision).stream(messages, config, **kwargs)
        try:
            while True:
                # LangChain may resume this generator in another context: set the flag
                # around each step, never across a yield.
                token = _GUARDED.set(True)
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                finally:
                    _GUARDED.reset(token)
                merged = lc.merge_chunk(merged, chunk)
                yield chunk
        except BaseException as exc:
            getattr(chunks, "close", lambda: None)()
            lc.finish(self.guard, decision, lc.failure_cost(exc, decision.model, partial=merged))
            raise
        lc.finish(self.guard, decision, lc.usage_from_message(merged, decision.model))

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[BaseMessage]:
        """Async :meth:`stream`."""
        config = ensure_config(config)
        call, messages = self._plan(input, config)
        decision = await self._acheck(call)
        merged: BaseMessageChunk | None = None
        chunks = self._choose(call, decision).astream(messages, config, **kwargs)
        try:
            while True:
                token = _GUARDED.set(True)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    _GUARDED.reset(token)
                merged = lc.merge_chunk(merged, chunk)
                yield chunk
        except BaseException as exc:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            cost = lc.failure_cost(exc, decision.model, partial=merged)
            await lc.afinish(self.guard, decision, cost)
            raise
        await lc.afinish(self.guard, decision, lc.usage_from_message(merged, decision.model))


def with_budget_downgrade(
    model: Runnable[LanguageModelInput, BaseMessage],
    cheaper_model: Runnable[LanguageModelInput, BaseMessage],
    guard: BudgetGuard,
    scopes: Iterable[str] = (),
) -> Runnable[LanguageModelInput, BaseMessage]:
    """A chat model step for plain chains that switches to ``cheaper_model`` when the guard
    downgrades (``downgrade_at``, or only the cheaper model fits) and lowers ``max_tokens`` when
    it clamps. Refusals raise :class:`BudgetRefusedError`.

    The policy's ``downgrade:`` table decides *when*; ``cheaper_model`` is what runs then. The
    scope path is ``scopes`` + scopes from run metadata (``team``, ``user_id``, ``tb_scopes``);
    a :class:`TokenBudgetCallbackHandler` on the same chain stands aside for these calls.

    Example:
        >>> from langchain_core.prompts import ChatPromptTemplate
        >>> from tb_plugins import BudgetGuard
        >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
        >>> guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": [],
        ...     "downgrade": {"gpt-4o": "gpt-4o-mini"},
        ...     "budgets": [{"scope": "team:a", "tokens": 100, "window": "day",
        ...                  "downgrade_at": 0.01}]})
        >>> big, small = FakeChatModel(model="gpt-4o"), FakeChatModel(model="gpt-4o-mini")
        >>> chain = ChatPromptTemplate.from_template("Say {x}") | with_budget_downgrade(
        ...     big.bind(max_tokens=20), small, guard, scopes=["team:a"])
        >>> [chain.invoke({"x": "hi"}).response_metadata["model_name"] for _ in range(2)]
        ['gpt-4o', 'gpt-4o-mini']
    """
    return BudgetDowngrade(model, cheaper_model, guard, scopes)
