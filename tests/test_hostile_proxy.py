"""Hostile clients of the LiteLLM proxy plugin, proven against the real proxy process.

One proxy is started for the module from ``examples/litellm_proxy/config.yaml`` with the test's
own keys and policy (the helpers of ``test_litellm_proxy``), in front of the fake OpenAI server.
Every request the fake receives is also recorded as it came off the wire (path, headers,
body), so a test can show what the proxy sent upstream. One extra model group,
``gpt-4o-2024-08-06``, is served by the fake under ``/hang/v1``, where every request waits
until the test releases it: that is how a request is held "in flight" without timing.

Each test uses its own keys, so tests share no budget. Every test ends by reading the ledger:
what the upstream served is exactly what was charged, and nothing is left held.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import json
import math
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import yaml
from litellm.proxy._types import UserAPIKeyAuth

from tb_plugins import BudgetGuard, Usage
from tb_plugins.core.usage import MAX_CALL_TOKENS
from tb_plugins.integrations.litellm import apply_decision, request_view, usage_of
from tb_plugins.integrations.litellm_proxy import (
    HOLD_KEY,
    TokenBudgetProxyHandler,
    client_scopes,
    scope_owner,
)
from tb_plugins.testing.fake_openai import FakeOpenAI, Served
from test_litellm_proxy import EXAMPLE, Stack, start_proxy, stop, tb_headers, wait_ready

HANG_MODEL = "gpt-4o-2024-08-06"
"""A model group the fake serves under /hang/v1: each request waits there until released."""
HANG_PATH = "/hang/v1/chat/completions"
ATTACK_BUDGET = 1_500
SAME_ID_BUDGET = 2_000
AGENT_BUDGET = 400
LONG_PROMPT = [{"role": "user", "content": "budget " * 300}]
TOKEN_RE = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
DEADLINE = 30.0

ODD_USAGE: list[dict[str, Any]] = [
    {"completion_tokens": -7},
    {"prompt_tokens": -5},
    {"completion_tokens": "7"},
    {"completion_tokens": None},
    {"prompt_tokens": None},
    {"completion_tokens": 10**20},
    {"completion_tokens": 2.5},
    {"prompt_tokens_details": {"cached_tokens": -3}, "completion_tokens_details": None},
    {"prompt_tokens_details": {"cached_tokens": 10**12}},
]
"""Usage fields the fake upstream reports instead of the true ones."""

ATTACKS = (
    "no-model-header",
    "no-model-openai",
    "metadata-call-id",
    "body-call-id",
    "forged-hold",
    "embeddings",
    "completions",
    "models",
    "images",
)


def team_key(name: str) -> dict[str, str]:
    return {
        "key_alias": f"{name}-key",
        "user_id": f"{name}-user",
        "team_id": f"{name}-team",
        "org_id": "acme",
    }


def keys_table() -> dict[str, dict[str, str]]:
    keys = {f"sk-attack-{a}": team_key(f"attack-{a}") for a in ATTACKS}
    for name in ("same-id", "leak", "bad", "null", "badname", "cut"):
        keys[f"sk-{name}"] = team_key(name)
    for i in range(len(ODD_USAGE)):
        for stream in ("plain", "stream"):
            keys[f"sk-odd-{i}-{stream}"] = team_key(f"odd-{i}-{stream}")
    keys["sk-tenant-a"] = {"key_alias": "tenant-a-key", "user_id": "ann", "team_id": "tenant-a"}
    keys["sk-tenant-b"] = {"key_alias": "tenant-b-key", "user_id": "bob", "team_id": "tenant-b"}
    keys["sk-solo"] = {"key_alias": "solo-key", "user_id": "sol"}
    return keys


def policy(ledger: str) -> dict[str, Any]:
    return {
        "ledger": ledger,
        "budgets": [
            {"scope": "key:attack-*", "tokens": ATTACK_BUDGET, "window": "day"},
            {"scope": "key:same-id-key", "tokens": SAME_ID_BUDGET, "window": "day"},
            {"scope": "agent:*", "tokens": AGENT_BUDGET, "window": "day"},
            {"scope": "key:*", "tokens": 1_000_000, "window": "day"},
            {"scope": "team:*", "tokens": 1_000_000, "window": "day"},
            {"scope": "user:*", "tokens": 1_000_000, "window": "day"},
            {"scope": "session:*", "tokens": 1_000_000, "window": "day"},
            {"scope": "feature:*", "tokens": 1_000_000, "window": "day"},
        ],
    }


@dataclass(frozen=True)
class Wire:
    """One request as the fake upstream received it."""

    path: str
    headers: dict[str, str]
    body: str


@dataclass
class Hostile(Stack):
    wire: list[Wire] = field(default_factory=list)

    def arrived(self, path: str) -> int:
        """Requests that reached the fake on ``path`` so far (recorded before any hang)."""
        return sum(w.path == path for w in list(self.wire))

    def ledger(self, scope: str) -> tuple[float, float]:
        """(spent, reserved) tokens of ``scope`` once settlement is done."""
        st = self.settled(scope)
        return st.spent, st.reserved


def record_wire(fake: FakeOpenAI, wire: list[Wire]) -> None:
    """Make the fake log each request's path, headers and body as it arrives."""
    base: Any = fake._httpd.RequestHandlerClass

    class Recording(base):
        def _body(self) -> dict[str, Any]:
            data: dict[str, Any] = super()._body()
            wire.append(Wire(self.path, dict(self.headers.items()), json.dumps(data)))
            return data

    fake._httpd.RequestHandlerClass = Recording


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """The recording fake upstream, one proxy with the test's keys and policy, a guard."""
    tmp = tmp_path_factory.mktemp("hostile")
    fake = FakeOpenAI().start()
    wire: list[Wire] = []
    record_wire(fake, wire)
    fake.script(hang=math.inf, path=HANG_PATH, times=None)
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    upstream_keys = {}
    for entry in config["model_list"]:
        entry["litellm_params"]["api_base"] = fake.base_url
        upstream_keys[entry["model_name"]] = entry["litellm_params"]["api_key"]
    config["model_list"].append(
        {
            "model_name": HANG_MODEL,
            "litellm_params": {
                "model": "openai/gpt-4o",
                "api_base": fake.url + "/hang/v1",
                "api_key": "sk-fake-upstream-key-for-hang",
            },
        }
    )
    # A failing request (e.g. an unknown upstream route) must not cool a deployment down
    # for the next test.
    config["router_settings"] = {"disable_cooldowns": True}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(EXAMPLE / "custom_auth.py", tmp / "custom_auth.py")
    (tmp / "keys.yaml").write_text(yaml.safe_dump(keys_table()))
    budgets = tmp / "budgets.yaml"
    budgets.write_text(yaml.safe_dump(policy(f"sqlite:///{tmp / 'ledger.db'}")))
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(16),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TB_PLUGINS_CONFIG": str(budgets),
        "TB_EXAMPLE_KEYS": str(tmp / "keys.yaml"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    proxy = start_proxy(tmp / "config.yaml", env, tmp / "proxy.log")
    guard = BudgetGuard.from_config(budgets)
    try:
        wait_ready(proxy)
        yield Hostile(fake, [proxy], guard, upstream_keys, tmp, env, wire)
    finally:
        stop(proxy)
        guard.close()
        fake.stop()


# -- helpers -----------------------------------------------------------------------------------


def wait_until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {DEADLINE:.0f}s")
        time.sleep(0.02)


def release_until_done(stack: Hostile, *futures: Future[Any]) -> None:
    """Let hung requests go until every future has its answer (a request that reaches the
    fake after one release waits for the next)."""
    deadline = time.monotonic() + DEADLINE
    while not all(f.done() for f in futures):
        if time.monotonic() > deadline:
            pytest.fail(f"hung requests did not finish within {DEADLINE:.0f}s")
        stack.fake.release()
        time.sleep(0.02)


def raw(stack: Hostile, key: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    """A raw HTTP request to the proxy (``body``: JSON, or bytes sent as they are)."""
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    if isinstance(body, bytes):
        headers["content-type"] = "application/json"
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    method = kwargs.pop("method", "POST" if body is not None else "GET")
    return httpx.request(method, stack.url + path, headers=headers, timeout=DEADLINE, **kwargs)


def client(stack: Hostile, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, **kwargs)


def used(served: list[Served]) -> int:
    return sum(s.prompt_tokens + s.completion_tokens for s in served)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of an OpenAI-shaped or (``/v1/messages``) Anthropic-shaped body."""
    body: dict[str, Any] = response.json()
    assert body.get("type") in (None, "error"), body
    error: dict[str, Any] = body["error"]
    return error


# -- 1. holds belong to the request that made them -----------------------------------------------


def first_request(stack: Hostile, key: str, call_id: str, stream: bool) -> int:
    """The in-flight request of a pair: the openai client, a long prompt, a client call id."""
    c = client(stack, key, max_retries=0)
    try:
        if stream:
            chunks = c.chat.completions.create(
                model=HANG_MODEL,
                max_tokens=100,
                messages=LONG_PROMPT,
                stream=True,
                extra_headers={"x-litellm-call-id": call_id},
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            c.chat.completions.create(
                model=HANG_MODEL,
                max_tokens=100,
                messages=LONG_PROMPT,
                extra_headers={"x-litellm-call-id": call_id},
            )
        return 200
    except openai.APIStatusError as exc:
        assert exc.status_code == 429, exc.response.text
        assert exc.response.json()["error"]["type"] == "budget_exceeded"
        return exc.status_code


def second_request(stack: Hostile, attack: str, key: str, call_id: str) -> int:
    """The request that reuses the in-flight request's call id, one attack per variant."""
    header = {"x-litellm-call-id": call_id}
    messages = [{"role": "user", "content": "same id"}]
    if attack == "no-model-header":
        body = {"messages": messages}
        return raw(stack, key, "/v1/chat/completions", body, headers=header).status_code
    if attack == "metadata-call-id":
        body = {"messages": messages, "metadata": {"litellm_call_id": call_id}}
        return raw(stack, key, "/v1/chat/completions", body).status_code
    if attack == "body-call-id":
        body = {"messages": messages, "litellm_call_id": call_id}
        return raw(stack, key, "/v1/chat/completions", body).status_code
    if attack == "forged-hold":
        md = {HOLD_KEY: secrets.token_hex(16), "litellm_call_id": call_id}
        body = {"messages": messages, "metadata": md, "litellm_metadata": md}
        return raw(stack, key, "/v1/chat/completions", body, headers=header).status_code
    if attack == "models":
        return raw(stack, key, "/v1/models", headers=header).status_code
    if attack == "images":
        body = {"model": "gpt-4o", "prompt": "a cat"}
        return raw(stack, key, "/v1/images/generations", body, headers=header).status_code
    c = client(stack, key, max_retries=0)
    try:
        if attack == "no-model-openai":
            c.chat.completions.create(model="", messages=messages, extra_headers=header)
        elif attack == "embeddings":
            c.embeddings.create(
                model="text-embedding-3-small", input="same id", extra_headers=header
            )
        elif attack == "completions":
            c.completions.create(
                model="gpt-4o-mini", prompt="same id", max_tokens=5, extra_headers=header
            )
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS)
def test_reusing_a_call_id_cannot_erase_spend(hostile: Hostile, attack: str) -> None:
    """Eight times, a request is held in flight with a client-chosen call id while a second
    request with the same call id (no model, another endpoint, the id in metadata or the
    body, a forged hold field) runs and fails or is served: on a 1,500-token budget every
    token served is charged, the budget stops the key, and no hold is left."""
    key, scope = f"sk-attack-{attack}", f"key:attack-{attack}-key"
    before = len(hostile.fake.requests)
    first_codes, second_codes = [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(8):
            call_id = f"reused-{attack}-{i}"
            arrived = hostile.arrived(HANG_PATH)
            first = pool.submit(first_request, hostile, key, call_id, i % 2 == 1)
            wait_until(
                "the first request to reach the upstream",
                lambda first=first, arrived=arrived: (
                    first.done() or hostile.arrived(HANG_PATH) > arrived
                ),
            )
            second_codes.append(second_request(hostile, attack, key, call_id))
            release_until_done(hostile, first)
            first_codes.append(first.result())
    served = hostile.new_requests(before)
    spent, reserved = hostile.ledger(scope)
    assert reserved == 0
    assert spent == used(served) <= ATTACK_BUDGET
    assert 2 <= first_codes.count(200) < 8, first_codes  # the budget stopped the key
    assert set(first_codes) <= {200, 429}
    assert all(code < 500 for code in second_codes), second_codes


@pytest.mark.slow
def test_two_requests_with_one_call_id_are_each_charged_and_keep_their_headers(
    hostile: Hostile,
) -> None:
    """Two requests in flight together with the same client call id (openai client and raw
    HTTP) are each admitted on their own, each charged what it used, and each told its own
    decision in the x-tb-* headers (the first allowed, the second clamped)."""
    scope, call_id = "key:same-id-key", "one-id-for-two"
    before = len(hostile.fake.requests)
    arrived = hostile.arrived(HANG_PATH)
    c = client(hostile, "sk-same-id", max_retries=0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(
            c.chat.completions.with_raw_response.create,
            model=HANG_MODEL,
            max_tokens=1000,
            messages=[{"role": "user", "content": "first of two"}],
            extra_headers={"x-litellm-call-id": call_id},
        )
        wait_until("the first request upstream", lambda: hostile.arrived(HANG_PATH) > arrived)
        second = pool.submit(
            raw,
            hostile,
            "sk-same-id",
            "/v1/chat/completions",
            {
                "model": HANG_MODEL,
                "max_tokens": 1500,
                "messages": [{"role": "user", "content": "second of two, same id"}],
            },
            headers={"x-litellm-call-id": call_id},
        )
        wait_until("the second request upstream", lambda: hostile.arrived(HANG_PATH) > arrived + 1)
        release_until_done(hostile, first, second)
    one, two = first.result(), second.result()
    assert two.status_code == 200, two.text
    head_one, head_two = tb_headers(one.headers), tb_headers(two.headers)
    assert head_one["x-tb-decision"] == "allow"
    assert head_two["x-tb-decision"] == "clamp"
    left_one = int(head_one["x-tb-budget-remaining-tokens"])
    assert 0 < left_one < SAME_ID_BUDGET - 1000
    assert head_two["x-tb-budget-remaining-tokens"] == "0"
    served = hostile.new_requests(before)
    assert sorted(s.max_tokens or 0 for s in served)[1] == 1000
    assert min(s.max_tokens or 0 for s in served) < left_one  # the second was clamped
    spent, reserved = hostile.ledger(scope)
    assert (spent, reserved) == (used(served), 0)
    assert {r.key: r for r in hostile.guard.usage(group_by="scope")}[scope].requests == 2


@pytest.mark.slow
def test_the_hold_token_never_leaves_the_proxy(hostile: Hostile) -> None:
    """Whatever the endpoint (chat, stream, Responses, Messages, embeddings, completions),
    no hold token and no hold field reaches the upstream or a response; a hold field the
    client sends is dropped, not forwarded, and every request is charged exactly."""
    key, scope = "sk-leak", "key:leak-key"
    forged = {HOLD_KEY: secrets.token_hex(16), "note": "kept"}
    before, wire_before = len(hostile.fake.requests), len(hostile.wire)
    c = client(hostile, key)
    responses: list[httpx.Response] = []
    chat = c.chat.completions.with_raw_response.create(
        model="gpt-4o",
        max_tokens=10,
        messages=[{"role": "user", "content": "leak?"}],
        extra_body={"metadata": forged, "litellm_metadata": forged},
    )
    responses.append(chat.http_response)
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o", max_tokens=10, stream=True, messages=[{"role": "user", "content": "s"}]
    ) as stream:
        stream.read()
        responses.append(stream.http_response)
    resp = c.responses.with_raw_response.create(
        model="gpt-4o", input="leak?", max_output_tokens=16, metadata={HOLD_KEY: "x" * 32}
    )
    responses.append(resp.http_response)
    emb = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input="leak?")
    responses.append(emb.http_response)
    responses.append(
        raw(
            hostile,
            key,
            "/v1/messages",
            {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "m"}]},
        )
    )
    responses.append(
        raw(hostile, key, "/v1/completions", {"model": "gpt-4o", "prompt": "p", "max_tokens": 5})
    )
    for r in responses:
        assert r.status_code == 200, r.text
        assert tb_headers(r.headers)["x-tb-decision"] == "allow"
        for name, value in r.headers.items():
            assert HOLD_KEY not in name + value
            assert not TOKEN_RE.search(value), (name, value)
        assert HOLD_KEY not in r.read().decode()
    upstream = hostile.wire[wire_before:]
    assert len(upstream) == len(responses)
    for w in upstream:
        assert HOLD_KEY not in w.body and HOLD_KEY not in json.dumps(w.headers)
        assert not TOKEN_RE.search(json.dumps(w.headers))
        assert not TOKEN_RE.search(w.body), w.body
    assert json.loads(upstream[2].body).get("metadata", {}) == {}  # it held the forged field
    served = hostile.new_requests(before)
    assert hostile.ledger(scope) == (used(served), 0)


# -- 2. client scopes belong to the tenant that sent them ---------------------------------------


def agent_call(stack: Hostile, key: str, *, header: str | None = None, meta: Any = None) -> int:
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "max_tokens": 40,
        "messages": [{"role": "user", "content": "agent work"}],
    }
    if meta is not None:
        body["metadata"] = {"tb_scopes": meta}
    headers = {"x-tb-scopes": header} if header is not None else {}
    return raw(stack, key, "/v1/chat/completions", body, headers=headers).status_code


@pytest.mark.slow
def test_one_tenant_cannot_spend_another_tenants_agent_budget(hostile: Hostile) -> None:
    """Team A spends agent:X (x-tb-scopes header, openai client) until agent:* refuses it;
    team B (metadata.tb_scopes, raw HTTP) and a key without a team still pass with agent:X;
    A naming B's namespaced scope is ignored; reports show agent:X@<owner> per tenant."""
    a = client(hostile, "sk-tenant-a", max_retries=0)
    refusal: dict[str, Any] = {}
    served_a = 0
    for _ in range(20):
        try:
            a.chat.completions.create(
                model="gpt-4o",
                max_tokens=40,
                messages=[{"role": "user", "content": "agent work"}],
                extra_headers={"x-tb-scopes": "agent:X"},
            )
            served_a += 1
        except openai.RateLimitError as exc:
            refusal = exc.response.json()["error"]
            break
    assert served_a >= 2 and refusal, "team A was never refused"
    assert refusal["scope"] == "agent:X@team:tenant-a"
    assert refusal["budget"] == f"agent:* {AGENT_BUDGET:,} tokens/day"
    spent_a = hostile.tokens("agent:X@team:tenant-a").spent
    assert 0 < spent_a <= AGENT_BUDGET

    assert agent_call(hostile, "sk-tenant-b", meta=["agent:X"]) == 200
    assert agent_call(hostile, "sk-solo", header="agent:X") == 200
    b_spent = hostile.settled("agent:X@team:tenant-b").spent
    assert b_spent > 0
    assert hostile.settled("agent:X@key:solo-key").spent > 0
    # A names B's counter outright, in both places: dropped, and A is not refused for it.
    forged = "agent:X@team:tenant-b"
    assert agent_call(hostile, "sk-tenant-a", header=forged, meta=[forged]) == 200
    assert hostile.settled("agent:X@team:tenant-b").spent == b_spent
    assert hostile.settled("agent:X@team:tenant-a").spent == spent_a

    rows = {r.key: r for r in hostile.guard.usage(group_by="scope")}
    assert rows["agent:X@team:tenant-a"].requests == served_a
    assert rows["agent:X@team:tenant-a"].denied == 1
    assert rows["agent:X@team:tenant-b"].requests == 1
    assert rows["agent:X@key:solo-key"].requests == 1
    assert "agent:X" not in rows and "agent:X@team:tenant-b@team:tenant-a" not in rows
    for scope in ("agent:X@team:tenant-a", "agent:X@team:tenant-b", "agent:X@key:solo-key"):
        assert hostile.settled(scope).reserved == 0


BAD_SCOPE_ITEMS: list[Any] = [
    "agent:esc\x1b[2J",
    "agent:nul\x00",
    "agent:" + "x" * 600,
    "bogus:kind",
    "team:other",
    "agent:*",
    "agent:a?b",
    "agent:[ab]",
    "agent:x@team:other",
    "agent:",
    ":nokind",
    "   ",
    123,
    None,
    {"agent": "x"},
    ["agent:nested"],
]


@pytest.mark.slow
def test_bad_client_scope_names_are_dropped_not_fatal(hostile: Hostile) -> None:
    """Control characters, over-long names, unknown kinds, pattern characters, an owner
    suffix, non-strings and odd tb_scopes types are dropped and the request is served;
    the one good scope is charged under the key's team."""
    before = len(hostile.fake.requests)
    assert agent_call(hostile, "sk-badname", meta=[*BAD_SCOPE_ITEMS, "feature:ok"]) == 200
    header = "agent:*,bogus:x,agent:a@team:other,session:" + "y" * 300
    assert agent_call(hostile, "sk-badname", header=header, meta={"agent": "x"}) == 200
    assert agent_call(hostile, "sk-badname", meta=12345) == 200
    served = hostile.new_requests(before)
    assert len(served) == 3
    assert hostile.ledger("key:badname-key") == (used(served), 0)
    assert hostile.settled("feature:ok@team:badname-team").spent == used(served[:1])
    mine = [
        r.key for r in hostile.guard.usage(group_by="scope") if r.key.endswith("@team:badname-team")
    ]
    assert mine == ["feature:ok@team:badname-team"]


# -- 4. amounts a client sends --------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MSG = '"messages": [{"role": "user", "content": "bad amount"}]'
BAD_AMOUNTS = [
    # (path, field, JSON text of the value)
    *[
        (CHAT, "max_tokens", v)
        for v in (
            "-1",
            "1.5",
            "100.0",
            "true",
            "false",
            '"100"',
            '""',
            "[]",
            "{}",
            "1e15",
            "1000000000000000",
            "1000000000000000000000000000000",
            str(MAX_CALL_TOKENS + 1),
            "NaN",
            "Infinity",
            "-Infinity",
        )
    ],
    *[(CHAT, "max_completion_tokens", v) for v in ("-5", '"abc"', "1e15", "NaN", "true")],
    ("/v1/responses", "max_output_tokens", "-1"),
    ("/v1/responses", "max_output_tokens", "2.5"),
    ("/v1/responses", "max_output_tokens", '"50"'),
    ("/v1/responses", "max_output_tokens", "1e30"),
    ("/v1/messages", "max_tokens", "-1"),
    ("/v1/messages", "max_tokens", "true"),
    ("/v1/messages", "max_tokens", str(10**30)),
    ("/v1/completions", "max_tokens", "-3"),
    ("/v1/completions", "max_tokens", "NaN"),
]


def bad_body(path: str, field: str, value: str) -> bytes:
    if path == "/v1/responses":
        rest = '"input": "bad amount"'
    elif path == "/v1/completions":
        rest = '"prompt": "bad amount"'
    else:
        rest = MSG
    return f'{{"model": "gpt-4o", {rest}, "{field}": {value}}}'.encode()


def assert_refused_cleanly(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error.get("param", field) == field  # /v1/messages answers Anthropic's shape
    assert field in error["message"]
    assert len(error["message"]) < 500


@pytest.mark.slow
@pytest.mark.parametrize(("path", "field", "value"), BAD_AMOUNTS)
def test_a_bad_output_cap_is_a_400_over_raw_http(
    hostile: Hostile, path: str, field: str, value: str
) -> None:
    """A cap that is negative, fractional, boolean, text, a list, huge, NaN or infinite is a
    400 naming the field: nothing reaches the upstream, nothing is charged or held."""
    before = len(hostile.fake.requests)
    response = raw(hostile, "sk-bad", path, bad_body(path, field, value))
    assert_refused_cleanly(response, field)
    assert hostile.new_requests(before) == []
    assert hostile.ledger("key:bad-key") == (0, 0)


@pytest.mark.slow
def test_both_chat_caps_are_checked(hostile: Hostile) -> None:
    """A valid max_tokens does not cover a bad max_completion_tokens, nor the reverse."""
    for body, name in (
        (
            b'{"model": "gpt-4o", ' + MSG.encode() + b', "max_tokens": 10, '
            b'"max_completion_tokens": -5}',
            "max_completion_tokens",
        ),
        (
            b'{"model": "gpt-4o", ' + MSG.encode() + b', "max_tokens": "x", '
            b'"max_completion_tokens": 10}',
            "max_tokens",
        ),
    ):
        assert_refused_cleanly(raw(hostile, "sk-bad", CHAT, body), name)
    assert hostile.ledger("key:bad-key") == (0, 0)


OPENAI_BAD = [
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("max_tokens", "100"),
    ("max_tokens", 10**15),
    ("max_tokens", 10**30),
    ("max_completion_tokens", -1),
    ("max_completion_tokens", 2**63),
]


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), OPENAI_BAD)
def test_a_bad_output_cap_is_a_400_the_openai_client_does_not_retry(
    hostile: Hostile, field: str, value: Any
) -> None:
    """Through the openai client (default retries) a bad cap is one BadRequestError naming
    the field; nothing reaches the upstream, nothing is charged or held."""
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(str(r.url))]})
    c = client(hostile, "sk-bad", http_client=http)
    before = len(hostile.fake.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "bad amount"}],
            extra_body={field: value},
        )
    assert len(sent) == 1
    assert_refused_cleanly(caught.value.response, field)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="gpt-4o", input="bad", max_output_tokens=-1)
    assert hostile.new_requests(before) == []
    assert hostile.ledger("key:bad-key") == (0, 0)


@pytest.mark.slow
def test_a_null_cap_is_no_cap(hostile: Hostile) -> None:
    """max_tokens: null is allowed (OpenAI's default) and charged exactly."""
    before = len(hostile.fake.requests)
    body = b'{"model": "gpt-4o", ' + MSG.encode() + b', "max_tokens": null}'
    assert raw(hostile, "sk-null", CHAT, body).status_code == 200
    assert hostile.ledger("key:null-key") == (used(hostile.new_requests(before)), 0)


# -- 3. odd usage from the upstream ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["plain", "stream"])
@pytest.mark.parametrize("case", range(len(ODD_USAGE)), ids=[json.dumps(u) for u in ODD_USAGE])
def test_odd_upstream_usage_is_settled_never_left_held(
    hostile: Hostile, case: int, stream: str
) -> None:
    """An upstream reporting negative, textual, null, fractional or huge usage never leaves
    a hold and never breaks the proxy: the call is settled (a request in the usage log) and
    charged a whole, bounded, non-negative amount."""
    key, scope = f"sk-odd-{case}-{stream}", f"key:odd-{case}-{stream}-key"
    hostile.fake.script(usage=ODD_USAGE[case], model="gpt-4o", path="/v1/chat/completions")
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "odd usage"}],
        "stream": stream == "stream",
    }
    response = raw(hostile, key, CHAT, body)
    spent, reserved = hostile.ledger(scope)
    assert reserved == 0
    assert spent == int(spent) and 0 <= spent <= 2 * MAX_CALL_TOKENS
    assert response.status_code == 200, response.text
    wait_until(
        "the settle in the usage log",
        lambda: any(r.key == scope and r.requests == 1 for r in hostile.guard.usage()),
    )


@pytest.mark.slow
def test_a_stream_that_fails_after_output_began_is_charged_not_released(
    hostile: Hostile,
) -> None:
    """A stream whose final usage LiteLLM cannot read (fractional tokens) breaks after the
    client got content: the hold is settled at the estimate, never released for free."""
    before = len(hostile.fake.requests)
    hostile.fake.script(
        usage={"completion_tokens": 2.5}, model="gpt-4o", path="/v1/chat/completions"
    )
    c = client(hostile, "sk-cut", max_retries=0)
    got = ""
    try:
        stream = c.chat.completions.create(
            model="gpt-4o",
            max_tokens=50,
            stream=True,
            messages=[{"role": "user", "content": "break at the end"}],
        )
        for chunk in stream:
            got += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    except openai.APIError:
        pass  # the proxy reports the error in the stream
    (served,) = hostile.new_requests(before)
    assert got and served.outcome == "ok"
    spent, reserved = hostile.ledger("key:cut-key")
    assert reserved == 0
    assert spent >= served.prompt_tokens + served.completion_tokens


# -- unit checks of the pieces (no proxy process) ------------------------------------------------


def test_scope_owner_is_the_team_else_the_key() -> None:
    """Client scopes are owned by the key's team, else by the key (alias, else hashed token)."""
    assert scope_owner(UserAPIKeyAuth(api_key="sk-1", key_alias="ci", team_id="t")) == "team:t"
    assert scope_owner(UserAPIKeyAuth(api_key="sk-1", key_alias="ci", user_id="u")) == "key:ci"
    hashed = UserAPIKeyAuth(api_key="sk-1")
    assert scope_owner(hashed) == f"key:{hashed.token}"


def test_client_scopes_are_namespaced_and_checked() -> None:
    """Each client scope is checked and suffixed with its owner; bad ones are dropped, the
    list never fails and never exceeds eight."""
    data = {
        "metadata": {"tb_scopes": [*BAD_SCOPE_ITEMS, " agent:planner ", "session:s1"]},
        "litellm_metadata": {"tb_scopes": "feature:f, agent:planner"},
        "proxy_server_request": {"headers": {"x-tb-scopes": "agent:b,org:o,agent:c@key:x"}},
    }
    assert client_scopes(data, owner="team:search") == [
        "agent:planner@team:search",
        "session:s1@team:search",
        "feature:f@team:search",
        "agent:b@team:search",
    ]
    assert client_scopes(data) == ["agent:planner", "session:s1", "feature:f", "agent:b"]
    for odd in (5, 1.5, {"agent:x": 1}, None, b"agent:x", True):
        assert client_scopes({"metadata": {"tb_scopes": odd}}, owner="team:t") == []
    many = {"metadata": {"tb_scopes": [f"agent:{i}" for i in range(10_000)]}}
    assert len(client_scopes(many, owner="team:t")) == 8
    junk_first = {"metadata": {"tb_scopes": ["bogus:x"] * 10_000 + ["agent:late"]}}
    assert client_scopes(junk_first, owner="team:t") == []
    assert client_scopes({"metadata": {"tb_scopes": ["agent:a"]}}, owner="team:" + "t" * 600) == []


@pytest.mark.parametrize(
    ("call_type", "field", "value", "error"),
    [
        ("acompletion", "max_tokens", -1, ValueError),
        ("acompletion", "max_tokens", MAX_CALL_TOKENS + 1, ValueError),
        ("acompletion", "max_tokens", 10**30, ValueError),
        ("acompletion", "max_tokens", 1.5, TypeError),
        ("acompletion", "max_tokens", 1e15, TypeError),
        ("acompletion", "max_tokens", float("nan"), TypeError),
        ("acompletion", "max_tokens", True, TypeError),
        ("acompletion", "max_tokens", "100", TypeError),
        ("acompletion", "max_completion_tokens", -1, ValueError),
        ("aresponses", "max_output_tokens", "x", TypeError),
        ("anthropic_messages", "max_tokens", -1, ValueError),
        ("atext_completion", "max_tokens", [], TypeError),
    ],
)
def test_request_view_refuses_a_bad_output_cap(
    call_type: str, field: str, value: Any, error: type[Exception]
) -> None:
    """A cap the guard cannot trust raises the guard's TypeError/ValueError naming the field."""
    data = {"model": "gpt-4o", "messages": [], "input": "x", "prompt": "x", field: value}
    with pytest.raises(error, match=field):
        request_view(call_type, data)


def test_request_view_reads_the_larger_of_two_chat_caps_and_clamps_both() -> None:
    """With max_tokens and max_completion_tokens both set the larger is reserved, and a clamp
    lowers both, so the provider cannot read a cap above the decision."""
    guard = BudgetGuard.from_dict(
        {"ledger": "memory://", "budgets": [{"scope": "user:u", "tokens": 100, "window": "day"}]}
    )
    data: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5000,
        "max_completion_tokens": 10,
    }
    view = request_view("acompletion", data)
    assert view is not None and (view.max_tokens, view.max_tokens_key) == (
        5000,
        "max_completion_tokens",
    )
    decision = guard.check("gpt-4o", view.messages, max_tokens=view.output_cap, scopes=["user:u"])
    assert decision.action == "clamp" and decision.max_tokens is not None
    apply_decision(data, view, decision)
    assert data["max_tokens"] == data["max_completion_tokens"] == decision.max_tokens < 100
    assert request_view("acompletion", {"model": "m", "max_tokens": None}) is not None


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": -5}, Usage(10, 0)),
        ({"prompt_tokens": -10, "completion_tokens": 5}, Usage(0, 5)),
        ({"prompt_tokens": "12", "completion_tokens": "x"}, Usage(12, 0)),
        ({"prompt_tokens": 3, "completion_tokens": None}, Usage(3, 0)),
        ({"prompt_tokens": 2.5, "completion_tokens": 1.2}, Usage(3, 2)),
        ({"prompt_tokens": 10**20, "completion_tokens": 1}, Usage(MAX_CALL_TOKENS, 1)),
        (
            {"prompt_tokens": float("nan"), "completion_tokens": float("inf")},
            Usage(0, MAX_CALL_TOKENS),
        ),
        ({"prompt_tokens": True, "completion_tokens": False}, Usage(0, 0)),
        (
            {
                "prompt_tokens": 5,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 99},
                "completion_tokens_details": {"reasoning_tokens": -1},
            },
            Usage(5, 5, cached_input_tokens=5),
        ),
        (
            {
                "input_tokens": -1,
                "output_tokens": 2,
                "cache_read_input_tokens": 10**20,
                "cache_creation_input_tokens": "x",
            },
            Usage(MAX_CALL_TOKENS, 2),
        ),
    ],
)
def test_usage_of_charges_odd_reports_safely(usage: dict[str, Any], expected: Usage) -> None:
    """Odd usage from the wire is read by Usage.reported: never raises, never negative or
    above the per-call maximum."""
    assert usage_of({"usage": usage}) == expected


def test_usage_of_without_an_input_count_is_no_usage() -> None:
    """A usage without an input count (null, missing, not an object) means the estimate."""
    for usage in (None, {}, {"prompt_tokens": None, "completion_tokens": 3}, "12", [1, 2]):
        assert usage_of({"usage": usage}) is None
    slo = {"standard_logging_object": {"prompt_tokens": -4, "completion_tokens": "9"}}
    assert usage_of({}, slo) == Usage(0, 9)


async def test_handler_holds_are_bound_to_their_own_request() -> None:
    """In the handler itself: a request that reuses another's call id, or copies its hold
    token into its metadata, neither settles nor releases that hold; each request settles
    only its own, and its headers are its own."""
    guard = BudgetGuard.from_dict(
        {"ledger": "memory://", "budgets": [{"scope": "key:k", "tokens": 1000, "window": "day"}]}
    )
    handler = TokenBudgetProxyHandler(guard)
    auth = UserAPIKeyAuth(api_key="sk-k", key_alias="k")
    msgs = [{"role": "user", "content": "hello"}]

    def request(**extra: Any) -> dict[str, Any]:
        return {"litellm_call_id": "same", "metadata": {}, "messages": msgs, **extra}

    first = request(model="gpt-4o", max_tokens=10)
    await handler.async_pre_call_hook(auth, None, first, "acompletion")
    token = first["metadata"][HOLD_KEY]
    assert isinstance(token, str) and len(token) == 32 and handler.holds == 1
    for thief in (
        request(),  # no model: not budgeted
        request(metadata={HOLD_KEY: token}),  # the live token, copied
        request(model="gpt-4o", max_tokens=-1, metadata={HOLD_KEY: token}),  # then a 400
    ):
        try:
            await handler.async_pre_call_hook(auth, None, thief, "acompletion")
        except Exception as exc:
            assert getattr(exc, "code", None) == "400"
        assert HOLD_KEY not in thief["metadata"]
        await handler.async_post_call_failure_hook(thief, RuntimeError("x"), auth)
        assert await handler.async_post_call_response_headers_hook(thief, auth, None) is None
        await handler.async_log_success_event({"litellm_params": thief}, {}, None, None)
    assert handler.holds == 1
    second = request(model="gpt-4o", max_tokens=20)
    await handler.async_pre_call_hook(auth, None, second, "acompletion")
    assert second["metadata"][HOLD_KEY] != token and handler.holds == 2
    headers = await handler.async_post_call_response_headers_hook(first, auth, None)
    assert headers is not None and headers["x-tb-decision"] == "allow"
    assert await handler.async_post_call_response_headers_hook(first, auth, None) is None
    response = {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    await handler.async_log_success_event({"litellm_params": first}, response, None, None)
    await handler.async_post_call_failure_hook(second, RuntimeError("upstream"), auth)
    assert handler.holds == 0
    st = next(s for s in guard.status("key:k") if s.unit == "tokens")
    assert (st.spent, st.reserved) == (10, 0)


def test_responses_route_carries_the_token_in_litellm_metadata() -> None:
    """Where OpenAI's own metadata goes upstream (Responses), the token rides in
    litellm_metadata and the client's metadata keeps only its own fields."""
    from tb_plugins.integrations.litellm_proxy import _carry_hold_token, _drop_hold_tokens

    data: dict[str, Any] = {
        "metadata": {"k": "v", HOLD_KEY: "forged"},
        "litellm_metadata": {HOLD_KEY: "forged", "requester_metadata": {HOLD_KEY: "f"}},
    }
    _drop_hold_tokens(data)
    _carry_hold_token(data, "t" * 32)
    assert data["metadata"] == {"k": "v"}
    assert data["litellm_metadata"] == {HOLD_KEY: "t" * 32, "requester_metadata": {}}
    plain: dict[str, Any] = {}
    _carry_hold_token(plain, "t")
    assert plain == {"metadata": {HOLD_KEY: "t"}}
