"""Reading LangChain objects for the budget guard: scopes, requests, usage, settlement.

Helpers that :mod:`tb_plugins.integrations.langchain` uses to turn run metadata into a scope
path, a LangChain request into the OpenAI-style messages/tools the guard counts, a model's
answer into :class:`~tb_plugins.core.usage.Usage`, and a finished or failed call into a
settlement or a release.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain.agents.middleware import ExtendedModelResponse, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    BaseMessageChunk,
    convert_to_openai_messages,
)
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableBinding
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from tb_plugins.core.pacing import priority_of
from tb_plugins.core.usage import Usage
from tb_plugins.engine.held import Cost, afinish, finish

__all__ = [
    "OUTPUT_CAP_KEYS",
    "Cost",
    "afinish",
    "current_metadata",
    "failure_cost",
    "finish",
    "merge_chunk",
    "response_usage",
    "unwrap_chat_model",
    "invocation_max_tokens",
    "invocation_model",
    "max_tokens_key",
    "metadata_priority",
    "metadata_scopes",
    "model_name",
    "openai_messages",
    "openai_tools",
    "partial_output",
    "requested_max_tokens",
    "usage_from_message",
    "usage_from_result",
]

logger = logging.getLogger("tb_plugins")


# Output-cap parameter names by provider; the first one a model declares is the one bound.
_MAX_TOKENS_FIELDS = ("max_tokens", "max_output_tokens", "max_new_tokens", "num_predict")
_INVOCATION_MAX = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")
OUTPUT_CAP_KEYS = (*_INVOCATION_MAX, "max_new_tokens")
"""Every keyword providers use for the output cap."""
# id(tool) -> (weak reference, OpenAI schema); tools are unhashable pydantic models, and an
# entry leaves the cache when its tool is collected.
_tool_cache: dict[int, tuple[weakref.ref[BaseTool], dict[str, Any]]] = {}
_tool_lock = threading.Lock()


def metadata_scopes(metadata: Mapping[str, Any] | None) -> list[str]:
    """Scopes named in run metadata: ``team`` -> ``team:<name>``, ``user_id`` ->
    ``user:<id>``, and every entry of ``tb_scopes`` (a list of ``kind:name``, or one string).

    Example:
        >>> metadata_scopes({"user_id": "alice", "team": "search", "tb_scopes": ["feature:qa"]})
        ['team:search', 'user:alice', 'feature:qa']
    """
    if not metadata:
        return []
    out: list[str] = []
    team = metadata.get("team")
    if team not in (None, ""):
        out.append(f"team:{team}")
    user = metadata.get("user_id")
    if user not in (None, ""):
        out.append(f"user:{user}")
    extra = metadata.get("tb_scopes")
    if isinstance(extra, str):
        out.append(extra)
    elif isinstance(extra, Iterable):
        out.extend(str(s) for s in extra)
    return out


def metadata_priority(metadata: Mapping[str, Any] | None) -> str:
    """The call's priority from run metadata ``tb_priority`` (the app sets it), ``normal``
    if absent; an unknown value is logged and taken as ``normal``.

    Example:
        >>> metadata_priority({"tb_priority": "low"}), metadata_priority(None)
        ('low', 'normal')
    """
    return priority_of(metadata, "run metadata")


def openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the OpenAI-style dicts the guard counts."""
    converted = convert_to_openai_messages(list(messages))
    return converted if isinstance(converted, list) else [converted]


def openai_tools(tools: Iterable[Any] | None) -> list[dict[str, Any]] | None:
    """Tool definitions in OpenAI format (cached per tool object); None when there are none.

    A tool LangChain cannot convert (e.g. a provider's built-in tool dict) is counted as is.
    """
    if not tools:
        return None
    out: list[dict[str, Any]] = []
    for tool in tools:
        if isinstance(tool, BaseTool):
            out.append(_tool_schema(tool))
        elif isinstance(tool, Mapping) and (
            tool.get("type") == "function" or "function" in tool or "name" not in tool
        ):
            out.append(dict(tool))
        else:
            try:
                out.append(convert_to_openai_tool(tool))
            except Exception:  # an odd tool still costs tokens: count its repr
                out.append({"type": "unknown", "value": repr(tool)})
    return out or None


def _tool_schema(tool: BaseTool) -> dict[str, Any]:
    key = id(tool)
    with _tool_lock:
        entry = _tool_cache.get(key)
    if entry is not None and entry[0]() is tool:
        return entry[1]
    schema = convert_to_openai_tool(tool)
    ref = weakref.ref(tool, lambda _r, k=key: _tool_cache.pop(k, None))  # type: ignore[misc]
    with _tool_lock:
        _tool_cache[key] = (ref, schema)
    return schema


def model_name(model: Any) -> str:
    """The model name a chat model sends (``ls_model_name``), else its type."""
    params: Mapping[str, Any] = {}
    get = getattr(model, "_get_ls_params", None)
    if callable(get):
        try:
            params = get()
        except Exception:
            params = {}
    name = params.get("ls_model_name")
    if isinstance(name, str) and name:
        return name
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return str(getattr(model, "_llm_type", type(model).__name__))


def max_tokens_key(model: Any) -> str:
    """The keyword that caps output for this model (``max_tokens`` for most providers)."""
    fields = getattr(type(model), "model_fields", {})
    for key in _MAX_TOKENS_FIELDS:
        if key in fields:
            return key
    return "max_tokens"


def requested_max_tokens(model: Any, settings: Mapping[str, Any] | None = None) -> int | None:
    """The output cap a call will be made with: bound settings first, then the model's own."""
    for key in (*_INVOCATION_MAX, max_tokens_key(model)):
        value = (settings or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if isinstance(model, BaseChatModel):
        try:
            value = model._get_ls_params().get("ls_max_tokens")
        except Exception:
            value = None
        if isinstance(value, int):
            return value
    value = getattr(model, max_tokens_key(model), None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def invocation_max_tokens(
    params: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None
) -> int | None:
    """The output cap of a started LLM run, from its invocation params or metadata."""
    for key in _INVOCATION_MAX:
        value = (params or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = (metadata or {}).get("ls_max_tokens")
    return value if isinstance(value, int) else None


def invocation_model(
    params: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    serialized: Mapping[str, Any] | None,
) -> str:
    """The model name of a started LLM run."""
    name = (metadata or {}).get("ls_model_name")
    if isinstance(name, str) and name:
        return name
    for key in ("model", "model_name", "model_id", "deployment_name"):
        value = (params or {}).get(key)
        if isinstance(value, str) and value:
            return value
    value = (params or {}).get("_type") or (serialized or {}).get("name")
    return str(value or "unknown")


def usage_from_message(message: Any, default_model: str | None = None) -> Usage | None:
    """:class:`Usage` from an AIMessage's ``usage_metadata`` (None if it reports none)."""
    meta = getattr(message, "usage_metadata", None)
    if not meta:
        return None
    details_in = meta.get("input_token_details") or {}
    details_out = meta.get("output_token_details") or {}
    served = None
    response_metadata = getattr(message, "response_metadata", None) or {}
    for key in ("model_name", "model"):
        value = response_metadata.get(key)
        if isinstance(value, str) and value:
            served = value
            break
    return Usage.reported(
        meta.get("input_tokens"),
        meta.get("output_tokens"),
        details_in.get("cache_read") or 0,
        details_out.get("reasoning") or 0,
        model=served or default_model,
    )


def usage_from_result(result: LLMResult | None, default_model: str | None = None) -> Usage | None:
    """:class:`Usage` from an LLM run's result: the chat message's ``usage_metadata``, else
    the ``token_usage`` a completion LLM puts in ``llm_output``."""
    if result is None:
        return None
    for generations in result.generations:
        for gen in generations:
            if isinstance(gen, ChatGeneration):
                usage = usage_from_message(gen.message, default_model)
                if usage is not None:
                    return usage
    token_usage = (result.llm_output or {}).get("token_usage") or {}
    if "prompt_tokens" in token_usage or "completion_tokens" in token_usage:
        return Usage.reported(
            token_usage.get("prompt_tokens"),
            token_usage.get("completion_tokens"),
            model=(result.llm_output or {}).get("model_name") or default_model,
        )
    return None


def partial_output(result: LLMResult | None) -> bool:
    """True when a failed run had already produced output (a stream cut short)."""
    if result is None:
        return False
    for generations in result.generations:
        for gen in generations:
            message = getattr(gen, "message", None)
            if isinstance(message, AIMessage) and (
                message.content or message.tool_calls or getattr(message, "tool_call_chunks", None)
            ):
                return True
            if not isinstance(gen, ChatGeneration) and gen.text:
                return True
    return False


# -- requests and settlement ---------------------------------------------------------------


def failure_cost(
    exc: BaseException, model: str, result: LLMResult | None = None, partial: Any = None
) -> Cost:
    """What a failed call cost: the usage it reported; None (its estimate) if it was
    cancelled or abandoned (``GeneratorExit``, ``CancelledError``) or had produced output;
    False (release the hold) if it failed before producing anything."""
    for usage in (
        usage_from_result(result, model),
        usage_from_message(partial, model),
        usage_from_message(getattr(exc, "ai_message", None), model),
    ):
        if usage is not None:
            return usage
    if partial is not None or not isinstance(exc, Exception) or partial_output(result):
        return None
    return False


def response_usage(response: Any, model: str) -> Usage | None:
    """Usage of the AI message in what ``wrap_model_call``'s handler returned."""
    if isinstance(response, ExtendedModelResponse):
        response = response.model_response
    messages = response.result if isinstance(response, ModelResponse) else [response]
    for message in messages:
        if isinstance(message, AIMessage):
            return usage_from_message(message, model)
    return None


def current_metadata() -> Mapping[str, Any]:
    """The metadata of the LangGraph run we are in ({} outside a graph)."""
    try:
        from langgraph.config import get_config

        return get_config().get("metadata") or {}
    except RuntimeError:
        return {}


def merge_chunk(merged: BaseMessageChunk | None, chunk: BaseMessage) -> BaseMessageChunk | None:
    """Add a streamed chunk to what came before (usage sums over chunks)."""
    if not isinstance(chunk, BaseMessageChunk):
        return merged
    return chunk if merged is None else merged + chunk


def unwrap_chat_model(runnable: Any) -> tuple[BaseChatModel, dict[str, Any]]:
    """The chat model under ``.bind(...)`` layers, and the settings they bind."""
    settings: dict[str, Any] = {}
    while isinstance(runnable, RunnableBinding):
        settings = {**runnable.kwargs, **settings}
        runnable = runnable.bound
    if not isinstance(runnable, BaseChatModel):
        raise TypeError(f"with_budget_downgrade() takes chat models, got {type(runnable).__name__}")
    return runnable, settings
