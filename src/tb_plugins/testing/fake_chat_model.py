"""A local LangChain chat model that reports exact usage: for tests, notebooks and ``tb demo``.

:class:`FakeChatModel` never touches the network. It counts its calls, answers from a script
(a list of replies, or a function of the conversation), supports ``bind_tools`` and scripted
tool calls, streams word by word, honours ``max_tokens`` (the reply is cut to fit), and reports
``usage_metadata`` the way a provider would: input tokens are the tiktoken count of the prompt
(with OpenAI's chat-format overhead, tools included, exactly as :func:`tb_plugins.count_tokens`
counts it), output tokens the count of the reply it produced.

Example:
    >>> from tb_plugins.testing.fake_chat_model import FakeChatModel
    >>> model = FakeChatModel(model="gpt-4o-mini", responses=["Hi there!"])
    >>> msg = model.invoke("Hello")
    >>> msg.content, msg.usage_metadata["input_tokens"], msg.usage_metadata["output_tokens"]
    ('Hi there!', 8, 3)
    >>> model.call_count
    1
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_openai_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from tb_plugins.counting import default_counter

__all__ = ["FakeCall", "FakeChatModel", "Script"]

Script = Sequence[str | AIMessage | dict[str, Any] | BaseException] | Callable[..., Any]
"""What the model answers: a list (one entry per call, then ``reply`` forever) or a function
``fn(messages) -> str | AIMessage | dict`` called with the conversation (``BaseMessage`` list).
A dict is ``{"content": ..., "tool_calls": [{"name": ..., "args": {...}}]}``; an exception
entry is raised (after the call is counted), to script failures."""


@dataclass(frozen=True)
class FakeCall:
    """One call the model received."""

    index: int
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> int | None:
        """The ``max_tokens`` the call was made with, if any."""
        value = self.kwargs.get("max_tokens")
        return value if isinstance(value, int) else None


class FakeChatModel(BaseChatModel):
    """A scripted chat model with exact, provider-style usage. No network, no key.

    Args:
        model: the model name it claims to be (``model_name``); the budget guard prices and
            tokenizes by it, so ``gpt-4o``/``gpt-4o-mini`` give exact, priced estimates.
        reply: the answer once ``responses`` is used up (or when there is none).
        responses: a :data:`Script`.
        max_tokens: default output cap; a ``max_tokens`` bound at call time wins.
        usage: report ``usage_metadata`` at all.
        stream_usage: when streaming, put usage on the last chunk (False: no usage, like an
            OpenAI stream without ``stream_options.include_usage``).
        cached_input_tokens: reported as ``input_token_details.cache_read`` (capped at input).
        reasoning_tokens: reported as ``output_token_details.reasoning`` (added to output).
        record: how many recent calls to keep in :attr:`calls` (0: none).
        input_tokens: report this input count instead of tokenizing the prompt (for
            benchmarks, where the model's own counting would blur what is measured).

    Example:
        >>> m = FakeChatModel(model="gpt-4o", responses=[
        ...     {"tool_calls": [{"name": "search", "args": {"q": "x"}}]}, "done"])
        >>> m.invoke("go").tool_calls[0]["name"], m.invoke("go").content
        ('search', 'done')
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(default="gpt-4o-mini", alias="model")
    reply: str = "Hello from the fake model."
    responses: Any = None
    max_tokens: int | None = None
    usage: bool = True
    stream_usage: bool = True
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    record: int = 1000
    input_tokens: int | None = None

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _count: int = PrivateAttr(default=0)
    _calls: deque[FakeCall] = PrivateAttr(default_factory=deque)

    # -- what tests look at --------------------------------------------------------------------

    @property
    def call_count(self) -> int:
        """How many calls reached the model (refused calls never do)."""
        return self._count

    @property
    def calls(self) -> list[FakeCall]:
        """The most recent calls (up to ``record``), oldest first."""
        with self._lock:
            return list(self._calls)

    def reset(self) -> None:
        """Forget calls and restart the script."""
        with self._lock:
            self._count = 0
            self._calls.clear()

    # -- LangChain plumbing --------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "tb-fake-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="fake", ls_model_name=self.model_name, ls_model_type="chat"
        )
        cap = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(cap, int):
            params["ls_max_tokens"] = cap
        if stop:
            params["ls_stop"] = stop
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools in OpenAI format (as ``ChatOpenAI`` does); they count as input tokens."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = self._answer(messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(self._answer(messages, kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._answer(messages, kwargs)):
            yield chunk

    # -- the script ----------------------------------------------------------------------------

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        oai: list[dict[str, Any]] = []
        if self.record or self.input_tokens is None:
            converted = convert_to_openai_messages(messages)
            oai = converted if isinstance(converted, list) else [converted]
        with self._lock:
            index = self._count
            self._count += 1
            if self.record:
                self._calls.append(FakeCall(index, oai, dict(kwargs)))
                while len(self._calls) > self.record:
                    self._calls.popleft()
        scripted = self._scripted(messages, index)
        if isinstance(scripted, BaseException):
            raise scripted
        content, tool_calls = _parts(scripted, index)
        counter = default_counter()
        cap = kwargs.get("max_tokens", self.max_tokens)
        finish = "tool_calls" if tool_calls else "stop"
        if isinstance(cap, int) and not tool_calls:
            cut = _truncate(self.model_name, content, cap)
            if cut != content:
                content, finish = cut, "length"
        tools = kwargs.get("tools")
        input_tokens = (
            self.input_tokens
            if self.input_tokens is not None
            else counter.count_messages(self.model_name, oai, tools or None)
        )
        output_tokens = counter.count_text(self.model_name, content) if content else 0
        for tc in tool_calls:
            output_tokens += counter.count_text(
                self.model_name, tc["name"] + json.dumps(tc["args"])
            )
        output_tokens += self.reasoning_tokens
        usage: UsageMetadata | None = None
        if self.usage:
            usage = UsageMetadata(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                total_tokens=input_tokens + output_tokens,
            )
            if self.cached_input_tokens:
                usage["input_token_details"] = {
                    "cache_read": min(self.cached_input_tokens, input_tokens)
                }
            if self.reasoning_tokens:
                usage["output_token_details"] = {"reasoning": self.reasoning_tokens}
        return AIMessage(
            content=content,
            tool_calls=tool_calls,
            usage_metadata=usage,
            response_metadata={"model_name": self.model_name, "finish_reason": finish},
        )

    def _scripted(self, messages: list[BaseMessage], index: int) -> Any:
        script = self.responses
        if script is None:
            return self.reply
        if callable(script):
            return script(messages)
        if index < len(script):
            return script[index]
        return self.reply

    def _chunks(self, message: AIMessage) -> Iterator[ChatGenerationChunk]:
        words = message.text.split(" ") if message.text else []
        meta = dict(message.response_metadata)
        for i, word in enumerate(words):
            yield ChatGenerationChunk(
                message=AIMessageChunk(content=word if i == 0 else " " + word)
            )
        last = AIMessageChunk(
            content="",
            tool_call_chunks=[
                {"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": n}
                for n, tc in enumerate(message.tool_calls)
            ],
            response_metadata=meta,
        )
        if self.stream_usage and message.usage_metadata is not None:
            last.usage_metadata = message.usage_metadata
        yield ChatGenerationChunk(message=last)


def _parts(scripted: Any, index: int) -> tuple[str, list[Any]]:
    if isinstance(scripted, AIMessage):
        calls = [
            {**tc, "id": tc.get("id") or f"call_{index}_{n}"}
            for n, tc in enumerate(scripted.tool_calls)
        ]
        return scripted.text, calls
    if isinstance(scripted, dict):
        calls = [
            {
                "name": tc["name"],
                "args": dict(tc.get("args", {})),
                "id": tc.get("id") or f"call_{index}_{n}",
                "type": "tool_call",
            }
            for n, tc in enumerate(scripted.get("tool_calls", ()))
        ]
        return str(scripted.get("content", "")), calls
    return str(scripted), []


def _truncate(model: str, text: str, cap: int) -> str:
    """The longest whole-word prefix of ``text`` that fits in ``cap`` tokens."""
    counter = default_counter()
    if counter.count_text(model, text) <= cap:
        return text
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:  # largest n with count(words[:n]) <= cap
        mid = (lo + hi + 1) // 2
        if counter.count_text(model, " ".join(words[:mid])) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])
