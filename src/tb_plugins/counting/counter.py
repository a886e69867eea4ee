"""The token counter: the chat-format rules, the model's encoding and the cache, put together.

:class:`TokenCounter` is the default :class:`Tokenizer` (the protocol a budget guard counts
with). For one request it picks how the model is counted
(:mod:`~tb_plugins.counting.families`), sums the messages by the chat-format rules
(:mod:`~tb_plugins.counting.messages`), encoding only the messages its cache has not seen
(:mod:`~tb_plugins.counting.cache`), adds the tool definitions and the reply priming, and
multiplies an approximate count by its margin.

Example:
    >>> count_tokens("gpt-4o", [{"role": "user", "content": "Hello!"}])
    9
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tb_plugins.counting import encoders
from tb_plugins.counting.bound import BYTE_BOUND, scaled
from tb_plugins.counting.cache import CountCache, stable_key
from tb_plugins.counting.families import ToolRules, family, openai_encoding
from tb_plugins.counting.messages import (
    REPLY_PRIMING_TOKENS,
    check_sequence,
    count_message,
    count_tools,
    render,
    text_size,
)

__all__ = ["OFFLOAD_CHARS", "TokenCounter", "Tokenizer", "count_tokens", "default_counter"]

OFFLOAD_CHARS = 16_384
"""Text not yet counted from which :meth:`TokenCounter.aprepare` encodes in a thread."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the budget guard needs from a tokenizer: the extension point for your own.

    A tokenizer may also define ``async aprepare(model, messages, tools)``; the guard's
    ``acheck`` awaits it before counting (see :meth:`TokenCounter.aprepare`).

    Example:
        >>> class Words:
        ...     def count_messages(self, model, messages, tools=None):
        ...         return sum(len(str(m.get("content", "")).split()) for m in messages)
        ...     def count_text(self, model, text):
        ...         return len(text.split())
        ...     def is_exact(self, model):
        ...         return False
        >>> isinstance(Words(), Tokenizer)
        True
    """

    def count_messages(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Return the prompt tokens of a chat request (messages, tools and reply priming)."""
        ...

    def count_text(self, model: str, text: str) -> int:
        """Return the tokens of plain text (a completion prompt or an embeddings input)."""
        ...

    def is_exact(self, model: str) -> bool:
        """Return True if counts for ``model`` are exact, False if approximate."""
        ...


class _Plan(NamedTuple):
    encoder: encoders.Encoder
    tool_rules: ToolRules
    exact: bool


class TokenCounter:
    """The default :class:`Tokenizer`: exact for OpenAI models, a safe margin elsewhere.

    Counts of single messages and of tool lists are kept in a bounded LRU cache keyed by
    content, so an agent loop that resends a growing history encodes only the messages it
    has not seen, and the most recent histories are remembered so a resent one is matched
    with one C-level ``==`` per message (see :mod:`~tb_plugins.counting.cache`). The counter
    is thread-safe and meant to be shared (see :func:`default_counter`).

    Args:
        cache_size: How many message and tool-list counts to keep; 0 disables all
            caching.
        approximation_margin: Factor applied to cl100k_base counts for models without an
            exact tokenizer (must be positive; values below 1 undercount).
        offload_chars: In async code (:meth:`aprepare`), message text not counted before
            is encoded in a worker thread once it is this long (tiktoken releases the GIL
            while it encodes, so the event loop serves other requests meanwhile); None
            never does.

    Example:
        >>> counter = TokenCounter()
        >>> counter.count_messages("gpt-4o", [{"role": "user", "content": "Hello!"}])
        9
        >>> counter.is_exact("gpt-4o"), counter.is_exact("claude-sonnet-4-5")
        (True, False)
        >>> counter.encoding_name("azure/gpt-4-turbo")
        'cl100k_base'
    """

    def __init__(
        self,
        *,
        cache_size: int = 8192,
        approximation_margin: float = 1.2,
        offload_chars: int | None = OFFLOAD_CHARS,
    ) -> None:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        bad_offload = isinstance(offload_chars, bool) or not isinstance(offload_chars, int)
        if offload_chars is not None and (bad_offload or offload_chars < 0):
            raise ValueError(f"offload_chars must be an int >= 0 or None, got {offload_chars!r}")
        self.offload_chars = offload_chars
        if not isinstance(approximation_margin, (int, float)) or not (
            0 < approximation_margin < math.inf
        ):
            raise ValueError(
                f"approximation_margin must be a positive number, got {approximation_margin!r}"
            )
        self._cache = CountCache(cache_size)
        self._margin = float(approximation_margin)
        self._plans: dict[str, _Plan] = {}

    @property
    def approximation_margin(self) -> float:
        """The factor applied to approximate counts."""
        return self._margin

    def clear_cache(self) -> None:
        """Forget every cached message and tool-list count.

        Example:
            >>> counter = TokenCounter()
            >>> counter.clear_cache()
        """
        self._cache.clear()

    def encoding_name(self, model: str) -> str | None:
        """Return the tiktoken encoding of an OpenAI model, or None for other models.

        Provider prefixes (``openai/``, ``azure/``, ``openrouter/openai/``) and fine-tune
        names (``ft:gpt-4o-mini:...``) are understood.

        Example:
            >>> TokenCounter().encoding_name("openrouter/openai/gpt-4.1-mini")
            'o200k_base'
            >>> TokenCounter().encoding_name("claude-sonnet-4-5") is None
            True
        """
        return openai_encoding(model)

    def is_exact(self, model: str) -> bool:
        """Return True if ``model`` is counted exactly with its own tiktoken encoding.

        Example:
            >>> TokenCounter().is_exact("gemini-2.5-pro")
            False
        """
        return self._plan(model).exact

    def count_text(self, model: str, text: str) -> int:
        """Return the tokens of plain text, with no chat-format overhead.

        Example:
            >>> TokenCounter().count_text("gpt-4o", "Hello world")
            2
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        plan = self._plan(model)
        return self._finish(plan, plan.encoder.count(text))

    def count_messages(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Return the prompt tokens of a chat request: messages, tools and reply priming.

        Args:
            model: The model name, with or without a provider prefix.
            messages: OpenAI-style chat messages (mappings with a ``role``).
            tools: OpenAI-style tool definitions, if the request has any.

        Raises:
            ValueError: If ``messages`` is not a sequence of messages; the message names the
                index of the first value that is not a mapping with a string ``role``.

        Example:
            >>> TokenCounter().count_messages(
            ...     "gpt-4o",
            ...     [{"role": "system", "content": "Be brief."},
            ...      {"role": "user", "name": "ada", "content": "Hi"}],
            ... )
            17
        """
        plan = self._plan(model)
        check_sequence(messages)
        total = REPLY_PRIMING_TOKENS
        if messages:
            encoder = plan.encoder
            total += self._cache.count_history(
                encoder.name, messages, lambda message: count_message(encoder, message)
            )
        if tools:
            total += self._count_tools(plan, tools)
        return self._finish(plan, total)

    def bound_messages(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """An upper bound of :meth:`count_messages` that encodes nothing and loads no
        tokenizer: the same rules with each text counted as its UTF-8 bytes (see
        :mod:`~tb_plugins.counting.bound`).

        Example:
            >>> counter = TokenCounter()
            >>> hi = [{"role": "user", "content": "Hello!"}]
            >>> counter.count_messages("gpt-4o", hi), counter.bound_messages("gpt-4o", hi)
            (9, 16)
        """
        check_sequence(messages)
        rules, factor = self._bound_plan(model)
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += count_message(BYTE_BOUND, message)
        if tools:
            if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
                total += BYTE_BOUND.count(render(tools))
            else:
                total += count_tools(BYTE_BOUND, rules, tools)
        return scaled(total, factor)

    def bound_text(self, model: str, text: str) -> int:
        """An upper bound of :meth:`count_text` that encodes nothing."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return scaled(BYTE_BOUND.count(text), self._bound_plan(model)[1])

    def _bound_plan(self, model: str) -> tuple[ToolRules, float]:
        """The tool constants of ``model`` and the factor its bound needs: 1 when its own
        tiktoken encoding is loaded (its count is then exact, with no margin), else the
        approximation margin if above 1."""
        plan = self._plans.get(model)
        if plan is not None:
            return plan.tool_rules, 1.0 if plan.exact else max(1.0, self._margin)
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        how = family(model)
        loaded = encoders.peek(how.encoding)
        exact = how.own_encoding and isinstance(loaded, encoders.TiktokenEncoder)
        return how.tool_rules, 1.0 if exact else max(1.0, self._margin)

    async def aprepare(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Get ready for ``count_messages(model, messages, tools)`` without blocking the loop.

        When the text this counter has not counted yet is at least ``offload_chars`` long
        (16,384 characters by default, about 4k tokens), it is counted now in the event
        loop's default executor, and the count that follows is a cache lookup. Shorter text
        is left for that count: encoding it costs less than the hop to a thread and back.
        Nothing is raised here; a malformed request fails in the count itself.

        Example:
            >>> import asyncio
            >>> counter = TokenCounter(offload_chars=0)
            >>> messages = [{"role": "user", "content": "Hello!"}]
            >>> asyncio.run(counter.aprepare("gpt-4o", messages))
            >>> counter.count_messages("gpt-4o", messages)
            9
        """
        limit = self.offload_chars
        if limit is None or not self._cache.enabled:
            return  # without a cache the count would run twice
        try:
            if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
                return  # not a history: the count says what is wrong with it
            if sum(text_size(message) for message in messages) < limit:
                return  # short in all: no need to look up what is cached
            plan = self._plan(model)
            if not isinstance(plan.encoder, encoders.TiktokenEncoder):
                return
            pending = self._uncounted_chars(plan.encoder, messages)
        except Exception:
            return
        if pending < limit:
            return
        import asyncio  # an event loop is running: already imported

        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(
                None, self.count_messages, model, messages, tools
            )

    def _uncounted_chars(
        self, encoder: encoders.Encoder, messages: Sequence[Mapping[str, Any]]
    ) -> int:
        """The text length of the messages a count would encode (not cached, not memoized)."""
        if not messages:
            return 0
        return sum(text_size(message) for message in self._cache.uncounted(encoder.name, messages))

    def _count_tools(self, plan: _Plan, tools: Sequence[Mapping[str, Any]]) -> int:
        encoder, rules = plan.encoder, plan.tool_rules
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            return encoder.count(render(tools))
        stable = stable_key(tools)
        key = None if stable is None else ("tools", encoder.name, rules, stable)
        return self._cache.counted(key, lambda: count_tools(encoder, rules, tools))

    def _finish(self, plan: _Plan, raw: int) -> int:
        if plan.exact:
            return raw
        # round() first: 100 * 1.1 is 110.00000000000001 in floating point.
        return math.ceil(round(raw * self._margin, 6))

    def _plan(self, model: str) -> _Plan:
        plan = self._plans.get(model)
        if plan is None:
            if not isinstance(model, str):
                raise TypeError(f"model must be a str, got {type(model).__name__}")
            how = family(model)
            encoder = encoders.load(how.encoding)
            exact = how.own_encoding and isinstance(encoder, encoders.TiktokenEncoder)
            plan = _Plan(encoder, how.tool_rules, exact)
            if len(self._plans) >= 1024:  # model names can come from clients: stay bounded
                self._plans.clear()
            self._plans[model] = plan
        return plan


_default_lock = threading.Lock()
_default: TokenCounter | None = None


def default_counter() -> TokenCounter:
    """Return the process-wide shared :class:`TokenCounter` (created on first use).

    Example:
        >>> default_counter() is default_counter()
        True
    """
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = TokenCounter()
    return _default


def count_tokens(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """Return the prompt tokens of a chat request, counted offline.

    Uses the shared :func:`default_counter`; see :mod:`tb_plugins.counting` for the rules.

    Example:
        >>> count_tokens("gpt-4o-mini", [{"role": "user", "content": "Hello!"}])
        9
    """
    return default_counter().count_messages(model, messages, tools)
