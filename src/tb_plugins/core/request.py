"""One model call as every integration describes it to the guard.

The LangChain handler and middleware, the LiteLLM logger and the proxy each read their
framework's objects once into a :class:`Request`; the engine estimates, plans and decides
from it, so no layer passes nine loose arguments around.

Example:
    >>> r = Request("gpt-4o", [{"role": "user", "content": "hi"}], max_tokens=100,
    ...             scopes=("team:search",))
    >>> r.max_tokens, r.scopes
    (100, ('team:search',))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Request"]


@dataclass(frozen=True)
class Request:
    """A call to decide.

    Attributes:
        model: the model the caller asks for.
        messages: OpenAI-style chat messages (dicts with role and content).
        max_tokens: the request's output cap, if any.
        scopes: who is charged besides ``global``, e.g. ``("team:search", "user:alice")``.
        tools: tool definitions sent with the request (they cost input tokens).
        prompt: plain text input instead of messages (completions, embeddings).
        input_tokens: a known input count; nothing is counted (no tokenizer is loaded).
        reservation_id: an id for the hold (default: a new time-ordered UUID).
        adjust: False when the caller cannot change the request (a callback that only
            observes): the answer is then ``allow`` or a refusal, never clamp/downgrade.
        trimmable: True when the caller can send fewer ``messages`` than it asked with: under
            ``request: {on_too_long: trim}`` an over-long conversation is then cut to fit
            (:attr:`Decision.kept_messages <tb_plugins.engine.decision.Decision.kept_messages>`
            says which to send) instead of refused.
        priority: ``low``, ``normal``, ``high`` or ``critical``: how much of a budget with
            ``stop_at`` fractions the call may use. Set it from the trusted side only (the
            app, run metadata, the proxy key's metadata), never from a client's request.
    """

    model: str
    messages: Sequence[Mapping[str, Any]] | None = None
    max_tokens: int | None = None
    scopes: Sequence[str] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    prompt: str | Sequence[str] | None = None
    input_tokens: int | None = None
    reservation_id: str | None = None
    adjust: bool = True
    priority: str = "normal"
    trimmable: bool = False
