"""The counts a :class:`~tb_plugins.counting.TokenCounter` keeps, so a resent history is cheap.

An agent loop resends its whole history plus a few new messages before every model call.
Two layers keep it from encoding the old part again:

* a bounded LRU map from content to count, for single messages and for tool lists, so a
  message seen before costs one dictionary lookup (:class:`LRUCache`; the key of a message
  is made by :func:`message_key`);
* the most recent histories (up to 64, keyed by their first message, copied so later
  in-place edits are noticed) with their running counts, so a resent history is matched
  with one C-level ``==`` per message and only what follows is looked up
  (:class:`HistoryMemo`).

:class:`CountCache` puts the two together. Everything here is thread-safe.

Example:
    >>> cache = CountCache(16)
    >>> history = [{"role": "user", "content": "hi"}]
    >>> cache.count_history("demo", history, lambda message: 5)
    5
    >>> cache.uncounted("demo", [*history, {"role": "assistant", "content": "hello"}])
    [{'role': 'assistant', 'content': 'hello'}]
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from tb_plugins.counting._fast import Unhashable, copy_json, freeze

__all__ = ["CountCache", "HistoryMemo", "LRUCache", "message_key", "stable_key"]


class LRUCache:
    """A bounded, thread-safe LRU map from a stable key to a token count."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._data: OrderedDict[Hashable, int] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[Hashable | None]) -> list[int | None]:
        """The count under each key (None: not cached, or the key is None)."""
        if self._maxsize <= 0:
            return [None] * len(keys)
        found: list[int | None] = []
        get = self._data.get
        touch = self._data.move_to_end
        append = found.append
        with self._lock:
            for key in keys:
                value = None if key is None else get(key)
                if value is not None:
                    touch(key)
                append(value)
        return found

    def put_many(self, items: Iterable[tuple[Hashable, int]]) -> None:
        """Store counts, dropping the least recently used past the size."""
        if self._maxsize <= 0:
            return
        data = self._data
        with self._lock:
            for key, value in items:
                data[key] = value
                data.move_to_end(key)
            while len(data) > self._maxsize:
                data.popitem(last=False)

    def clear(self) -> None:
        """Forget every count."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def stable_key(value: object) -> str | None:
    """The sorted JSON of a value, or None if it has none."""
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        return None


def message_key(namespace: str, message: object, index: int) -> Hashable | None:
    """Validate one message and return its cache key (None: count it uncached).

    Raises:
        ValueError: ``message`` is not a mapping with a string ``role``; the message names
            ``index``.
    """
    if type(message) is not dict and not isinstance(message, Mapping):
        raise ValueError(
            f"messages[{index}] is not a chat message: expected a mapping with a "
            f"'role', got {type(message).__name__}"
        )
    role = message.get("role")
    if not isinstance(role, str):
        problem = "has no 'role'" if role is None else f"has a non-string role {role!r}"
        raise ValueError(f"messages[{index}] is not a chat message: it {problem}")
    items = tuple(message.items())
    for _, value in items:
        if value is not None and type(value) is not str:
            try:
                return (
                    namespace,
                    tuple([(k, v if type(v) is str else freeze(v)) for k, v in items]),
                )
            except (Unhashable, RecursionError):
                stable = stable_key(message)
                return None if stable is None else (namespace, stable)
    return (namespace, items)


class _History:
    """A private snapshot of a history and the running token count after each message."""

    __slots__ = ("cumulative", "messages")

    def __init__(self, messages: list[dict[Any, Any]], cumulative: list[int]) -> None:
        self.messages = messages
        self.cumulative = cumulative  # cumulative[i] = tokens of messages[:i]

    def common_prefix(self, messages: list[Any]) -> int:
        n = min(len(self.messages), len(messages))
        try:
            # One C-level comparison covers the usual case: the old history, unchanged.
            # (Values equal under == but rendered differently, like 1 and 1.0, pass as
            # the same message: a one-token error at most, for odd content only.)
            if messages[:n] == self.messages[:n]:
                return n
            i = 0
            while i < n and messages[i] == self.messages[i]:
                i += 1
            return i
        except Exception:  # == on exotic content (e.g. arrays) may raise: no fast path
            return 0


def _snapshot(message: Mapping[Any, Any]) -> dict[Any, Any]:
    for value in message.values():
        if value is not None and type(value) is not str:
            # Nested lists and dicts can be mutated in place by the caller later.
            return {k: copy_json(v) for k, v in message.items()}
    return dict(message)


class HistoryMemo:
    """The most recent histories, keyed by their first message, for agent loops.

    A loop resends its history plus a few new messages; comparing the old part with one
    ``==`` per message (in C) is far cheaper than building a cache key for each.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._data: OrderedDict[Hashable, _History] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> _History | None:
        """The history remembered under ``key``, if any."""
        with self._lock:
            history = self._data.get(key)
            if history is not None:
                self._data.move_to_end(key)
            return history

    def remember(
        self,
        key: Hashable,
        base: _History | None,
        prefix: int,
        new_messages: Sequence[Mapping[Any, Any]],
        new_counts: Sequence[int],
    ) -> None:
        """Remember ``base``'s first ``prefix`` messages followed by ``new_messages``."""
        try:
            snapshots = [_snapshot(m) for m in new_messages]
        except Exception:  # content deepcopy cannot copy: just skip the fast path
            return
        cumulative = base.cumulative[: prefix + 1] if base is not None else [0]
        running = cumulative[-1]
        for count in new_counts:
            running += count
            cumulative.append(running)
        messages = base.messages[:prefix] if base is not None else []
        history = _History(messages + snapshots, cumulative)
        with self._lock:
            self._data[key] = history
            self._data.move_to_end(key)
            while len(self._data) > self._slots:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget every history."""
        with self._lock:
            self._data.clear()


class _Unseen(NamedTuple):
    memo_key: Hashable | None
    base: _History | None
    prefix: int
    messages: list[Mapping[str, Any]]
    keys: list[Hashable | None]
    hits: list[int | None]


class CountCache:
    """Message and tool-list counts (LRU) and recent histories, for one counter.

    Args:
        size: how many message and tool-list counts to keep; 0 keeps nothing (messages are
            still validated).
    """

    def __init__(self, size: int) -> None:
        self._counts = LRUCache(size)
        self._memo = HistoryMemo(min(size, 64)) if size else None

    @property
    def enabled(self) -> bool:
        """False when the cache keeps nothing (size 0)."""
        return self._memo is not None

    def clear(self) -> None:
        """Forget every count and history."""
        self._counts.clear()
        if self._memo is not None:
            self._memo.clear()

    def counted(self, key: Hashable | None, count: Callable[[], int]) -> int:
        """The count cached under ``key``, else ``count()``, cached unless ``key`` is None."""
        (hit,) = self._counts.get_many([key])
        if hit is None:
            hit = count()
            if key is not None:
                self._counts.put_many([(key, hit)])
        return hit

    def count_history(
        self,
        namespace: str,
        messages: Sequence[Mapping[str, Any]],
        count: Callable[[Mapping[str, Any]], int],
    ) -> int:
        """The sum of ``count(message)`` over a non-empty history, counting only what is new.

        ``namespace`` (the encoding's name) keeps counts of different encodings apart.

        Raises:
            ValueError: a message is not a mapping with a string ``role``.
        """
        memo_key, base, prefix, rest, keys, hits = self._unseen(namespace, messages)
        counts: list[int] = []
        fresh: list[tuple[Hashable, int]] = []
        for message, key, hit in zip(rest, keys, hits, strict=True):
            if hit is None:
                hit = count(message)
                if key is not None:
                    fresh.append((key, hit))
            counts.append(hit)
        if fresh:
            self._counts.put_many(fresh)
        if memo_key is not None and self._memo is not None and rest:
            self._memo.remember(memo_key, base, prefix, rest, counts)
        return (base.cumulative[prefix] if base is not None else 0) + sum(counts)

    def uncounted(
        self, namespace: str, messages: Sequence[Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """The messages of a non-empty history that :meth:`count_history` would count."""
        unseen = self._unseen(namespace, messages)
        return [m for m, hit in zip(unseen.messages, unseen.hits, strict=True) if hit is None]

    def _unseen(self, namespace: str, messages: Sequence[Mapping[str, Any]]) -> _Unseen:
        """The part of a history a count must still look up: after the prefix a remembered
        history already counted, with each message's cache key and cached count."""
        first = message_key(namespace, messages[0], 0)
        memo_key = first if self._memo is not None and type(messages) is list else None
        base: _History | None = None
        prefix = 0
        if memo_key is not None and self._memo is not None:
            base = self._memo.get(memo_key)
            if base is not None:
                prefix = base.common_prefix(messages)  # type: ignore[arg-type]
        rest = list(itertools.islice(messages, prefix, None))
        keys = [
            first if i == 0 else message_key(namespace, m, i)
            for i, m in enumerate(rest, start=prefix)
        ]
        return _Unseen(memo_key, base, prefix, rest, keys, self._counts.get_many(keys))
