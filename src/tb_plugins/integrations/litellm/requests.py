"""A LiteLLM request as the guard sees it (model, messages or prompt, tools, output cap),
the usage LiteLLM reports, and the decision applied back to the request. Shared by the SDK
logger and the proxy."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tb_plugins.core.request import Request
from tb_plugins.core.usage import Usage, check_count
from tb_plugins.engine import Decision

logger = logging.getLogger("tb_plugins")

# A status the Router neither retries nor cools a deployment down for (it does both for 429
# and for errors without a status): a budget refusal is about the caller, not the deployment.
NO_RETRY_STATUS = 400
_APIS = frozenset({"completion", "text_completion", "embedding", "responses", "anthropic_messages"})
_CHAT_CAPS = ("max_completion_tokens", "max_tokens")


@dataclass(frozen=True)
class RequestView:
    """What the guard needs from one LiteLLM request, whatever its API.

    Attributes:
        api: ``completion``, ``text_completion``, ``embedding``, ``responses`` or
            ``anthropic_messages``.
        model: the model the request names.
        messages: chat messages (Responses ``input`` and Anthropic ``system`` folded in).
        prompt: plain text input (embeddings, text completions).
        input_tokens: a known input size (embeddings given as token ids).
        tools: tool definitions, counted as input.
        max_tokens: the output cap the request sets, if any (for a chat request that sets
            both ``max_tokens`` and ``max_completion_tokens``, the larger).
        max_tokens_key: where that cap lives in the request (None: no output, e.g. embeddings).
    """

    api: str
    model: str | None
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | None = None
    input_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    max_tokens_key: str | None = None

    @property
    def output_cap(self) -> int | None:
        """The ``max_tokens`` to check with (0 for calls without output)."""
        return 0 if self.max_tokens_key is None else self.max_tokens

    def request(
        self,
        scopes: Sequence[str],
        *,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        adjust: bool = True,
        priority: str = "normal",
    ) -> Request:
        """The :class:`~tb_plugins.core.request.Request` the guard decides (``model`` and
        ``messages`` replace the request's own when given; ``priority`` comes from the
        caller's trusted side, never from the request body)."""
        return Request(
            model=model or self.model or "",
            messages=self.messages if messages is None else messages,
            max_tokens=self.output_cap,
            scopes=tuple(scopes),
            tools=self.tools,
            prompt=self.prompt,
            input_tokens=self.input_tokens,
            adjust=adjust,
            priority=priority,
        )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cap(data: Mapping[str, Any], key: str) -> int | None:
    """The output cap ``data[key]`` (None when absent or null), checked: a cap the guard
    cannot trust must stop the request, never let it through unbudgeted."""
    value = data.get(key)
    return None if value is None else check_count(key, value)


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return []
    out = []
    for m in messages:
        if isinstance(m, Mapping) and isinstance(m.get("role"), str):
            out.append(dict(m))
        else:  # an object message or a Responses item without a role: count its JSON
            out.append({"role": "user", "content": json.dumps(m, default=str)})
    return out


def request_view(call_type: str | None, data: Mapping[str, Any]) -> RequestView | None:
    """Read a LiteLLM request (SDK kwargs or proxy body) for the guard.

    Returns None for calls that are not budgeted (images, audio, files, ...).

    Raises:
        TypeError: an output cap (``max_tokens``, ``max_completion_tokens``,
            ``max_output_tokens``) is not a whole number (text, ``1.5``, NaN, a boolean).
        ValueError: an output cap is negative or above
            :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`.

    Example:
        >>> v = request_view("acompletion", {"model": "gpt-4o", "max_tokens": 5,
        ...                                  "messages": [{"role": "user", "content": "hi"}]})
        >>> v.model, v.max_tokens, v.max_tokens_key
        ('gpt-4o', 5, 'max_tokens')
    """
    name = str(getattr(call_type, "value", call_type) or "")
    kind = name[1:] if name.startswith("a") and name[1:] in _APIS else name
    model = data.get("model")
    model = model if isinstance(model, str) else None
    tools = data.get("tools") if isinstance(data.get("tools"), list) else None
    if kind == "completion":
        key = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
        caps = [c for c in (_cap(data, k) for k in _CHAT_CAPS) if c is not None]
        return RequestView(
            kind,
            model,
            chat_messages(data.get("messages")),
            tools=tools,
            max_tokens=max(caps) if caps else None,
            max_tokens_key=key,
        )
    if kind == "anthropic_messages":
        msgs = chat_messages(data.get("messages"))
        system = data.get("system")
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return RequestView(
            kind,
            model,
            msgs,
            tools=tools,
            max_tokens=_cap(data, "max_tokens"),
            max_tokens_key="max_tokens",
        )
    if kind == "responses":
        inp = data.get("input")
        msgs = [{"role": "user", "content": inp}] if isinstance(inp, str) else chat_messages(inp)
        if data.get("instructions"):
            msgs.insert(0, {"role": "system", "content": data["instructions"]})
        return RequestView(
            kind,
            model,
            msgs,
            tools=tools,
            max_tokens=_cap(data, "max_output_tokens"),
            max_tokens_key="max_output_tokens",
        )
    if kind == "embedding":
        inp = data.get("input")
        if isinstance(inp, str):
            return RequestView(kind, model, prompt=inp)
        if isinstance(inp, list) and inp and all(_int(x) is not None for x in inp):
            return RequestView(kind, model, input_tokens=len(inp))
        if isinstance(inp, list) and all(isinstance(x, list) for x in inp):
            return RequestView(kind, model, input_tokens=sum(len(x) for x in inp))
        if isinstance(inp, list):
            return RequestView(kind, model, prompt=[str(x) for x in inp])
        return RequestView(kind, model, input_tokens=0)
    if kind == "text_completion":
        prompt = data.get("prompt")
        text: str | list[str] = (
            prompt if isinstance(prompt, str) else [str(p) for p in prompt or []]
        )
        return RequestView(
            kind,
            model,
            prompt=text,
            max_tokens=_cap(data, "max_tokens"),
            max_tokens_key="max_tokens",
        )
    return None


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _count(value: Any) -> int:
    """One reported count made safe to charge (see :meth:`Usage.reported`)."""
    return Usage.reported(value, 0).input_tokens


def usage_of(response: Any, kwargs: Mapping[str, Any] | None = None) -> Usage | None:
    """The usage a LiteLLM response reports (chat, stream, Responses, Anthropic, embeddings).

    Falls back to the ``standard_logging_object`` LiteLLM passes to success callbacks;
    None when neither reports an input count (the caller then charges the estimate). The
    counts go through :meth:`Usage.reported`: odd ones (negative, fractional, text, null,
    beyond :data:`~tb_plugins.core.usage.MAX_CALL_TOKENS`) are charged as it reads them,
    never raising.

    Example:
        >>> u = usage_of({"usage": {"prompt_tokens": 12, "completion_tokens": -3}})
        >>> u.input_tokens, u.output_tokens
        (12, 0)
    """
    u = _get(response, "usage")
    if u is None and kwargs is not None:
        u = _get(kwargs.get("async_complete_streaming_response"), "usage")
    if u is not None:
        inp = _get(u, "prompt_tokens", "input_tokens")
        if inp is not None:
            if _get(u, "prompt_tokens") is None:  # Anthropic counts cache reads apart
                inp = (
                    _count(inp)
                    + _count(_get(u, "cache_read_input_tokens"))
                    + _count(_get(u, "cache_creation_input_tokens"))
                )
            inp_d = _get(u, "prompt_tokens_details", "input_tokens_details")
            out_d = _get(u, "completion_tokens_details", "output_tokens_details")
            return Usage.reported(
                inp,
                _get(u, "completion_tokens", "output_tokens"),
                _get(inp_d, "cached_tokens"),
                _get(out_d, "reasoning_tokens"),
            )
    slo = (kwargs or {}).get("standard_logging_object")
    if isinstance(slo, Mapping) and slo.get("prompt_tokens") is not None:
        return Usage.reported(slo["prompt_tokens"], slo.get("completion_tokens"))
    return None


def reported_usage(response: Any, kwargs: Mapping[str, Any], decision: Decision) -> Usage | None:
    """:func:`usage_of`, or None (charge the estimate) if reading it fails: a call that was
    served is never charged nothing."""
    try:
        return usage_of(response, kwargs)
    except Exception:
        logger.exception("tb_plugins: reading the usage of %s failed", decision.reservation_id)
        return None


def scopes_from(metadata: Any) -> list[str]:
    if not isinstance(metadata, Mapping):
        return []
    raw = metadata.get("tb_scopes")
    if isinstance(raw, str):
        raw = raw.split(",")
    return [s.strip() for s in raw or () if isinstance(s, str) and s.strip()]


@functools.lru_cache(maxsize=1024)
def _reports_stream_usage(model: str, provider: str | None) -> bool:
    """Whether LiteLLM passes ``stream_options`` to this model's provider."""
    import litellm

    try:
        _, prov, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=provider)
        params = litellm.get_supported_openai_params(model=model, custom_llm_provider=prov)
    except Exception:
        return False
    return "stream_options" in (params or ())


def ask_stream_usage(kwargs: dict[str, Any]) -> None:
    """Ask a streamed chat call for its usage (``stream_options.include_usage``), where the
    provider takes that option; elsewhere LiteLLM assembles the usage itself."""
    model, provider = kwargs.get("model"), kwargs.get("custom_llm_provider")
    if not kwargs.get("stream") or not isinstance(model, str):
        return
    if not _reports_stream_usage(model, provider if isinstance(provider, str) else None):
        return
    opts = kwargs.get("stream_options")
    kwargs["stream_options"] = {
        **(opts if isinstance(opts, Mapping) else {}),
        "include_usage": True,
    }


def apply_decision(data: dict[str, Any], view: RequestView, decision: Decision) -> None:
    """Write a decision's ``max_tokens`` into a request, under the request's own key (and
    lower a chat request's other cap, ``max_tokens`` or ``max_completion_tokens``, if it
    asks for more, so no cap the provider may read is above the decision)."""
    key = view.max_tokens_key
    cap = decision.max_tokens
    if key is None or cap is None:
        return
    if cap != view.max_tokens:
        data[key] = cap
    if view.api == "completion":
        for other in _CHAT_CAPS:
            value = _int(data.get(other))
            if other != key and value is not None and value > cap:
                data[other] = cap
