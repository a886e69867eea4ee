"""The local FakeChatModel reports usage like a provider: exact counts, tools, streams, caps."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from tb_plugins import count_tokens
from tb_plugins.testing.fake_chat_model import FakeChatModel


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


CONVERSATION = [SystemMessage("Be brief."), HumanMessage("What is 2 + 2?")]
OPENAI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def test_usage_is_the_tiktoken_count_of_prompt_and_reply() -> None:
    """input_tokens is count_tokens() of the prompt, output_tokens the count of the reply."""
    msg = FakeChatModel(model="gpt-4o", reply="Four.").invoke(CONVERSATION)
    assert msg.usage_metadata["input_tokens"] == count_tokens("gpt-4o", OPENAI)
    assert msg.usage_metadata["output_tokens"] == 2
    assert msg.response_metadata == {"model_name": "gpt-4o", "finish_reason": "stop"}


def test_bound_tools_count_as_input_and_scripted_tool_calls_come_back() -> None:
    """bind_tools sends OpenAI-format tools (counted as input) and the script's tool calls."""
    model = FakeChatModel(
        model="gpt-4o", responses=[{"tool_calls": [{"name": "add", "args": {"a": 2, "b": 2}}]}]
    )
    msg = model.bind_tools([add]).invoke(CONVERSATION)
    assert msg.tool_calls[0]["name"] == "add" and msg.tool_calls[0]["args"] == {"a": 2, "b": 2}
    assert msg.usage_metadata["input_tokens"] == count_tokens(
        "gpt-4o", OPENAI, [convert_to_openai_tool(add)]
    )
    assert model.calls[0].kwargs["tools"][0]["function"]["name"] == "add"


def test_script_list_then_reply_and_callable_and_exceptions() -> None:
    """A list answers call by call then falls back to reply; a callable sees the messages;
    an exception entry is raised after the call is counted."""
    model = FakeChatModel(responses=["one", AIMessage("two"), ValueError("boom")], reply="rest")
    assert [model.invoke("x").content for _ in range(2)] == ["one", "two"]
    with pytest.raises(ValueError, match="boom"):
        model.invoke("x")
    assert model.invoke("x").content == "rest" and model.call_count == 4
    echo = FakeChatModel(responses=lambda messages: messages[-1].content.upper())
    assert echo.invoke("hi").content == "HI"
    model.reset()
    assert model.call_count == 0 and model.invoke("x").content == "one"


def test_max_tokens_cuts_the_reply_to_fit() -> None:
    """A max_tokens cap (field or bound) cuts the reply to at most that many output tokens."""
    model = FakeChatModel(model="gpt-4o", reply="word " * 50)
    msg = model.bind(max_tokens=7).invoke("x")
    assert msg.usage_metadata["output_tokens"] == 7
    assert msg.response_metadata["finish_reason"] == "length"
    assert (
        FakeChatModel(model="gpt-4o", reply="word " * 50, max_tokens=5)
        .invoke("x")
        .usage_metadata["output_tokens"]
        == 5
    )


def test_stream_carries_usage_on_the_last_chunk_or_none() -> None:
    """Streaming yields the words, with usage on the last chunk unless stream_usage=False."""
    model = FakeChatModel(model="gpt-4o", reply="a b c")
    chunks = list(model.stream("x"))
    assert "".join(c.content for c in chunks) == "a b c"
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.usage_metadata == model.invoke("x").usage_metadata
    quiet = FakeChatModel(model="gpt-4o", reply="a b c", stream_usage=False)
    assert all(c.usage_metadata is None for c in quiet.stream("x"))


async def test_async_stream_and_tool_call_chunks() -> None:
    """astream streams tool calls as tool-call chunks that merge back into the call."""
    model = FakeChatModel(responses=[{"tool_calls": [{"name": "add", "args": {"a": 1, "b": 2}}]}])
    chunks = [c async for c in model.astream("x")]
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.tool_calls[0]["args"] == {"a": 1, "b": 2}


def test_cached_and_reasoning_details() -> None:
    """cached_input_tokens and reasoning_tokens appear in the usage details."""
    msg = FakeChatModel(model="gpt-4o", cached_input_tokens=3, reasoning_tokens=4).invoke("x")
    assert msg.usage_metadata["input_token_details"] == {"cache_read": 3}
    assert msg.usage_metadata["output_token_details"] == {"reasoning": 4}


def test_identity_for_langchain() -> None:
    """The model reports its type, name and max_tokens the way LangChain tracing reads them."""
    model = FakeChatModel(model="gpt-4o", max_tokens=9)
    assert model._llm_type == "tb-fake-chat"
    assert model._identifying_params == {"model_name": "gpt-4o", "max_tokens": 9}
    params = model._get_ls_params()
    assert params["ls_model_name"] == "gpt-4o" and params["ls_max_tokens"] == 9
    assert FakeChatModel(model_name="x").model_name == "x"
