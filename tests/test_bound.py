"""The input-token bound that encodes nothing is never below the exact count: over random
unicode, names, tool calls, tool schemas, content parts and media, for every tokenizer family
the counter knows, any approximation margin, and the byte estimate without a tokenizer."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_plugins.counting import TokenCounter
from tb_plugins.counting.counter import _Plan
from tb_plugins.counting.encoders import ByteEstimate
from tb_plugins.counting.families import GPT4_TOOL_RULES

MODELS = [
    "gpt-4o", "gpt-4.1-mini", "gpt-4", "gpt-3.5-turbo", "text-davinci-003",
    "claude-sonnet-4-5", "gemini-2.5-pro", "mistral/mistral-large", "no-such-model",
]  # fmt: skip

# Any unicode, plus the lone surrogates and control characters clients send.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300) | st.sampled_from(
    ["", " ", "\ud800", "a\udfffb", "\x00\x1b[2J", "🙂" * 50, "..." * 200, "word " * 120]
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _png(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    body += struct.pack(">I", zlib.crc32(chunk))
    return "data:image/png;base64," + base64.b64encode(body).decode()


PART = st.one_of(
    TEXT,
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(
        lambda w, h, d: {"type": "image_url", "image_url": {"url": _png(w, h), "detail": d}},
        st.integers(1, 4000),
        st.integers(1, 4000),
        st.sampled_from(["low", "high", "auto"]),
    ),
    JSONISH,
)
TOOL_CALL = st.builds(
    lambda name, args: {"id": "call_1", "type": "function",
                        "function": {"name": name, "arguments": args}},
    TEXT, TEXT | st.dictionaries(TEXT, JSONISH, max_size=3),
)  # fmt: skip
MESSAGE = st.builds(
    lambda role, content, name, calls: {
        "role": role,
        "content": content,
        **({"name": name} if name is not None else {}),
        **({"tool_calls": calls} if calls else {}),
    },
    st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
    TEXT | st.lists(PART, max_size=4) | JSONISH,
    st.none() | TEXT,
    st.lists(TOOL_CALL, max_size=2),
)
PROPERTY = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "integer", "object", "array"]), "description": TEXT},
    optional={"enum": st.lists(TEXT | st.integers(), max_size=4)},
)
TOOL = st.builds(
    lambda name, desc, props: {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": props},
        },
    },
    TEXT, TEXT, st.dictionaries(TEXT, PROPERTY, max_size=4),
) | st.dictionaries(TEXT, JSONISH, max_size=3)  # fmt: skip

COUNTERS = {margin: TokenCounter(approximation_margin=margin) for margin in (0.8, 1.0, 1.2, 1.7)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(MODELS),
    st.sampled_from(sorted(COUNTERS)),
    st.lists(MESSAGE, max_size=5),
    st.none() | st.lists(TOOL, max_size=3),
)
def test_the_bound_is_never_below_the_exact_count(
    model: str, margin: float, messages: list[dict[str, Any]], tools: list[Any] | None
) -> None:
    """bound_messages >= count_messages for any request, model family and margin."""
    counter = COUNTERS[margin]
    bound = counter.bound_messages(model, messages, tools)
    exact = counter.count_messages(model, messages, tools)
    assert bound >= exact


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MODELS), TEXT)
def test_the_text_bound_is_never_below_the_exact_count(model: str, text: str) -> None:
    """bound_text >= count_text, long texts (cut into chunks by the counter) included."""
    counter = COUNTERS[1.2]
    assert counter.bound_text(model, text * 40) >= counter.count_text(model, text * 40)


@settings(max_examples=150, deadline=None)
@given(st.lists(MESSAGE, max_size=4), st.sampled_from([0.8, 1.0, 1.2, 2.0]))
def test_the_bound_covers_the_byte_estimate_without_a_tokenizer(
    messages: list[dict[str, Any]], margin: float
) -> None:
    """With no tokenizer files the counter counts UTF-8 bytes / 3 times the margin; the
    bound stays above that too (its per-message constants are scaled by the margin)."""
    counter = TokenCounter(approximation_margin=margin)
    counter._plans["gpt-4o"] = _Plan(ByteEstimate(), GPT4_TOOL_RULES, exact=False)
    assert counter.bound_messages("gpt-4o", messages) >= counter.count_messages("gpt-4o", messages)


def test_the_bound_loads_no_tokenizer() -> None:
    """A bound in a fresh process imports no tiktoken."""
    import subprocess
    import sys

    code = (
        "import sys; from tb_plugins.counting import TokenCounter;"
        "n = TokenCounter().bound_messages('gpt-4o', [{'role': 'user', 'content': 'hi'}]);"
        "print(n, 'tiktoken' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # (3 + 4 + 2 + 3) x 1.2 rounded up: gpt-4o's encoding is not loaded, so the margin counts
    assert out.stdout.split() == ["15", "False"]


@pytest.mark.parametrize("model", MODELS)
def test_a_bad_request_is_refused_like_the_exact_count(model: str) -> None:
    """The bound refuses what count_messages refuses (not a sequence of messages)."""
    counter = COUNTERS[1.2]
    for bad in ("hello", {"role": "user"}, 5):
        with pytest.raises(ValueError):
            counter.bound_messages(model, bad)  # type: ignore[arg-type]
