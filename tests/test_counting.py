"""Token counting: exact OpenAI counts by the cookbook's rules, offline, cached."""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import math
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tiktoken
import tiktoken.registry

from tb_plugins.counting import (
    TokenCounter,
    Tokenizer,
    _fast,
    bpe_files,
    count_tokens,
    default_counter,
    encoders,
)
from tb_plugins.warnings import ApproximateCountWarning

SRC = Path(__file__).resolve().parents[1] / "src"

# ----------------------------------------------------------------- reference (cookbook)


def litellm_tokenizers_dir() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("litellm is not installed: no offline tiktoken files for the reference")
    return Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"


@functools.cache
def ref_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's own loader, pointed at LiteLLM's files so it cannot download."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(litellm_tokenizers_dir()))
        return tiktoken.get_encoding(name)


def ref_tokens(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text, disallowed_special=()))


def ref_image(width: int, height: int, detail: str) -> int:
    """OpenAI's published tile rule, written out plainly."""
    if detail == "low":
        return 85
    w, h = width, height
    if w > 2048 or h > 2048:
        ratio = 2048 / max(w, h)
        w, h = int(w * ratio), int(h * ratio)
    if min(w, h) > 768:
        ratio = 768 / min(w, h)
        w, h = int(w * ratio), int(h * ratio)
    tiles = ((w + 511) // 512) * ((h + 511) // 512)
    return 85 + 170 * tiles


def ref_messages(enc: tiktoken.Encoding, messages: list[dict[str, Any]]) -> int:
    """The cookbook's num_tokens_from_messages, plus the documented tool_calls rule."""
    total = 0
    for message in messages:
        total += 3
        for key, value in message.items():
            if value is None:
                continue
            if key == "tool_calls":
                for call in value:
                    total += ref_tokens(enc, call["function"]["name"])
                    total += ref_tokens(enc, call["function"]["arguments"])
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if part["type"] == "text":
                        total += ref_tokens(enc, part["text"])
                    else:
                        total += part["_expected_tokens"]
            else:
                total += ref_tokens(enc, value)
                if key == "name":
                    total += 1
    return total + 3


TOOLS_4O = {"func_init": 7, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3}
TOOLS_4 = {**TOOLS_4O, "func_init": 10}
FUNC_END = 12


def ref_properties(enc: tiktoken.Encoding, c: dict[str, int], properties: dict[str, Any]) -> int:
    total = 0
    for key, prop in properties.items():
        total += c["prop_key"]
        if "enum" in prop:
            total += c["enum_init"]
            for item in prop["enum"]:
                total += c["enum_item"] + ref_tokens(enc, item)
        desc = prop.get("description", "")
        if desc.endswith("."):
            desc = desc[:-1]
        total += ref_tokens(enc, f"{key}:{prop['type']}:{desc}")
        nested = prop.get("properties") or prop.get("items", {}).get("properties")
        if nested:  # documented extension: nested properties count like top-level ones
            total += c["prop_init"] + ref_properties(enc, c, nested)
    return total


def ref_tools(enc: tiktoken.Encoding, c: dict[str, int], tools: list[dict[str, Any]]) -> int:
    """The cookbook's num_tokens_for_tools (function part only)."""
    total = 0
    for tool in tools:
        f = tool["function"]
        total += c["func_init"]
        desc = f["description"]
        if desc.endswith("."):
            desc = desc[:-1]
        total += ref_tokens(enc, f["name"] + ":" + desc)
        if f["parameters"]["properties"]:
            total += c["prop_init"] + ref_properties(enc, c, f["parameters"]["properties"])
    return total + FUNC_END


# ------------------------------------------------------------------------- fixtures


def png_data_url(width: int, height: int) -> str:
    """A real 8-bit grayscale PNG of the given size."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress((b"\x00" * (width + 1)) * height, 9)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels)
    png += chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def jpeg_data_url(width: int, height: int) -> str:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    data = b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def gif_data_url(width: int, height: int) -> str:
    data = b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"
    return "data:image/gif;base64," + base64.b64encode(data).decode()


def webp_data_url(width: int, height: int) -> str:
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    data = b"RIFF" + struct.pack("<I", len(body)) + body
    return "data:image/webp;base64," + base64.b64encode(data).decode()


def wav_base64(seconds: float, rate: int = 8000) -> str:
    import wave
    from io import BytesIO

    buffer = BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(rate)
        wav.writeframes(b"\x80" * int(seconds * rate))
    return base64.b64encode(buffer.getvalue()).decode()


COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]

NESTED_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "book_trip",
            "description": "Book a trip for a traveller.",
            "parameters": {
                "type": "object",
                "properties": {
                    "traveller": {
                        "type": "object",
                        "description": "Who travels.",
                        "properties": {
                            "name": {"type": "string", "description": "Full name"},
                            "tier": {"type": "string", "enum": ["gold", "silver", "none"]},
                        },
                    },
                    "legs": {
                        "type": "array",
                        "description": "Flights in order",
                        "items": {
                            "type": "object",
                            "properties": {
                                "from": {"type": "string", "description": "IATA code."},
                                "to": {"type": "string", "description": "IATA code."},
                            },
                        },
                    },
                    "cabin": {"type": "string", "enum": ["economy", "business"]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "ping",
            "description": "Check the service.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]

AGENT_TURN: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a travel agent. Use tools when useful."},
    {"role": "user", "name": "alice", "content": "Find me a flight from Paris to Oslo."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {
                    "name": "search_flights",
                    "arguments": '{"from": "CDG", "to": "OSL", "date": "2025-03-01"}',
                },
            },
            {
                "id": "call_def456",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
        ],
    },
    {
        "role": "tool",
        "tool_call_id": "call_abc123",
        "content": '[{"flight": "SK834", "price": 129.5, "currency": "EUR"}]',
    },
    {"role": "tool", "tool_call_id": "call_def456", "content": "-3C, light snow"},
]


@pytest.fixture(scope="module")
def litellm_module() -> Iterator[ModuleType]:
    """LiteLLM, imported once with its local cost map and the environment put back."""
    litellm_tokenizers_dir()
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved
    yield litellm


@pytest.fixture
def litellm_offline(litellm_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """LiteLLM with TIKTOKEN_CACHE_DIR on its bundled files, so it cannot download either."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(litellm_tokenizers_dir()))
    return litellm_module


# ------------------------------------------------------------------- exact counting


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("openai/gpt-4.1", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
    ],
)
def test_plain_and_named_messages_match_the_cookbook_reference(model: str, encoding: str) -> None:
    """Plain and named messages count 3/message, +1/name, +3 priming over tiktoken tokens."""
    expected = ref_messages(ref_encoding(encoding), COOKBOOK_MESSAGES)
    assert TokenCounter().count_messages(model, COOKBOOK_MESSAGES) == expected
    assert TokenCounter().is_exact(model)


def test_counts_equal_the_prompt_tokens_the_cookbook_got_from_the_api() -> None:
    """The cookbook's examples give the prompt_tokens the OpenAI API reported for them."""
    assert count_tokens("gpt-4o", COOKBOOK_MESSAGES) == 124
    assert count_tokens("gpt-4o-mini", COOKBOOK_MESSAGES) == 124
    assert count_tokens("gpt-4", COOKBOOK_MESSAGES) == 129
    assert count_tokens("gpt-3.5-turbo", COOKBOOK_MESSAGES) == 129
    assert count_tokens("gpt-4o", WEATHER_MESSAGES, WEATHER_TOOLS) == 101
    assert count_tokens("gpt-4", WEATHER_MESSAGES, WEATHER_TOOLS) == 105


def test_tool_calls_and_tool_results_match_the_reference() -> None:
    """tool_calls count name + arguments; tool results count role, tool_call_id and content."""
    enc = ref_encoding("o200k_base")
    assert count_tokens("gpt-4o", AGENT_TURN) == ref_messages(enc, AGENT_TURN)


def test_legacy_function_call_counts_name_and_arguments() -> None:
    """A legacy function_call counts like one tool call."""
    enc = ref_encoding("o200k_base")
    message = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "lookup", "arguments": '{"q": "tiktoken"}'},
    }
    expected = 3 + ref_tokens(enc, "assistant") + ref_tokens(enc, "lookup")
    expected += ref_tokens(enc, '{"q": "tiktoken"}') + 3
    assert count_tokens("gpt-4o", [message]) == expected


@pytest.mark.parametrize(
    ("model", "encoding", "constants"),
    [("gpt-4o", "o200k_base", TOOLS_4O), ("gpt-4", "cl100k_base", TOOLS_4)],
)
def test_tool_definitions_with_enums_and_nested_params_match_the_reference(
    model: str, encoding: str, constants: dict[str, int]
) -> None:
    """Tool definitions follow num_tokens_for_tools, recursing into nested properties."""
    enc = ref_encoding(encoding)
    for tools in (WEATHER_TOOLS, NESTED_TOOLS):
        expected = ref_messages(enc, WEATHER_MESSAGES) + ref_tools(enc, constants, tools)
        assert TokenCounter().count_messages(model, WEATHER_MESSAGES, tools) == expected


def test_image_parts_follow_the_tile_rule() -> None:
    """Images cost 85 at low detail and 85 + 170/tile at high detail, sized from the data URL."""
    enc = ref_encoding("o200k_base")
    sizes = [(1024, 1024), (100, 60), (2048, 4096), (3000, 700)]
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare these pictures."}]
    for width, height in sizes:
        for detail in ("low", "high"):
            parts.append(
                {
                    "type": "image_url",
                    "image_url": {"url": png_data_url(width, height), "detail": detail},
                    "_expected_tokens": ref_image(width, height, detail),
                }
            )
    messages = [{"role": "user", "content": parts}]
    clean = [{"role": "user", "content": [_without_expected(p) for p in parts]}]
    assert count_tokens("gpt-4o", clean) == ref_messages(enc, messages)
    assert ref_image(1024, 1024, "high") == 765
    assert ref_image(2048, 4096, "high") == 1105


def _without_expected(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k != "_expected_tokens"}


@pytest.mark.parametrize(
    "url_for", [png_data_url, jpeg_data_url, gif_data_url, webp_data_url], ids=lambda f: f.__name__
)
def test_image_size_is_read_from_png_jpeg_gif_and_webp_headers(url_for: Any) -> None:
    """The size in a PNG, JPEG, GIF or WebP header decides the tile count."""
    part = {"type": "image_url", "image_url": {"url": url_for(1500, 400), "detail": "high"}}
    enc = ref_encoding("o200k_base")
    base = 3 + ref_tokens(enc, "user") + 3
    assert count_tokens("gpt-4o", [{"role": "user", "content": [part]}]) == base + ref_image(
        1500, 400, "high"
    )


def test_unknown_image_size_and_auto_detail_count_the_high_detail_worst_case() -> None:
    """A remote URL is never fetched: its size is unknown, so it costs 1445; auto counts as high."""
    enc = ref_encoding("o200k_base")
    base = 3 + ref_tokens(enc, "user") + 3
    remote = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    assert count_tokens("gpt-4o", [{"role": "user", "content": [remote]}]) == base + 1445
    auto = {"type": "image_url", "image_url": {"url": png_data_url(1024, 1024), "detail": "auto"}}
    assert count_tokens("gpt-4o", [{"role": "user", "content": [auto]}]) == base + 765


def test_audio_and_file_parts_use_the_documented_estimates() -> None:
    """WAV audio costs 10 tokens/s; a text file its text; a PDF 1765 per page; names count."""
    enc = ref_encoding("o200k_base")
    base = 3 + ref_tokens(enc, "user") + 3
    audio = {"type": "input_audio", "input_audio": {"data": wav_base64(2.5), "format": "wav"}}
    assert count_tokens("gpt-4o", [{"role": "user", "content": [audio]}]) == base + 25

    text = "Quarterly numbers: up 4%."
    text_file = {
        "type": "file",
        "file": {
            "filename": "notes.txt",
            "file_data": "data:text/plain;base64," + base64.b64encode(text.encode()).decode(),
        },
    }
    assert count_tokens("gpt-4o", [{"role": "user", "content": [text_file]}]) == (
        base + ref_tokens(enc, "notes.txt") + ref_tokens(enc, text)
    )

    pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >> endobj\n"
    pdf += b"2 0 obj << /Type /Page >> endobj\n3 0 obj << /Type /Page >> endobj\n%%EOF"
    pdf_file = {
        "type": "file",
        "file": {
            "filename": "r.pdf",
            "file_data": "data:application/pdf;base64," + base64.b64encode(pdf).decode(),
        },
    }
    assert count_tokens("gpt-4o", [{"role": "user", "content": [pdf_file]}]) == (
        base + ref_tokens(enc, "r.pdf") + 2 * (765 + 1000)
    )


def test_count_text_counts_plain_text_without_chat_overhead() -> None:
    """count_text is the bare tiktoken count for OpenAI models."""
    text = "Embeddings input: 42 tokens? Probably fewer. <|endoftext|> is plain text here."
    assert TokenCounter().count_text("text-embedding-3-small", text) == ref_tokens(
        ref_encoding("cl100k_base"), text
    )
    assert TokenCounter().count_text("gpt-4o", text) == ref_tokens(ref_encoding("o200k_base"), text)
    assert TokenCounter().count_text("text-davinci-003", text) == ref_tokens(
        ref_encoding("p50k_base"), text
    )


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_long_text_is_counted_in_chunks_without_changing_the_count(encoding: str) -> None:
    """Text longer than a chunk is cut only where tiktoken splits anyway: same count."""
    words = ["hello", "world,", "it's", "a", "test.", "\n", "\n\n", "  ", "1234567", "(x)"]
    words += ["naïve", "日本語", "🙂", "--", "don't", "\t", "<|endoftext|>"]
    text = " ".join(words[(i * 7919) % len(words)] for i in range(12_000))
    assert len(text) > 4 * 8192
    model = "gpt-4o" if encoding == "o200k_base" else "gpt-4"
    assert TokenCounter().count_text(model, text) == ref_tokens(ref_encoding(encoding), text)


def test_a_long_run_without_spaces_is_cut_hard_and_stays_close() -> None:
    """A 100k-character run with no space is cut every 8192 chars, at most 1 token per cut."""
    run = "ab.-" * 25_000
    exact = ref_tokens(ref_encoding("o200k_base"), run)
    counted = TokenCounter().count_text("gpt-4o", run)
    assert abs(counted - exact) <= len(run) // 8192


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("openrouter/openai/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("text-davinci-003", "p50k_base"),
        ("claude-sonnet-4-5", None),
        ("gemini/gemini-2.5-pro", None),
        ("ollama/llama3.1", None),
        ("o1mini", None),
        ("gpt-oss-20b", None),
    ],
)
def test_encoding_name_maps_model_families(model: str, encoding: str | None) -> None:
    """Provider prefixes are stripped and each OpenAI family gets its own encoding."""
    assert TokenCounter().encoding_name(model) == encoding


# ------------------------------------------------------------------- approximations


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gemini-2.5-pro", "mistral/large", "x"])
def test_other_models_are_approximated_above_the_cl100k_count(model: str) -> None:
    """Non-OpenAI models get ceil(cl100k count x 1.2) and are flagged not exact."""
    enc = ref_encoding("cl100k_base")
    cl100k = ref_messages(enc, AGENT_TURN)
    counter = TokenCounter()
    count = counter.count_messages(model, AGENT_TURN)
    assert count >= cl100k
    assert count == math.ceil(cl100k * 1.2)
    assert not counter.is_exact(model)
    assert TokenCounter(approximation_margin=1.5).count_messages(model, AGENT_TURN) == (
        math.ceil(cl100k * 1.5)
    )


def test_margin_rounding_is_not_fooled_by_floating_point() -> None:
    """100 tokens at margin 1.1 are 110, not 111 (100 * 1.1 == 110.00000000000001)."""
    text = "word " * 99 + "word"
    assert ref_tokens(ref_encoding("cl100k_base"), text) == 100
    assert TokenCounter(approximation_margin=1.1).count_text("claude-x", text) == 110


# ------------------------------------------------------------------ odd input, errors


def test_odd_content_never_crashes_and_counts_its_json() -> None:
    """Ints, dicts, objects, unknown parts and malformed tool calls are counted, not raised."""
    enc = ref_encoding("o200k_base")

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    odd: list[dict[str, Any]] = [
        {"role": "user", "content": 12345},
        {"role": "user", "content": {"nested": {"deep": [1, 2, {"x": None}]}}},
        {"role": "user", "content": [1, None, "loose text", {"no_type": True}, Thing()]},
        {"role": "user", "content": [{"type": "mystery", "payload": "???"}]},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": "data:image/png;base64,!!"}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": None}]},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]},
        {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-123"}}]},
        {"role": "user", "content": [{"type": "image", "source": {"data": "not base64 at all"}}]},
        {"role": "assistant", "content": None, "tool_calls": "not a list"},
        {
            "role": "assistant",
            "tool_calls": [None, 7, {"function": {"name": "f", "arguments": {}}}],
        },
        {"role": "assistant", "function_call": ["odd"]},
        {"role": "user", "content": Thing(), "metadata": {"when": Thing()}, "weight": 0.5},
    ]
    counter = TokenCounter()
    for message in odd:
        assert counter.count_messages("gpt-4o", [message]) > 6
        assert counter.count_messages("claude-3-haiku", [message]) > 6
    as_json = json.dumps({"nested": {"deep": [1, 2, {"x": None}]}})
    assert counter.count_messages("gpt-4o", [odd[1]]) == 3 + 1 + ref_tokens(enc, as_json) + 3
    odd_tools: list[Any] = [{"type": "web_search"}, {"function": {"name": "f"}}, "junk"]
    assert counter.count_messages("gpt-4o", odd[:1], tools=odd_tools) > 0


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "hi"}, ["role", "user"]], r"messages\[1\].*list"),
        ([{"content": "no role"}], r"messages\[0\].*no 'role'"),
        ([{"role": "user", "content": "ok"}, {"role": 3}], r"messages\[1\].*non-string role"),
        ([{"role": "user"}, {"role": "user"}, "text"], r"messages\[2\].*str"),
        ("just a string", r"sequence of chat messages"),
        ({"role": "user", "content": "a dict"}, r"sequence of chat messages"),
    ],
)
def test_a_value_that_is_not_a_message_raises_value_error_naming_its_index(
    messages: Any, match: str
) -> None:
    """Something that is not a chat message is refused with its index in the message."""
    with pytest.raises(ValueError, match=match):
        TokenCounter().count_messages("gpt-4o", messages)


def test_constructor_rejects_bad_settings() -> None:
    """A negative cache size or a non-positive margin is refused."""
    with pytest.raises(ValueError, match="cache_size"):
        TokenCounter(cache_size=-1)
    with pytest.raises(ValueError, match="approximation_margin"):
        TokenCounter(approximation_margin=0)


# --------------------------------------------------------------------------- caching


@pytest.fixture
def encode_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the tiktoken encoder counts while the test runs."""
    seen: list[str] = []
    original = encoders.TiktokenEncoder.count

    def spy(self: encoders.TiktokenEncoder, text: str) -> int:
        seen.append(text)
        return original(self, text)

    monkeypatch.setattr(encoders.TiktokenEncoder, "count", spy)
    return seen


def test_a_grown_history_encodes_only_the_new_messages(encode_spy: list[str]) -> None:
    """Counting a history again after two appends encodes just those two messages."""
    counter = TokenCounter()
    history = [dict(m) for m in AGENT_TURN[:3]]
    first = counter.count_messages("gpt-4o", history)
    assert encode_spy

    encode_spy.clear()
    grown = [dict(m) for m in history] + [dict(m) for m in AGENT_TURN[3:]]
    second = counter.count_messages("gpt-4o", grown)
    expected_texts = ["tool", "call_abc123", AGENT_TURN[3]["content"]]
    expected_texts += ["tool", "call_def456", AGENT_TURN[4]["content"]]
    assert sorted(encode_spy) == sorted(expected_texts)
    assert second == ref_messages(ref_encoding("o200k_base"), AGENT_TURN)
    assert second > first

    encode_spy.clear()
    assert counter.count_messages("gpt-4o", grown) == second
    assert encode_spy == []


def test_tool_lists_are_cached_whole(encode_spy: list[str]) -> None:
    """The same tools list is encoded once across calls."""
    counter = TokenCounter()
    counter.count_messages("gpt-4o", WEATHER_MESSAGES, NESTED_TOOLS)
    encode_spy.clear()
    counter.count_messages("gpt-4o", WEATHER_MESSAGES, [dict(t) for t in NESTED_TOOLS])
    assert encode_spy == []


def test_cache_size_zero_encodes_every_time(encode_spy: list[str]) -> None:
    """With cache_size=0 nothing is remembered."""
    counter = TokenCounter(cache_size=0)
    counter.count_messages("gpt-4o", AGENT_TURN)
    calls = len(encode_spy)
    counter.count_messages("gpt-4o", AGENT_TURN)
    assert len(encode_spy) == 2 * calls


def test_the_cache_is_bounded_and_keeps_the_recently_used(encode_spy: list[str]) -> None:
    """A cache of 2 forgets the least recently used message and keeps a recently used one."""
    a, b, c = ({"role": "user", "content": f"message {x}"} for x in "abc")
    counter = TokenCounter(cache_size=2)
    for message in (a, b, c):
        counter.count_messages("gpt-4o", [message])
    encode_spy.clear()
    counter.count_messages("gpt-4o", [a])
    assert "message a" in encode_spy

    counter = TokenCounter(cache_size=2)
    for message in (a, b, a, c):
        counter.count_messages("gpt-4o", [message])
    encode_spy.clear()
    counter.count_messages("gpt-4o", [a])
    counter.count_messages("gpt-4o", [c])
    assert encode_spy == []


def test_edited_or_interleaved_histories_are_recounted_correctly() -> None:
    """Histories that diverge, alternate or are mutated in place still count exactly."""
    enc = ref_encoding("o200k_base")
    counter = TokenCounter()
    agent_a = [dict(m) for m in AGENT_TURN]
    agent_b = [dict(AGENT_TURN[0]), {"role": "user", "content": "Book a hotel in Rome instead."}]
    for _ in range(3):  # two loops sharing a system prompt, interleaved
        assert counter.count_messages("gpt-4o", agent_a) == ref_messages(enc, agent_a)
        assert counter.count_messages("gpt-4o", agent_b) == ref_messages(enc, agent_b)
        agent_b.append({"role": "assistant", "content": f"Step {len(agent_b)} done."})

    edited = [dict(m) for m in agent_a]
    edited[1]["content"] = "Actually, find me a train from Paris to Oslo."
    assert counter.count_messages("gpt-4o", edited) == ref_messages(enc, edited)

    parts: list[dict[str, Any]] = [{"type": "text", "text": "first part"}]
    with_parts = [{"role": "user", "content": parts}]
    counter.count_messages("gpt-4o", with_parts)
    parts.append({"type": "text", "text": "a second part added in place"})
    expected = 3 + ref_tokens(enc, "user") + ref_tokens(enc, "first part")
    expected += ref_tokens(enc, "a second part added in place") + 3
    assert counter.count_messages("gpt-4o", with_parts) == expected
    assert counter.count_messages("gpt-4o", tuple(agent_a)) == ref_messages(enc, agent_a)


def test_concurrent_counting_from_threads_agrees() -> None:
    """Many threads sharing one counter get the same, correct count."""
    counter = TokenCounter(cache_size=16)
    expected = ref_messages(ref_encoding("o200k_base"), AGENT_TURN)
    histories = [AGENT_TURN[: i + 1] for i in range(len(AGENT_TURN))] * 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda h: counter.count_messages("gpt-4o", h), histories))
    assert results[len(AGENT_TURN) - 1 :: len(AGENT_TURN)] == [expected] * 20


def test_default_counter_is_shared_and_a_tokenizer() -> None:
    """count_tokens uses one shared TokenCounter, which satisfies the Tokenizer protocol."""
    assert default_counter() is default_counter()
    assert isinstance(default_counter(), Tokenizer)
    threads = [threading.Thread(target=default_counter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count_tokens("gpt-4o", AGENT_TURN) == default_counter().count_messages(
        "gpt-4o", AGENT_TURN
    )


# ------------------------------------------------------------------ agreement w/ litellm


def test_counts_agree_with_litellm_token_counter_where_the_rules_agree(
    litellm_offline: ModuleType,
) -> None:
    """Plain, named, tool-result and image messages count as litellm.token_counter does."""
    token_counter = litellm_offline.token_counter
    tool_results = [AGENT_TURN[0], AGENT_TURN[1], AGENT_TURN[3], AGENT_TURN[4]]
    images = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {
                    "type": "image_url",
                    "image_url": {"url": png_data_url(1024, 1024), "detail": "high"},
                },
                {
                    "type": "image_url",
                    "image_url": {"url": png_data_url(300, 200), "detail": "high"},
                },
                {
                    "type": "image_url",
                    "image_url": {"url": png_data_url(2000, 900), "detail": "low"},
                },
            ],
        }
    ]
    for model in ("gpt-4o", "gpt-4", "gpt-3.5-turbo"):
        for messages in (COOKBOOK_MESSAGES, tool_results, images):
            assert count_tokens(model, messages) == token_counter(model=model, messages=messages)


def test_tool_calls_differ_from_litellm_only_by_the_function_names(
    litellm_offline: ModuleType,
) -> None:
    """litellm counts only arguments of tool calls; we also count each function name."""
    enc = ref_encoding("o200k_base")
    names = sum(ref_tokens(enc, c["function"]["name"]) for c in AGENT_TURN[2]["tool_calls"])
    theirs = litellm_offline.token_counter(model="gpt-4o", messages=AGENT_TURN)
    assert count_tokens("gpt-4o", AGENT_TURN) == theirs + names


# ----------------------------------------------------------------- offline guarantees


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR",)}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_importing_counting_and_pricing_loads_no_heavy_dependency() -> None:
    """The core modules import neither litellm, langchain, redis, psycopg nor tiktoken."""
    code = (
        "import sys, json\n"
        "import tb_plugins.counting, tb_plugins.core.pricing\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = set(json.loads(out.stdout))
    heavy = {"litellm", "langchain", "langchain_core", "redis", "psycopg", "tiktoken"}
    assert loaded & heavy == set()


def test_counting_works_offline_without_tiktoken_cache_dir_in_a_fresh_process(
    tmp_path: Path,
) -> None:
    """A fresh process with no TIKTOKEN_CACHE_DIR and no network counts exactly, writes nothing."""
    code = textwrap.dedent(
        """
        import json, socket, warnings
        from tb_plugins.warnings import TokenBudgetWarning
        warnings.simplefilter("error", TokenBudgetWarning)

        def blocked(*args, **kwargs):
            raise OSError("network blocked by the test")

        socket.socket.connect = blocked
        socket.create_connection = blocked
        from tb_plugins.counting import TokenCounter

        counter = TokenCounter()
        messages = [{"role": "user", "content": "Hello offline world"}]
        print(json.dumps({m: [counter.count_messages(m, messages), counter.is_exact(m)]
                          for m in ("gpt-4o", "gpt-4")}))
        """
    )
    gym = tmp_path / "gym"
    gym.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_subprocess_env(DATA_GYM_CACHE_DIR=str(gym)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    messages = [{"role": "user", "content": "Hello offline world"}]
    for model, encoding in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        assert result[model] == [ref_messages(ref_encoding(encoding), messages), True]
    assert list(gym.iterdir()) == []


def test_counting_works_with_network_blocked_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With TIKTOKEN_CACHE_DIR unset and socket.connect raising, encodings still load."""
    expected = ref_messages(ref_encoding("o200k_base"), AGENT_TURN)

    def blocked(*args: object, **kwargs: object) -> None:
        raise OSError("network blocked by the test")

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(encoders, "_LOADER", encoders.EncodingLoader())
    counter = TokenCounter()
    assert counter.count_messages("gpt-4o", AGENT_TURN) == expected
    assert counter.is_exact("gpt-4o")
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
    assert list(tmp_path.iterdir()) == []


def test_without_any_bpe_file_counts_are_approximate_and_warn_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No local tokenizer file: one warning naming the fix, then byte-based estimates."""
    monkeypatch.setattr(bpe_files, "tiktoken_bpe_file", lambda name: None)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(encoders, "_LOADER", encoders.EncodingLoader())
    counter = TokenCounter()
    with pytest.warns(ApproximateCountWarning, match=r"tb-plugins\[litellm\]"):
        estimate = counter.count_messages("gpt-4o", AGENT_TURN)
    assert not counter.is_exact("gpt-4o")
    assert estimate >= ref_messages(ref_encoding("o200k_base"), AGENT_TURN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counter.count_messages("gpt-4", AGENT_TURN)
        counter.count_text("claude-sonnet-4-5", "still approximate")


def test_tiktoken_cache_dir_is_used_first_and_a_corrupt_file_there_is_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A verified file in TIKTOKEN_CACHE_DIR wins; one with the wrong hash is ignored."""
    key = bpe_files.tiktoken_cache_key("cl100k_base")
    assert key is not None
    bundled = litellm_tokenizers_dir() / key
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    (tmp_path / key).write_bytes(bundled.read_bytes())
    assert bpe_files.tiktoken_bpe_file("cl100k_base") == tmp_path / key
    (tmp_path / key).write_bytes(b"corrupt")
    assert bpe_files.tiktoken_bpe_file("cl100k_base") == bundled


# ------------------------------------------------------------- the buffer counting path

BUFFER_TEXTS = [
    "",
    "plain words",
    "<|endoftext|> is text here, not a special token",
    "<|fim_prefix|><|im_start|>user",
    "héllo 世界 🙂 " * 40,
    "1234567890" * 30 + "!!!???" + "\n\n\t  x",
    "a" * 9000,  # past the chunk size: split, counted per chunk
]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("text", BUFFER_TEXTS, ids=range(len(BUFFER_TEXTS)))
def test_the_buffer_counter_equals_encode_ordinary(name: str, text: str) -> None:
    encoder = encoders.load(name)
    assert isinstance(encoder, encoders.TiktokenEncoder)
    assert encoder._count is not None, "this tiktoken has the buffer API: it should be used"
    expected = sum(len(encoder.encoding.encode_ordinary(c)) for c in encoders.chunks(text))
    assert encoder.count(text) == expected


def test_lone_surrogates_fall_back_to_encode_ordinary() -> None:
    """tiktoken's buffer API refuses lone surrogates; encode_ordinary repairs them."""
    encoder = encoders.load("o200k_base")
    assert isinstance(encoder, encoders.TiktokenEncoder)
    text = "broken \ud800 pair \udfff here"
    assert encoder.count(text) == len(encoder.encoding.encode_ordinary(text)) > 0


def test_a_buffer_api_that_disagrees_on_the_probe_is_not_used() -> None:
    class Core:
        def encode_to_tiktoken_buffer(self, text: str, allowed: object) -> bytes:
            return b"\0" * 4  # always "one token": wrong

    class Encoding:
        _core_bpe = Core()

        def encode_ordinary(self, text: str) -> list[int]:
            return [0] * len(text.split())

    assert _fast.buffer_counter(Encoding()) is None  # type: ignore[arg-type]
    assert _fast.buffer_counter(object()) is None  # type: ignore[arg-type]


# --------------------------------------------------------- counting off the event loop


@pytest.fixture
def count_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(text, thread id) of every text the tiktoken encoder counts while the test runs."""
    seen: list[tuple[str, int]] = []
    original = encoders.TiktokenEncoder.count

    def spy(self: encoders.TiktokenEncoder, text: str) -> int:
        seen.append((text, threading.get_ident()))
        return original(self, text)

    monkeypatch.setattr(encoders.TiktokenEncoder, "count", spy)
    return seen


async def test_aprepare_encodes_a_long_new_text_in_a_worker_thread(
    count_threads: list[tuple[str, int]],
) -> None:
    counter = TokenCounter(offload_chars=1000)
    long_text = "budget ledger window " * 100  # 2,100 characters
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text}]
    await counter.aprepare("gpt-4o", messages)
    loop_thread = threading.get_ident()
    encoded = {text: ident for text, ident in count_threads}
    assert encoded[long_text] != loop_thread
    expected = TokenCounter().count_messages("gpt-4o", messages)
    count_threads.clear()
    # The count that follows is a lookup, and equals a fresh counter's.
    assert counter.count_messages("gpt-4o", messages) == expected
    assert count_threads == []


async def test_aprepare_leaves_short_or_counted_text_to_the_count(
    count_threads: list[tuple[str, int]],
) -> None:
    counter = TokenCounter(offload_chars=1000)
    short = [{"role": "user", "content": "hello there"}]
    await counter.aprepare("gpt-4o", short)
    assert count_threads == []  # nothing counted ahead: the count does it inline
    long_history = [{"role": "user", "content": "x y " * 400}]
    counter.count_messages("gpt-4o", long_history)
    count_threads.clear()
    await counter.aprepare("gpt-4o", [*long_history, {"role": "assistant", "content": "ok"}])
    assert count_threads == []  # only 2 new characters: not worth a thread
    never = TokenCounter(offload_chars=None)
    await never.aprepare("gpt-4o", long_history)
    assert count_threads == []


async def test_aprepare_leaves_an_iterator_of_messages_unconsumed(
    count_threads: list[tuple[str, int]],
) -> None:
    counter = TokenCounter(offload_chars=0)
    messages = iter([{"role": "user", "content": "hello " * 50}])
    await counter.aprepare("gpt-4o", messages)  # type: ignore[arg-type]
    assert count_threads == []
    assert next(messages)["content"].startswith("hello")  # still there for the count to reject


async def test_aprepare_never_raises_and_the_count_still_names_the_problem() -> None:
    counter = TokenCounter(offload_chars=0)
    bad: Any = [{"content": "no role"}]
    await counter.aprepare("gpt-4o", bad)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        counter.count_messages("gpt-4o", bad)


def test_offload_chars_is_validated() -> None:
    for bad in (-1, True, 2.5, "100"):
        with pytest.raises(ValueError, match="offload_chars"):
            TokenCounter(offload_chars=bad)  # type: ignore[arg-type]
