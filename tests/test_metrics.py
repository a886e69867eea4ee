"""Prometheus metrics: the series equal the ledger, labels stay bounded, `tb metrics serve`
answers, and the LiteLLM proxy shows the series on its own /metrics."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import fnmatch
import json
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tb_plugins import BudgetGuard, Usage
from tb_plugins.errors import BudgetRefused, LedgerUnavailable
from tb_plugins.ledger import Ledger
from tb_plugins.metrics import OTHER_MODEL, BudgetCollector, register

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]

POLICY: dict[str, Any] = {
    "alerts": [],
    "downgrade": {"gpt-4o": "gpt-4o-mini"},
    "prices": {"my-local-model": {"input": "$1/1M", "output": "$2/1M"}},
    "budgets": [
        {"scope": "global", "tokens": 10**9, "window": "day"},
        {"scope": "team:search", "tokens": 1_000, "window": "day", "downgrade_at": 0.5},
        {"scope": "team:*", "tokens": 100_000, "window": "day"},
        {"scope": "user:*", "limit": "600 tokens/day"},
        {"scope": "user:*", "usd": 5, "window": "month"},
    ],
}


def samples(text: str) -> Samples:
    """Every sample of a scrape, by sample name, then by its sorted labels."""
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(registry: CollectorRegistry) -> Samples:
    return samples(generate_latest(registry).decode())


def workload(guard: BudgetGuard) -> dict[str, int]:
    """Allowed, clamped, downgraded and refused calls over two teams and three users, with
    cached tokens, an estimate-only settle and a model the policy prices; the actions taken."""
    taken: dict[str, int] = defaultdict(int)
    calls = [
        ("gpt-4o", ["team:search", "user:ann"], 100, 300, 3),
        ("gpt-4o", ["team:search", "user:bob"], 100, 400, 0),  # past 50 %: downgraded next
        ("gpt-4o", ["team:search", "user:bob"], 50, 50, 0),
        ("gpt-4o-mini", ["team:ads", "user:cid"], 100, 450, 10),
        ("gpt-4o-mini", ["team:ads", "user:cid"], 100, 400, 0),  # clamped to what is left
        ("gpt-4o-mini", ["team:ads", "user:cid"], 100, 400, 0),  # refused: user:cid is spent
        ("gpt-4o", ["team:search", "user:bob"], 2_000, 10, 0),  # refused: too large for bob
        ("my-local-model", ["team:ads", "user:dan"], 20, 20, 0),  # the policy's price
    ]
    for i, (model, scopes, inp, cap, cached) in enumerate(calls):
        try:
            d = guard.check(model=model, input_tokens=inp, max_tokens=cap, scopes=scopes)
        except BudgetRefused:
            taken["deny"] += 1
            continue
        taken[d.action] += 1
        if i == 2:
            guard.settle(d)  # no usage reported: the estimate is charged
        else:
            out = min(cap, d.max_tokens or cap) // 2
            guard.settle(d, Usage(inp, out, cached_input_tokens=cached, model=d.model))
    return dict(taken)


def label_of(
    guard: BudgetGuard, scope: str, budget_name: str, window: str, per_scope: tuple[str, ...]
) -> str:
    """The gauge's ``scope`` label: the pattern of a pattern budget, else the scope."""
    budgets = guard.planner.budgets
    b = next(b for b in budgets if b.name == budget_name and b.window.spec == window)
    own = any(fnmatch.fnmatchcase(scope, p) for p in per_scope)
    return b.pattern if b.is_pattern and not own else scope


def assert_equal_to_ledger(
    guard: BudgetGuard, got: Samples, *, decisions: bool = True, per_scope: tuple[str, ...] = ()
) -> None:
    by_model = {r.key: r for r in guard.usage(group_by="model")}
    assert by_model, "the workload charged nothing"
    for model, row in by_model.items():
        for kind, value in (
            ("input", row.input_tokens),
            ("output", row.output_tokens),
            ("cached", row.cached_input_tokens),
        ):
            assert got["tb_tokens_total"][(("kind", kind), ("model", model))] == value
        assert got["tb_cost_usd_total"][(("model", model),)] == pytest.approx(row.usd, rel=1e-12)
    assert len(got["tb_tokens_total"]) == 3 * len(by_model)

    if decisions:
        by_scope = {r.key: r for r in guard.usage(group_by="scope")}

        def counted(scope: str, actions: tuple[str, ...]) -> float:
            d = got["tb_decisions_total"]
            return sum(d.get((("action", a), ("scope", scope)), 0.0) for a in actions)

        admitted = ("allow", "clamp", "downgrade")
        for scope in ("global", "team:search"):
            assert counted(scope, admitted) == by_scope[scope].requests
            assert counted(scope, ("deny",)) == by_scope[scope].denied
        users = [r for k, r in by_scope.items() if k.startswith("user:")]
        assert counted("user:*", admitted) == sum(r.requests for r in users)
        assert counted("user:*", ("deny",)) == sum(r.denied for r in users)

    expected: dict[tuple[str, str, str, str], tuple[float, float]] = {}
    for s in guard.status():
        label = label_of(guard, s.scope, s.budget, s.window, per_scope)
        key = (label, s.budget, s.window, s.unit)
        seen = expected.get(key)
        util, left = s.utilization, s.remaining
        expected[key] = (util, left) if seen is None else (max(seen[0], util), min(seen[1], left))
    util_got = {
        (d["scope"], d["budget"], d["window"], d["unit"]): v
        for d, v in ((dict(k), v) for k, v in got["tb_budget_utilization"].items())
    }
    left_got = {
        (d["scope"], d["budget"], d["window"], d["unit"]): v
        for d, v in ((dict(k), v) for k, v in got["tb_budget_remaining"].items())
    }
    assert util_got == {k: v[0] for k, v in expected.items()}
    assert left_got == {k: v[1] for k, v in expected.items()}
    assert got["tb_ledger_up"][()] == 1.0


def test_series_equal_the_ledger_after_checks_settles_and_denials(ledger: Ledger) -> None:
    """After allowed, clamped, downgraded and refused calls, every token, cost and decision
    counter equals the ledger's usage log and every gauge equals `guard.status()` (a pattern
    budget's series holding its most used scope), on every ledger backend."""
    guard = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"}, ledger=ledger)
    registry = CollectorRegistry()
    register(guard, registry)
    taken = workload(guard)
    assert set(taken) == {"allow", "clamp", "downgrade", "deny"}, taken
    got = scrape(registry)
    assert_equal_to_ledger(guard, got)
    for action, n in taken.items():
        assert got["tb_decisions_total"][(("action", action), ("scope", "global"))] == n
    assert ("scope", "team:*") in {lab for k in got["tb_decisions_total"] for lab in k}


def test_ledger_counters_read_the_usage_log_of_every_process(tmp_path: Path) -> None:
    """With counters="ledger", a guard that made no call reports the tokens and cost other
    guards charged to the shared ledger, and no decision counter (the log keeps no action)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    worker = BudgetGuard.from_dict({**POLICY, "ledger": url})
    workload(worker)
    watcher = BudgetGuard.from_dict({**POLICY, "ledger": url})
    registry = CollectorRegistry()
    register(watcher, registry, counters="ledger")
    got = scrape(registry)
    assert_equal_to_ledger(watcher, got, decisions=False)
    assert "tb_decisions_total" not in got


def test_a_runtime_override_shows_at_the_next_scrape(tmp_path: Path) -> None:
    """A budget another guard sets on the shared ledger (`set_budget`) is in the next scrape:
    an override of one user is a series of its own, and the gauges still equal the ledger."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    worker = BudgetGuard.from_dict({**POLICY, "ledger": url})
    workload(worker)
    watcher = BudgetGuard.from_dict({**POLICY, "ledger": url})
    registry = CollectorRegistry()
    register(watcher, registry, counters="ledger")
    before = {dict(k)["scope"] for k in scrape(registry)["tb_budget_remaining"]}
    assert "user:ann" not in before
    worker.set_budget("user:ann", "50k tokens/day", reason="a test")
    got = scrape(registry)
    after = {dict(k)["scope"] for k in got["tb_budget_remaining"]}
    assert after == before | {"user:ann"}
    assert_equal_to_ledger(watcher, got, decisions=False)


def test_labels_stay_bounded_with_10000_users() -> None:
    """10,000 users under `user:*` and three teams asked for per scope make a fixed number
    of series: users aggregate under the pattern, the teams get one series each."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "budgets": [
                {"scope": "global", "tokens": 10**12, "window": "day"},
                {"scope": "team:*", "tokens": 10**9, "window": "day"},
                {"scope": "user:*", "limit": "100k tokens/day"},
            ],
        }
    )
    registry = CollectorRegistry()
    collector = register(guard, registry, per_scope=["team:*"])
    for i in range(10_000):
        d = guard.check(
            model="gpt-4o",
            input_tokens=10,
            max_tokens=10 + i % 50,
            scopes=[f"team:t{i % 3}", f"user:u{i}", f"session:s{i}"],
        )
        guard.settle(d, Usage(10, 5 + i % 50, model="gpt-4o"))
    got = scrape(registry)
    series = sum(len(v) for v in got.values())
    assert series <= 40, sorted(got)
    scopes = {dict(k)["scope"] for k in got["tb_decisions_total"]}
    assert scopes == {"global", "team:t0", "team:t1", "team:t2", "user:*", "session:*"}
    gauge_scopes = {dict(k)["scope"] for k in got["tb_budget_utilization"]}
    assert gauge_scopes == {"global", "team:t0", "team:t1", "team:t2", "user:*"}
    top = max(s.utilization for s in guard.status("user:u49"))
    users = ("budget", "user:* 100,000 tokens/day"), ("scope", "user:*")
    key = (*users, ("unit", "tokens"), ("window", "day"))
    assert got["tb_budget_utilization"][key] == pytest.approx(top, rel=1e-12)
    # the label memory is bounded too
    assert len(collector._scope_labels) <= 16384 and len(collector._path_labels) <= 16384


def test_models_past_max_models_count_as_other() -> None:
    """A process that sees more model names than `max_models` counts the rest as `_other`,
    so odd model names cannot grow the series without end; the totals still add up."""
    guard = BudgetGuard.from_dict(
        {
            "ledger": "memory://",
            "alerts": [],
            "unpriced": {"use_price": {"input": "$1/1M", "output": "$1/1M"}},
        }
    )
    registry = CollectorRegistry()
    register(guard, registry, max_models=3)
    for i in range(10):
        d = guard.check(model=f"model-{i}", input_tokens=10, max_tokens=10)
        guard.settle(d, Usage(10, 1))
    got = scrape(registry)
    models = {dict(k)["model"] for k in got["tb_tokens_total"]}
    assert models == {"model-0", "model-1", "model-2", OTHER_MODEL}
    assert got["tb_tokens_total"][(("kind", "input"), ("model", OTHER_MODEL))] == 70
    assert sum(v for k, v in got["tb_tokens_total"].items() if ("kind", "input") in k) == 100


def test_a_ledger_that_cannot_be_read_leaves_the_gauges_out_not_the_scrape() -> None:
    """When the ledger is down at scrape time the scrape still answers: the counters, no
    budget gauges, and `tb_ledger_up 0`."""
    guard = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"})
    registry = CollectorRegistry()
    register(guard, registry)
    workload(guard)

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise LedgerUnavailable("the ledger is down")

    guard.ledger.status = down  # type: ignore[method-assign]
    got = scrape(registry)
    assert got["tb_ledger_up"][()] == 0.0
    assert "tb_budget_utilization" not in got
    assert got["tb_tokens_total"] and got["tb_decisions_total"]


def test_unregister_stops_counting_and_frees_the_registry() -> None:
    """`collector.unregister()` removes the listener and the series; the registry then takes
    a new collector."""
    guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": []})
    registry = CollectorRegistry()
    collector = register(guard, registry)
    with pytest.raises(ValueError):
        register(guard, registry)  # one guard's series per registry
    collector.unregister()
    assert collector.on_event not in guard.listeners
    assert "tb_tokens_total" not in scrape(registry)
    register(guard, registry)


def test_missing_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without prometheus_client, `register` and `tb metrics serve` say which extra to
    install."""
    from tb_plugins.cli import main

    guard = BudgetGuard.from_dict({"ledger": "memory://", "alerts": []})
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'tb-plugins\[metrics\]'"):
        register(guard)
    assert main(["metrics", "serve", "--port", "0"]) == 1
    assert "pip install 'tb-plugins[metrics]'" in capsys.readouterr().err


def test_import_and_a_guard_cycle_load_neither_prometheus_client_nor_opentelemetry() -> None:
    """`import tb_plugins` and a check + settle load no prometheus_client, and no
    opentelemetry either (the span listener only looks for a tracer the app loaded)."""
    code = (
        "import sys, json\n"
        "from tb_plugins import BudgetGuard, Usage\n"
        "g = BudgetGuard.from_dict({'ledger': 'memory://', 'alerts': []})\n"
        "g.settle(g.check(model='gpt-4o', input_tokens=5, max_tokens=5), Usage(5, 5))\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "      if m.startswith(('prometheus_client', 'opentelemetry')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# -- tb metrics serve --------------------------------------------------------------------------


def read_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The process's next stdout line, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            break
    stderr = process.stderr.read() if process.stderr and process.poll() is not None else ""
    pytest.fail(f"no line from `tb metrics serve` within {timeout:.0f}s; stderr: {stderr}")


def test_tb_metrics_serve_answers_with_the_ledger(tmp_path: Path) -> None:
    """`tb metrics serve --port 0` prints its address, answers /metrics over HTTP on
    127.0.0.1 with the ledger's figures, and stops cleanly on SIGTERM."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = tmp_path / "budgets.yaml"
    config.write_text(yaml.safe_dump({**POLICY, "ledger": url}))
    guard = BudgetGuard.from_config(config)
    workload(guard)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "tb_plugins.cli", "metrics", "serve", "--port", "0"),
            *("--config", str(config), "--per-scope", "team:*"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(process)
        assert line.startswith("tb: serving http://127.0.0.1:"), line
        endpoint = line.split()[2]
        with urllib.request.urlopen(endpoint, timeout=30) as response:
            assert response.status == 200
            got = samples(response.read().decode())
        assert_equal_to_ledger(guard, got, decisions=False, per_scope=("team:*",))
        teams = {dict(k)["scope"] for k in got["tb_budget_remaining"]} - {"global", "user:*"}
        assert teams == {"team:search", "team:ads"}  # per scope, as asked
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        guard.close()


# -- the LiteLLM proxy ---------------------------------------------------------------------------


def test_expose_mounts_metrics_on_an_app_without_it() -> None:
    """On an ASGI app with no /metrics (the proxy without its prometheus callback), `expose`
    mounts one that serves the guard's series; called again it returns the same collector
    and mounts nothing more."""
    import httpx
    from fastapi import FastAPI

    from tb_plugins.integrations.litellm.metrics import expose

    guard = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"})
    app = FastAPI()
    registry = CollectorRegistry()
    collector = expose(guard, registry, app=app)
    assert isinstance(collector, BudgetCollector)
    assert expose(guard, registry, app=app) is collector
    assert [r for r in app.routes if getattr(r, "path", None) == "/metrics"]
    assert len([r for r in app.routes if getattr(r, "path", None) == "/metrics"]) == 1
    workload(guard)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://proxy", follow_redirects=True
        ) as client:
            return await client.get("/metrics")  # a mount, as the proxy's: -> /metrics/

    import asyncio

    response = asyncio.run(get())
    assert response.status_code == 200
    assert_equal_to_ledger(guard, samples(response.text))


def test_expose_leaves_an_existing_metrics_route_and_obeys_metrics_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the app already serves /metrics (the proxy's prometheus callback), `expose` only
    joins the registry; `callback_settings.tb_plugins.metrics: false` turns it off."""
    import litellm
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tb_plugins.integrations.litellm.metrics import expose

    app = Starlette(routes=[Route("/metrics", lambda _r: PlainTextResponse("theirs"))])
    guard = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"})
    registry = CollectorRegistry()
    assert expose(guard, registry, app=app) is not None
    assert len(app.routes) == 1
    assert "tb_ledger_up" in scrape(registry)

    other = BudgetGuard.from_dict({**POLICY, "ledger": "memory://"})
    monkeypatch.setattr(
        litellm, "callback_settings", {"tb_plugins": {"metrics": False}}, raising=False
    )
    assert expose(other, CollectorRegistry(), app=app) is None
    monkeypatch.setattr(
        litellm,
        "callback_settings",
        {"tb_plugins": {"metrics": {"per_scope": ["team:*"]}}},
        raising=False,
    )
    collector = expose(other, CollectorRegistry(), app=app)
    assert collector is not None and collector.per_scope == ("team:*",)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "litellm_proxy"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real LiteLLM proxy (the example config, upstream a fake OpenAI server) running
    `tb_plugins.integrations.litellm_proxy.proxy_handler` as its callback, nothing more."""
    from tb_plugins.testing.fake_openai import FakeOpenAI
    from test_litellm_proxy import start_proxy, stop, wait_ready

    tmp = tmp_path_factory.mktemp("metrics_proxy")
    fake = FakeOpenAI().start()
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    for entry in config["model_list"]:
        entry["litellm_params"]["api_base"] = fake.base_url
    callback = "tb_plugins.integrations.litellm_proxy.proxy_handler"
    assert callback in config["litellm_settings"]["callbacks"]
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(EXAMPLE / "custom_auth.py", tmp / "custom_auth.py")
    keys = {"sk-ann": {"key_alias": "ann-key", "user_id": "ann", "team_id": "search"}}
    (tmp / "keys.yaml").write_text(yaml.safe_dump(keys))
    budgets = tmp / "budgets.yaml"
    budgets.write_text(yaml.safe_dump({**POLICY, "ledger": f"sqlite:///{tmp / 'ledger.db'}"}))
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(16),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TB_PLUGINS_CONFIG": str(budgets),
        "TB_EXAMPLE_KEYS": str(tmp / "keys.yaml"),
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = start_proxy(tmp / "config.yaml", env, tmp / "proxy.log")
    guard = BudgetGuard.from_config(budgets)
    try:
        wait_ready(server)
        yield {"url": server.url, "guard": guard, "server": server}
    finally:
        stop(server)
        guard.close()
        fake.stop()


def proxy_metrics(url: str, key: str | None) -> tuple[int, str]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=30, follow_redirects=True)
    return response.status_code, response.text


@pytest.mark.slow
def test_the_proxy_shows_tb_series_on_its_own_metrics(proxy: dict[str, Any]) -> None:
    """A real proxy running `proxy_handler` (which calls `expose`) serves tb series on its /metrics
    (behind its API-key auth), and after a chat completion they equal its ledger."""
    import openai

    url, guard = proxy["url"], proxy["guard"]
    status, _ = proxy_metrics(url, None)
    assert status == 401, "the proxy's /metrics auth applies to the tb series too"
    status, text = proxy_metrics(url, "sk-ann")
    assert status == 200, proxy["server"].log_tail()
    assert "tb_ledger_up 1.0" in text

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-ann", max_retries=0)
    client.chat.completions.create(
        model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hello"}]
    )
    deadline = time.monotonic() + 30  # the proxy settles after it answered
    while True:
        got = samples(proxy_metrics(url, "sk-ann")[1])
        if got.get("tb_tokens_total") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got.get("tb_tokens_total"), proxy["server"].log_tail()
    assert guard.usage(group_by="model"), "the ledger has the call"
    assert_equal_to_ledger(guard, got)
    admitted = sum(v for k, v in got["tb_decisions_total"].items() if ("scope", "global") in k)
    assert admitted == 1
