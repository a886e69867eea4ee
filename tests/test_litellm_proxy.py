"""The LiteLLM proxy plugin, proven against the real proxy process and the official openai client.

Two proxy processes sharing one SQLite ledger are started once for the module from
``examples/litellm_proxy/config.yaml`` and its ``custom_auth.py`` (upstream rewritten to a fake
OpenAI server in this process, policy and key table replaced by the test's own through
``TB_PLUGINS_CONFIG`` and ``TB_EXAMPLE_KEYS``); two more sharing a Redis ledger start only for
the Redis race. Every identity below is used by one test only, so tests share no budget.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tb_plugins import BudgetGuard, BudgetStatus, Usage, count_tokens
from tb_plugins.testing.fake_openai import FakeOpenAI, Served

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "litellm_proxy"
BOOT_TIMEOUT = 120.0
LEVELS = ("key", "user", "team")
ACTIONS = ("allow", "clamp", "downgrade", "deny")
RACE_K = 7
RACE_MAX_TOKENS = 20
RACE_MESSAGES = [{"role": "user", "content": "race for the last tokens"}]


def identity(level: str, action: str) -> dict[str, str]:
    """The key-table entry of the identity a (level, action) test uses."""
    return {
        "key_alias": f"{level}-{action}-key",
        "user_id": f"{level}-{action}-user",
        "team_id": f"{level}-{action}-team",
        "org_id": "acme",
    }


def scope_of(level: str, action: str) -> str:
    ident = identity(level, action)
    return {
        "key": f"key:{ident['key_alias']}",
        "user": f"user:{ident['user_id']}",
        "team": f"team:{ident['team_id']}",
    }[level]


def keys_table() -> dict[str, dict[str, str]]:
    keys = {f"sk-{lvl}-{act}": identity(lvl, act) for lvl in LEVELS for act in ACTIONS}
    for name in ("stream", "fail", "disconnect", "spoof", "race", "apis"):
        keys[f"sk-{name}"] = {
            "key_alias": f"{name}-key",
            "user_id": f"{name}-user",
            "team_id": f"{name}-team",
            "org_id": "acme",
        }
    keys["sk-victim"] = {
        "key_alias": "victim-key",
        "user_id": "victim",
        "team_id": "victim-team",
        "org_id": "acme",
    }
    return keys


def policy(ledger: str) -> dict[str, Any]:
    race_tokens = RACE_K * (count_tokens("gpt-4o", RACE_MESSAGES) + RACE_MAX_TOKENS)
    budgets: list[dict[str, Any]] = []
    for level in LEVELS:
        budgets += [
            {"scope": scope_of(level, "allow"), "tokens": 100_000, "window": "day"},
            {"scope": scope_of(level, "clamp"), "tokens": 300, "window": "day"},
            {
                "scope": scope_of(level, "downgrade"),
                "tokens": 100_000,
                "window": "day",
                "downgrade_at": 0.001,
            },
            {"scope": scope_of(level, "deny"), "tokens": 5, "window": "day"},
        ]
    budgets += [
        {"scope": "key:race-key", "tokens": race_tokens, "window": "day"},
        {"scope": "key:*", "tokens": 1_000_000, "window": "day"},
        {"scope": "team:*", "tokens": 1_000_000, "window": "day"},
        {"scope": "user:*", "tokens": 1_000_000, "window": "day"},
        {"scope": "agent:*", "tokens": 1_000_000, "window": "day"},
        {"scope": "session:*", "tokens": 1_000_000, "window": "day"},
    ]
    return {"ledger": ledger, "downgrade": {"gpt-4o": "gpt-4o-mini"}, "budgets": budgets}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proxy:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    fake: FakeOpenAI
    proxies: list[Proxy]
    guard: BudgetGuard
    upstream_keys: dict[str, str]
    dir: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.proxies[0].url

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, **kwargs)

    def tokens(self, scope: str) -> BudgetStatus:
        """The first ``tokens`` limit on ``scope`` (the test's own budget comes first)."""
        return next(s for s in self.guard.status(scope) if s.unit == "tokens")

    def settled(self, scope: str, *, timeout: float = 15.0) -> BudgetStatus:
        """The scope's token status once no hold is left on it (settlement is async)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.tokens(scope)
            if st.reserved == 0 or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def new_requests(self, before: int) -> list[Served]:
        return self.fake.requests[before:]


def start_proxy(config: Path, env: dict[str, str], log: Path) -> Proxy:
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "litellm.proxy.proxy_cli",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=config.parent,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return Proxy(f"http://127.0.0.1:{port}", process, log)


def wait_ready(proxy: Proxy) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            pytest.fail(
                f"the LiteLLM proxy exited with {proxy.process.returncode} during "
                f"boot; its log:\n{proxy.log_tail()}"
            )
        try:
            if httpx.get(proxy.url + "/health/liveliness", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(
        f"the LiteLLM proxy at {proxy.url} was not ready after {BOOT_TIMEOUT:.0f}s; "
        f"its log:\n{proxy.log_tail()}"
    )


def stop(proxy: Proxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.terminate()
        try:
            proxy.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.process.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The fake upstream, two proxies sharing one SQLite ledger, and a guard to read it."""
    tmp = tmp_path_factory.mktemp("proxy")
    fake = FakeOpenAI().start()
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    upstream_keys = {}
    for entry in config["model_list"]:
        entry["litellm_params"]["api_base"] = fake.base_url
        upstream_keys[entry["model_name"]] = entry["litellm_params"]["api_key"]
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
    proxies = [start_proxy(tmp / "config.yaml", env, tmp / f"proxy{i}.log") for i in (0, 1)]
    guard = BudgetGuard.from_config(budgets)
    try:
        for proxy in proxies:
            wait_ready(proxy)
        yield Stack(fake, proxies, guard, upstream_keys, tmp, env)
    finally:
        for proxy in proxies:
            stop(proxy)
        guard.close()
        fake.stop()


def counting_client(stack: Stack, key: str, **kwargs: Any) -> tuple[openai.OpenAI, list[str]]:
    """An openai client (default retries) and the list of requests it put on the wire."""
    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(str(r.url))]})
    return stack.client(key, http_client=http, **kwargs), sent


def tb_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-tb-")}


# -- allow / clamp / downgrade / deny, per key, user and team --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_allow_serves_the_request_and_charges_its_exact_usage(stack: Stack, level: str) -> None:
    """A request within its budget is served as asked and charged what the upstream reported."""
    client, _ = counting_client(stack, f"sk-{level}-allow")
    before = len(stack.fake.requests)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": f"allow {level}"}]
    )
    reply = raw.parse()
    (served,) = stack.new_requests(before)
    assert (served.model, served.max_tokens) == ("gpt-4o", 20)
    headers = tb_headers(raw.headers)
    assert headers["x-tb-decision"] == "allow"
    assert headers["x-tb-model-served"] == "gpt-4o"
    assert int(headers["x-tb-budget-remaining-tokens"]) == 100_000 - (served.prompt_tokens + 20)
    assert reply.usage is not None
    st = stack.settled(scope_of(level, "allow"))
    assert st.spent == served.prompt_tokens + served.completion_tokens == reply.usage.total_tokens


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_clamp_lowers_max_tokens_to_what_is_left(stack: Stack, level: str) -> None:
    """A request asking for more output than its budget has left is sent with max_tokens cut."""
    client, _ = counting_client(stack, f"sk-{level}-clamp")
    messages = [{"role": "user", "content": f"clamp {level}"}]
    before = len(stack.fake.requests)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=1000, messages=messages
    )
    (served,) = stack.new_requests(before)
    assert served.max_tokens == 300 - count_tokens("gpt-4o", messages)
    assert tb_headers(raw.headers) == {
        "x-tb-decision": "clamp",
        "x-tb-model-served": "gpt-4o",
        "x-tb-budget-remaining-tokens": "0",
    }
    st = stack.settled(scope_of(level, "clamp"))
    assert st.spent == served.prompt_tokens + served.completion_tokens <= 300


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_downgrade_is_served_by_the_cheaper_deployment(stack: Stack, level: str) -> None:
    """Past downgrade_at, a gpt-4o request is really served by the gpt-4o-mini deployment."""
    scope = scope_of(level, "downgrade")
    spend = stack.guard.check(
        "gpt-4o", [{"role": "user", "content": "x"}], max_tokens=200, scopes=[scope]
    )
    stack.guard.settle(spend, Usage(input_tokens=8, output_tokens=200))
    client, _ = counting_client(stack, f"sk-{level}-downgrade")
    before = len(stack.fake.requests)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": f"down {level}"}]
    )
    (served,) = stack.new_requests(before)
    assert served.model == "gpt-4o-mini"
    assert served.api_key == stack.upstream_keys["gpt-4o-mini"]  # its own deployment's key
    # The proxy restamps the body's model with the name the client asked for; the header
    # is how the client learns which model served it.
    assert raw.parse().model == "gpt-4o"
    headers = tb_headers(raw.headers)
    assert (headers["x-tb-decision"], headers["x-tb-model-served"]) == ("downgrade", "gpt-4o-mini")
    st = stack.settled(scope)
    assert st.spent == 208 + served.prompt_tokens + served.completion_tokens


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_deny_is_a_429_the_openai_client_does_not_retry(stack: Stack, level: str) -> None:
    """An exhausted budget answers 429 with x-should-retry: false and a body naming the
    budget; the openai client (default max_retries=2) sends it once, nothing goes upstream."""
    client, sent = counting_client(stack, f"sk-{level}-deny")
    assert client.max_retries == 2
    before = len(stack.fake.requests)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "deny"}]
        )
    assert len(sent) == 1
    assert stack.new_requests(before) == []
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-tb-decision"] == "deny"
    error = response.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert error["scope"] == scope_of(level, "deny")
    assert error["budget"] == f"{scope_of(level, 'deny')} 5 tokens/day"
    assert (error["unit"], error["spent"], error["limit"]) == ("tokens", 0, 5)
    assert error["resets_at"] > time.time()
    assert error["resets_at_iso"].endswith("+00:00")
    assert stack.tokens(scope_of(level, "deny")).reserved == 0


# -- streams, other APIs, failures -------------------------------------------------------------


@pytest.mark.slow
def test_stream_is_charged_the_usage_the_upstream_reported(stack: Stack) -> None:
    """A streamed completion is settled with the exact usage of the upstream's final chunk."""
    client, _ = counting_client(stack, "sk-stream")
    before = len(stack.fake.requests)
    stream = client.chat.completions.create(
        model="gpt-4o",
        max_tokens=30,
        stream=True,
        messages=[{"role": "user", "content": "stream something"}],
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    (served,) = stack.new_requests(before)
    assert served.stream and served.include_usage and served.completion_tokens == 30
    assert text
    st = stack.settled("key:stream-key")
    assert st.spent == served.prompt_tokens + served.completion_tokens


@pytest.mark.slow
def test_responses_messages_and_embeddings_are_budgeted(stack: Stack) -> None:
    """/v1/responses, /v1/messages and /v1/embeddings are checked (headers) and charged exactly."""
    client, _ = counting_client(stack, "sk-apis")
    total = 0
    before = len(stack.fake.requests)
    raw = client.responses.with_raw_response.create(
        model="gpt-4o", input="hello responses", max_output_tokens=20
    )
    assert tb_headers(raw.headers)["x-tb-decision"] == "allow"
    emb = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["one two", "three"]
    )
    assert tb_headers(emb.headers)["x-tb-model-served"] == "text-embedding-3-small"
    msg = httpx.post(
        stack.url + "/v1/messages",
        headers={"Authorization": "Bearer sk-apis"},
        json={
            "model": "gpt-4o",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hello messages"}],
        },
    )
    assert msg.status_code == 200, msg.text
    assert msg.headers["x-tb-decision"] == "allow"
    served = stack.new_requests(before)
    assert [s.path for s in served] == ["/v1/responses", "/v1/embeddings", "/v1/responses"]
    total = sum(s.prompt_tokens + s.completion_tokens for s in served)
    assert stack.settled("key:apis-key").spent == total


@pytest.mark.slow
def test_upstream_500_leaves_no_hold_and_charges_nothing(stack: Stack) -> None:
    """When every upstream attempt fails, the hold is released and nothing is charged."""
    client, _ = counting_client(stack, "sk-fail", max_retries=0)
    stack.fake.script(fail=500, times=None, model="gpt-4o")
    try:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "fail"}]
            )
    finally:
        stack.fake.reset()
    st = stack.settled("key:fail-key")
    assert (st.spent, st.reserved) == (0, 0)


@pytest.mark.slow
def test_client_disconnect_mid_stream_charges_only_what_was_streamed(stack: Stack) -> None:
    """A client that hangs up mid-stream leaves no hold; it is charged the prompt and the
    chunks the upstream had sent, nothing more."""
    client, _ = counting_client(stack, "sk-disconnect", max_retries=0)
    stack.fake.script(hang=float("inf"), after_chunks=3)
    before = len(stack.fake.requests)
    try:
        stream = client.chat.completions.create(
            model="gpt-4o",
            max_tokens=50,
            stream=True,
            messages=[{"role": "user", "content": "hang up on me"}],
        )
        seen = 0
        for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 3:
                break
        assert stack.tokens("key:disconnect-key").reserved > 0
        stream.close()
        stack.fake.wait_for(before + 1)
    finally:
        stack.fake.release()
    (served,) = stack.new_requests(before)
    assert (served.outcome, served.chunks) == ("disconnected", 3)
    st = stack.settled("key:disconnect-key")
    assert st.reserved == 0
    assert st.spent == served.prompt_tokens + served.completion_tokens


@pytest.mark.slow
def test_client_cannot_charge_another_team(stack: Stack) -> None:
    """Another team's id or scopes in metadata and headers are ignored: the key's own team
    and user pay; only agent:/session: scopes from the client are added, under the key's
    team."""
    client, _ = counting_client(stack, "sk-spoof")
    before = len(stack.fake.requests)
    client.chat.completions.create(
        model="gpt-4o",
        max_tokens=20,
        messages=[{"role": "user", "content": "spoof"}],
        extra_body={
            "metadata": {
                "team_id": "victim-team",
                "user_id": "victim",
                "tb_scopes": ["team:victim-team", "user:victim", "key:victim-key", "agent:planner"],
            }
        },
        extra_headers={
            "x-tb-scopes": "team:victim-team,org:other,session:s-1",
            "x-litellm-team-id": "victim-team",
        },
    )
    (served,) = stack.new_requests(before)
    used = served.prompt_tokens + served.completion_tokens
    assert stack.settled("team:spoof-team").spent == used
    assert stack.settled("user:spoof-user").spent == used
    assert stack.tokens("agent:planner@team:spoof-team").spent == used
    assert stack.tokens("session:s-1@team:spoof-team").spent == used
    for victim in ("team:victim-team", "user:victim", "key:victim-key"):
        assert (stack.tokens(victim).spent, stack.tokens(victim).reserved) == (0, 0)


@pytest.mark.slow
def test_litellm_session_header_is_the_run_s_session_scope(stack: Stack) -> None:
    """`x-litellm-trace-id` (LiteLLM's own session header) names the request's `session:`
    scope, under the key's team, so a `session:*` budget limits one client agent run."""
    client, _ = counting_client(stack, "sk-spoof")
    before = len(stack.fake.requests)
    client.chat.completions.create(
        model="gpt-4o",
        max_tokens=20,
        messages=[{"role": "user", "content": "one step of a run"}],
        extra_headers={"x-litellm-trace-id": "run-7"},
    )
    (served,) = stack.new_requests(before)
    used = served.prompt_tokens + served.completion_tokens
    assert stack.settled("session:run-7@team:spoof-team").spent == used


def test_session_headers_become_one_session_scope() -> None:
    """The explicit session header wins over the trace header; a name that may not be a
    client scope is dropped; no header, no session scope."""
    from tb_plugins.integrations.litellm_proxy import client_scopes

    both = {"x-litellm-session-id": "s-1", "x-litellm-trace-id": "t-1"}
    data = {"proxy_server_request": {"headers": both}}
    assert client_scopes(data, owner="key:k") == ["session:s-1@key:k"]
    bad = {"proxy_server_request": {"headers": {"x-litellm-trace-id": "a*b"}}}
    assert client_scopes(bad, owner="key:k") == []
    assert client_scopes({"proxy_server_request": {"headers": {}}}, owner="key:k") == []


# -- two proxies, one ledger -----------------------------------------------------------------


async def _race(urls: list[str], n: int) -> list[int]:
    clients = [
        openai.AsyncOpenAI(base_url=u + "/v1", api_key="sk-race", max_retries=0) for u in urls
    ]

    async def one(i: int) -> int:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o", max_tokens=RACE_MAX_TOKENS, messages=RACE_MESSAGES
            )
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()


@pytest.fixture(scope="module")
def redis_proxies(stack: Stack) -> Iterator[tuple[list[Proxy], BudgetGuard]]:
    """Two more proxies of the same config, sharing one Redis ledger (own key prefix)."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is not running on 127.0.0.1:6379 ({exc}); required under CI=true")
        pytest.skip(f"Redis is not running on 127.0.0.1:6379 ({exc})")
    prefix = f"tbtest-{secrets.token_hex(6)}"
    budgets = stack.dir / "budgets-redis.yaml"
    budgets.write_text(yaml.safe_dump(policy(f"redis://127.0.0.1:6379/15?prefix={prefix}")))
    env = {**stack.env, "TB_PLUGINS_CONFIG": str(budgets)}
    proxies = [
        start_proxy(stack.dir / "config.yaml", env, stack.dir / f"redis{i}.log") for i in (0, 1)
    ]
    guard = BudgetGuard.from_config(budgets)
    try:
        for proxy in proxies:
            wait_ready(proxy)
        yield proxies, guard
    finally:
        for proxy in proxies:
            stop(proxy)
        guard.close()
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=15)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.mark.slow
@pytest.mark.parametrize("ledger", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_two_proxies_sharing_one_ledger_admit_exactly_k(
    stack: Stack, ledger: str, request: pytest.FixtureRequest
) -> None:
    """50 concurrent requests from one key, split over two proxy processes sharing one ledger,
    against a budget that admits exactly K: exactly K are served, the rest get 429."""
    if ledger == "sqlite":
        proxies, guard = stack.proxies, stack.guard
    else:
        proxies, guard = request.getfixturevalue("redis_proxies")
    before = len(stack.fake.requests)
    codes = asyncio.run(_race([p.url for p in proxies], 50))
    assert codes.count(200) == RACE_K
    assert codes.count(429) == 50 - RACE_K
    assert len(stack.new_requests(before)) == RACE_K
    view = Stack(stack.fake, proxies, guard, stack.upstream_keys, stack.dir, stack.env)
    st = view.settled("key:race-key")
    expected = RACE_K * (count_tokens("gpt-4o", RACE_MESSAGES) + RACE_MAX_TOKENS)
    assert st.spent == st.limit == expected


# -- unit checks of the plugin's pieces (no proxy process) -----------------------------------


def test_identity_scopes_come_from_the_authenticated_key() -> None:
    """Scopes are built from the auth object: alias preferred, else the hashed token."""
    from litellm.proxy._types import UserAPIKeyAuth

    from tb_plugins.integrations.litellm_proxy import identity_scopes

    auth = UserAPIKeyAuth(
        api_key="sk-1", key_alias="ci", user_id="u", team_id="t", org_id="o", end_user_id="e"
    )
    assert identity_scopes(auth) == ["org:o", "team:t", "user:u", "key:ci", "end_user:e"]
    hashed = UserAPIKeyAuth(api_key="sk-1")
    assert identity_scopes(hashed) == [f"key:{hashed.token}"]


def test_client_scopes_keep_only_agent_session_and_feature() -> None:
    """Client-sent scopes of other kinds, malformed or beyond eight, are dropped."""
    from tb_plugins.integrations.litellm_proxy import client_scopes

    data = {
        "metadata": {"tb_scopes": ["agent:a", "team:x", "org:y", "nonsense", "feature:f"]},
        "litellm_metadata": {"tb_scopes": "session:s, user:z"},
        "proxy_server_request": {"headers": {"x-tb-scopes": "key:k,agent:a,agent:b"}},
    }
    assert client_scopes(data) == ["agent:a", "feature:f", "session:s", "agent:b"]
    many = {"metadata": {"tb_scopes": [f"agent:{i}" for i in range(20)]}}
    assert len(client_scopes(many)) == 8


def test_refusal_body_names_the_budget() -> None:
    """The 429's error object carries the refusal's scope, budget, spend, limit and reset."""
    from tb_plugins.errors import BudgetExceeded
    from tb_plugins.integrations.litellm_proxy import BudgetProxyException

    err = BudgetExceeded(
        scope="team:a",
        budget="team:a 10 tokens/day",
        unit="tokens",
        spent=10,
        limit=10,
        requested=3,
        resets_at=1_800_000_000.0,
    )
    exc = BudgetProxyException(err)
    body = exc.to_dict()
    assert exc.code == "429" and exc.headers["x-should-retry"] == "false"
    assert {k: body[k] for k in ("type", "reason", "scope", "spent", "limit")} == {
        "type": "budget_exceeded",
        "reason": "BudgetExceeded",
        "scope": "team:a",
        "spent": 10,
        "limit": 10,
    }
    assert body["resets_at_iso"] == "2027-01-15T08:00:00+00:00"
    json.dumps(body)


def test_guard_from_settings_needs_a_policy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without TB_PLUGINS_CONFIG or callback_settings the plugin refuses to run; the env
    variable wins over callback_settings."""
    import litellm

    from tb_plugins.errors import ConfigError
    from tb_plugins.integrations.litellm_proxy import guard_from_settings

    monkeypatch.delenv("TB_PLUGINS_CONFIG", raising=False)
    monkeypatch.setattr(litellm, "callback_settings", {}, raising=False)
    with pytest.raises(ConfigError, match="TB_PLUGINS_CONFIG"):
        guard_from_settings()
    good = tmp_path / "good.yaml"
    good.write_text("ledger: memory://\nbudgets: []\n")
    monkeypatch.setattr(
        litellm,
        "callback_settings",
        {"tb_plugins": {"config": str(tmp_path / "missing.yaml")}},
        raising=False,
    )
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        guard_from_settings()
    monkeypatch.setenv("TB_PLUGINS_CONFIG", str(good))
    assert guard_from_settings().policy.ledger == "memory://"


def test_the_proxy_says_in_one_line_which_policy_it_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loading the policy prints one line naming the file, the budgets, the ledger (its
    password hidden) and the fail mode."""
    from tb_plugins.integrations.litellm_proxy import guard_from_settings

    good = tmp_path / "good.yaml"
    good.write_text(
        "ledger: memory://\nbudgets:\n  - {scope: team:a, limit: 1k tokens/day}\n"
        "  - {scope: user:*, limit: 2k tokens/day}\n"
    )
    monkeypatch.setenv("TB_PLUGINS_CONFIG", str(good))
    guard_from_settings()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"tb_plugins: policy {good} loaded: 2 budgets, ledger memory://, fail_closed"
