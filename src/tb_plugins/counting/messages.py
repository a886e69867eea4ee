"""The chat format: what a message, a tool call and a tool definition cost, in tokens.

OpenAI's published rules (the openai-cookbook notebook "How to count tokens with tiktoken"):

* every message costs 3 tokens, plus the tokens of each of its string values (``role``,
  ``content``, ``name``, ``tool_call_id``, ...); a ``name`` costs 1 more; every reply is
  primed with 3 tokens;
* tool definitions follow the cookbook's ``num_tokens_for_tools``: per function
  ``func_init`` + tokens of ``"name:description"`` (one trailing ``.`` dropped), then, if it
  has properties, ``prop_init`` and per property ``prop_key`` + tokens of
  ``"key:type:description"``, with ``enum_init`` + ``enum_item`` + tokens per enum value;
  ``func_end`` once after all functions (the constants per model family are in
  :mod:`~tb_plugins.counting.families`).

Where the cookbook is silent, the rule that errs high is picked (a budget would rather
reserve a little too much than let a call through unpaid):

* assistant ``tool_calls``: each call's function name + arguments (call ids and ``type``
  are not counted); legacy ``function_call`` the same. Arguments given as a dict are
  counted as their JSON.
* nested tool parameters: properties of an ``object`` property (or of an ``array``'s
  ``items``) are counted recursively with the same ``prop_init``/``prop_key`` constants;
  a property without ``type`` counts its ``anyOf``/``oneOf``/``allOf`` JSON (else
  ``any``); a list ``type`` counts as ``a|b``; ``$defs`` are counted as JSON; non-string
  enum values as JSON. A tool that is not a function (a built-in tool) counts as its JSON.
* image, audio and file parts: see :mod:`~tb_plugins.counting.media`.
* anything else (numbers, dicts, unknown parts or keys, objects): the tokens of its JSON
  rendering. Odd content never raises; only a value that is not a message does.

Example:
    >>> from tb_plugins.counting.encoders import load
    >>> count_message(load("o200k_base"), {"role": "user", "content": "Hello!"})
    6
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tb_plugins.counting import media

if TYPE_CHECKING:
    from tb_plugins.counting.encoders import Encoder
    from tb_plugins.counting.families import ToolRules

__all__ = [
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "check_sequence",
    "count_message",
    "count_tools",
    "render",
    "text_size",
]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


def render(value: object) -> str:
    """The JSON text of an odd value, as a model would be shown it.

    Example:
        >>> render({"n": 1, "ok": True})
        '{"n": 1, "ok": true}'
    """
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(value)
        except Exception:
            return f"<{type(value).__name__}>"


def check_sequence(messages: object) -> None:
    """Raise ValueError unless ``messages`` is a sequence (not a string or a mapping)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a sequence of chat messages, got {type(messages).__name__}"
        )


def text_size(message: Mapping[str, Any]) -> int:
    """Characters of a message's text: its strings and the text parts of its content.

    Example:
        >>> text_size({"role": "user", "content": [{"type": "text", "text": "hi"}, "there"]})
        11
    """
    size = 0
    for value in message.values():
        if type(value) is str:
            size += len(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, Mapping):
                    text = part.get("text")
                    size += len(text) if isinstance(text, str) else 0
                elif isinstance(part, str):
                    size += len(part)
    return size


# ---------------------------------------------------------------------------- messages


def count_message(encoder: Encoder, message: Mapping[str, Any]) -> int:
    """Return the tokens of one chat message, its 3-token overhead included."""
    tokens = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            tokens += _count_content(encoder, value)
        elif key == "tool_calls":
            tokens += _count_tool_calls(encoder, value)
        elif key == "function_call":
            tokens += _count_call(encoder, value)
        else:
            tokens += encoder.count(value if isinstance(value, str) else render(value))
            if key == "name":
                tokens += TOKENS_PER_NAME
    return tokens


def _count_value(encoder: Encoder, value: object) -> int:
    """A text's tokens, or those of any other value's JSON (None costs nothing)."""
    if value is None:
        return 0
    return encoder.count(value if isinstance(value, str) else render(value))


def _count_tool_calls(encoder: Encoder, calls: object) -> int:
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        return encoder.count(render(calls))
    return sum(_count_call(encoder, call) for call in calls)


def _count_call(encoder: Encoder, call: object) -> int:
    """One tool call (``{"function": {name, arguments}}``, LangChain's ``{name, args}``)."""
    if not isinstance(call, Mapping):
        return encoder.count(render(call))
    function = call.get("function")
    spec = function if isinstance(function, Mapping) else call
    if "name" not in spec and "arguments" not in spec and "args" not in spec:
        return encoder.count(render(call))
    arguments = spec.get("arguments", spec.get("args"))
    return _count_value(encoder, spec.get("name")) + _count_value(encoder, arguments)


def _count_content(encoder: Encoder, content: object) -> int:
    if isinstance(content, str):
        return encoder.count(content)
    if isinstance(content, (list, tuple)):
        return sum(_count_part(encoder, part) for part in content)
    return encoder.count(render(content))


_TEXT_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
    "reasoning": "reasoning",
}


def _count_part(encoder: Encoder, part: object) -> int:
    if isinstance(part, str):
        return encoder.count(part)
    if not isinstance(part, Mapping):
        return encoder.count(render(part))
    kind = part.get("type")
    field = _TEXT_FIELDS.get(kind) if isinstance(kind, str) else None
    if field is not None and isinstance(part.get(field), str):
        return encoder.count(part[field])
    if kind in ("image_url", "input_image", "image"):
        return media.image_part_tokens(part)
    if kind == "input_audio":
        audio = media.audio_tokens(part.get("input_audio"))
        if audio is not None:
            return audio
    if kind == "file":
        spec = part.get("file")
        if isinstance(spec, Mapping):
            return media.file_tokens(spec, lambda value: _count_value(encoder, value))
    return encoder.count(render(part))


# ------------------------------------------------------------------- tool definitions


def count_tools(encoder: Encoder, rules: ToolRules, tools: Sequence[object]) -> int:
    """Return the tokens of a request's tool definitions, by the cookbook's rule."""
    tokens = 0
    functions = 0
    for tool in tools:
        function = _function_of(tool)
        if function is None:
            tokens += encoder.count(render(tool))
            continue
        functions += 1
        tokens += rules.func_init
        name = function.get("name")
        description = function.get("description")
        tokens += encoder.count(f"{_as_text(name)}:{_strip_dot(_as_text(description))}")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = function.get("input_schema")
        if isinstance(parameters, Mapping):
            properties = parameters.get("properties")
            if isinstance(properties, Mapping) and properties:
                tokens += rules.prop_init + _count_properties(encoder, rules, properties)
            for defs_key in ("$defs", "definitions"):
                if parameters.get(defs_key):
                    tokens += encoder.count(render(parameters[defs_key]))
    if functions:
        tokens += rules.func_end
    return tokens


def _function_of(tool: object) -> Mapping[str, Any] | None:
    if not isinstance(tool, Mapping):
        return None
    function = tool.get("function")
    if isinstance(function, Mapping):
        return function
    # Flat forms: the Responses API / legacy `functions`, and Anthropic's input_schema.
    if "name" in tool and ("parameters" in tool or "input_schema" in tool or "description" in tool):
        return tool
    return None


def _count_properties(encoder: Encoder, rules: ToolRules, properties: Mapping[Any, Any]) -> int:
    tokens = 0
    for key, raw_spec in properties.items():
        spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
        tokens += rules.prop_key
        enum = spec.get("enum")
        if isinstance(enum, (list, tuple)):
            tokens += rules.enum_init
            for item in enum:
                tokens += rules.enum_item + encoder.count(_as_text(item))
        description = _strip_dot(_as_text(spec.get("description")))
        tokens += encoder.count(f"{key}:{_type_text(spec)}:{description}")
        nested = _nested_properties(spec)
        if nested:
            tokens += rules.prop_init + _count_properties(encoder, rules, nested)
    return tokens


def _nested_properties(spec: Mapping[str, Any]) -> Mapping[Any, Any] | None:
    properties = spec.get("properties")
    if isinstance(properties, Mapping) and properties:
        return properties
    items = spec.get("items")
    if isinstance(items, Mapping):
        properties = items.get("properties")
        if isinstance(properties, Mapping) and properties:
            return properties
    return None


def _type_text(spec: Mapping[str, Any]) -> str:
    kind = spec.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, (list, tuple)):
        return "|".join(str(k) for k in kind)
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in spec:
            return render(spec[combinator])
    if "$ref" in spec:
        return str(spec["$ref"])
    return "any"


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else render(value)


def _strip_dot(text: str) -> str:
    return text[:-1] if text.endswith(".") else text
