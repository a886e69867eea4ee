"""Trimming an over-long conversation to fit ``request.max_input_tokens`` (``request:
{on_too_long: trim}``).

The conversation is cut into *units* that are kept or dropped whole: an assistant message
with tool calls together with the tool results that answer them (OpenAI ``tool_calls`` /
``role: tool``, or Anthropic ``tool_use`` / ``tool_result`` blocks), and every other message on
its own. Every system message, the latest user message and the newest unit are pinned; the
other units are dropped oldest first, as few as make the conversation fit, and the cut is made
so that the first message after the system messages is a user message (providers such as
Anthropic refuse a conversation that opens with the assistant). A tool result is never left
without its call, nor a call without its results.

Pure code: the caller passes the function that counts a candidate conversation.

Example:
    >>> msgs = [{"role": "system", "content": "be brief"},
    ...         {"role": "user", "content": "a " * 50}, {"role": "assistant", "content": "b " * 50},
    ...         {"role": "user", "content": "hi"}]
    >>> def count(ms):
    ...     return sum(len(str(m["content"]).split()) for m in ms)
    >>> trim_messages(msgs, 10, count)
    (0, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["tool_units", "trim_messages"]

Message = Mapping[str, Any]


def _blocks(message: Message, kind: str) -> list[Mapping[str, Any]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, Mapping) and b.get("type") == kind]


def _call_ids(message: Message) -> set[str]:
    """Ids of the tool calls an assistant message makes."""
    if message.get("role") != "assistant":
        return set()
    ids = set()
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        ids |= {c["id"] for c in calls if isinstance(c, Mapping) and isinstance(c.get("id"), str)}
    ids |= {b["id"] for b in _blocks(message, "tool_use") if isinstance(b.get("id"), str)}
    return ids


def _answered_ids(message: Message) -> set[str]:
    """Ids of the tool calls a message answers (a tool message, or tool_result blocks)."""
    ids = set()
    if message.get("role") == "tool" and isinstance(message.get("tool_call_id"), str):
        ids.add(message["tool_call_id"])
    for b in _blocks(message, "tool_result"):
        if isinstance(b.get("tool_use_id"), str):
            ids.add(b["tool_use_id"])
    return ids


def _is_system(message: Message) -> bool:
    return message.get("role") in ("system", "developer")


def _is_user_turn(message: Message) -> bool:
    """A user message that says something (not only tool results)."""
    if message.get("role") != "user":
        return False
    content = message.get("content")
    return not isinstance(content, list) or any(
        not (isinstance(b, Mapping) and b.get("type") == "tool_result") for b in content
    )


def tool_units(messages: Sequence[Message]) -> list[list[int]]:
    """The conversation cut into units kept or dropped whole, in order of their first
    message: an assistant tool call with every message answering it, each other message
    alone.

    Example:
        >>> tool_units([{"role": "user", "content": "x"},
        ...             {"role": "assistant", "tool_calls": [{"id": "c1"}]},
        ...             {"role": "tool", "tool_call_id": "c1", "content": "42"}])
        [[0], [1, 2]]
    """
    owner: dict[str, int] = {}  # tool call id -> index of its unit
    units: list[list[int]] = []
    for i, m in enumerate(messages):
        answered = [owner[t] for t in _answered_ids(m) if t in owner]
        if answered:
            target = min(answered)
            for other in sorted(set(answered) - {target}, reverse=True):  # one result, two calls
                units[target].extend(units[other])
                units[other] = []
            units[target].append(i)
        else:
            target = len(units)
            units.append([i])
        for t in _call_ids(m):
            owner[t] = target
    return [sorted(u) for u in units if u]


def trim_messages(
    messages: Sequence[Message], limit: int, count: Callable[[Sequence[Message]], int]
) -> tuple[int, ...] | None:
    """The indices of the messages to keep so that ``count(kept) <= limit``, dropping the
    oldest units first and as few as needed; None when even the pinned messages (every system
    message, the latest user message, the newest unit, with the units they belong to) do not
    fit.

    ``count`` must not grow when messages are removed (a token count does not); it is called
    O(log n) times.
    """
    units = tool_units(messages)
    if not units:
        return None
    users = [i for i, m in enumerate(messages) if _is_user_turn(m)]
    last_user = users[-1] if users else None
    pinned_at = {len(units) - 1}
    for n, unit in enumerate(units):
        if any(_is_system(messages[i]) for i in unit) or last_user in unit:
            pinned_at.add(n)
    droppable = [n for n in range(len(units)) if n not in pinned_at]
    opens = [n for n in sorted(pinned_at) if not _is_system(messages[units[n][0]])]

    def opens_with_user(k: int) -> bool:  # the first unit kept after the system messages
        first = min([*droppable[k : k + 1], *opens[:1]], default=None)
        return first is None or _is_user_turn(messages[units[first][0]])

    cuts = [k for k in range(len(droppable) + 1) if k == 0 or opens_with_user(k)]
    if last_user is None or len(cuts) == 1:  # no user turn to open with: any cut will do
        cuts = list(range(len(droppable) + 1))

    def kept(k: int) -> tuple[int, ...]:  # drop the k oldest droppable units
        gone = set(droppable[:k])
        return tuple(sorted(i for n, u in enumerate(units) if n not in gone for i in u))

    def fits(k: int) -> bool:
        ids = kept(k)
        return count([messages[i] for i in ids]) <= limit

    lo, hi = 0, len(cuts) - 1
    if not fits(cuts[hi]):
        return None
    while lo < hi:  # the fewest units dropped that fit
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return kept(cuts[lo])
