"""The fake OpenAI server that the LiteLLM tests, notebooks and demo use: exact usage, scripts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from tb_plugins import count_tokens
from tb_plugins.counting import TokenCounter
from tb_plugins.testing.fake_openai import FakeOpenAI, FakeOpenAIProcess

MESSAGES = [{"role": "user", "content": "How many tokens is this?"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenAI) -> openai.OpenAI:
    fake.reset()
    return openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)


def test_chat_usage_is_exact_and_the_reply_is_cut_at_max_tokens(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    """Prompt tokens follow OpenAI's counting rules; the reply is cut to max_tokens exactly."""
    r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7)
    assert r.usage is not None
    assert r.usage.prompt_tokens == count_tokens("gpt-4o", MESSAGES)
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"
    (served,) = fake.requests
    assert (served.model, served.max_tokens, served.api_key) == ("gpt-4o", 7, "sk-test")


def test_stream_ends_with_a_usage_chunk_when_asked(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    """A stream with include_usage ends with the usage of exactly the text streamed."""
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    assert TokenCounter().count_text("gpt-4o", text) == 9
    assert fake.requests[-1].include_usage


def test_responses_and_embeddings_report_usage(client: openai.OpenAI) -> None:
    """/v1/responses honours max_output_tokens; /v1/embeddings counts every input."""
    r = client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5)
    assert r.usage is not None and r.usage.output_tokens == 5
    e = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert len(e.data) == 2 and e.usage.prompt_tokens == 3


def test_scripted_failure_and_cut_stream(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    """A scripted 500 is an error response; a scripted stop cuts the stream mid-way."""
    fake.script(fail=500)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    fake.script(stop=True, after_chunks=2)
    with pytest.raises(httpx.RemoteProtocolError):
        for _ in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            pass
    assert [(r.outcome, r.chunks) for r in fake.requests] == [("failed", 0), ("stopped", 2)]


def test_hang_notices_the_client_leaving(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    """A request hung until release is recorded as disconnected when the client gives up."""
    fake.script(hang=math.inf)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    (served,) = fake.wait_for(1)
    assert served.outcome == "disconnected"


def test_tool_calls_can_be_scripted(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """A scripted tool call comes back as an OpenAI tool call with finish_reason tool_calls."""
    fake.script(tool_calls=[{"name": "lookup", "arguments": {"q": "tokens"}}])
    r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, call.function.arguments) == ("lookup", '{"q": "tokens"}')
    assert r.choices[0].finish_reason == "tool_calls"


def test_runs_in_its_own_process() -> None:
    """The server runs as a subprocess, scripted and inspected over HTTP."""
    proc = FakeOpenAIProcess.spawn()
    try:
        c = openai.OpenAI(base_url=proc.base_url, api_key="sk-p", max_retries=0)
        proc.script(fail=503)
        with pytest.raises(openai.APIStatusError):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
        assert [(r.status, r.completion_tokens) for r in proc.requests] == [(503, 0), (200, 3)]
    finally:
        proc.stop()
