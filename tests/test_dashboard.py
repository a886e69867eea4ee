"""`tb serve`: the dashboard's JSON equals what the guard reports, its errors are clear, and the
page, in a real headless Chromium, shows every budget, draws the spend, keeps hostile scope
names as text and follows new calls."""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tb_plugins import BudgetGuard, Usage
from tb_plugins._format import fmt_clock
from tb_plugins.cli import build_parser, main
from tb_plugins.dashboard import DEFAULT_HOST, DEFAULT_PORT, DashboardServer
from tb_plugins.dashboard.data import jsonable, pick_bucket
from tb_plugins.engine.decision import BudgetStatus
from tb_plugins.errors import BudgetExceeded

DAY = datetime(2026, 9, 22, tzinfo=timezone.utc).timestamp()  # a UTC midnight
HOSTILE = "user:<img src=x onerror=alert(1)>"
IN_CI = os.environ.get("CI", "").lower() == "true"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Seeded:
    """A SQLite ledger with a few calls, the guard that made them, and the policy."""

    guard: BudgetGuard
    clock: Clock
    policy: dict[str, Any]
    db: Path

    def call(self, scopes: list[str], input_tokens: int, output_tokens: int, cap: int = 10) -> str:
        """One call through the guard, a minute after the last; returns its decision."""
        self.clock.t += 60
        try:
            d = self.guard.check("gpt-4o", input_tokens=input_tokens, max_tokens=cap, scopes=scopes)
        except BudgetExceeded:
            return "deny"
        self.guard.settle(d, Usage(input_tokens, min(output_tokens, d.max_tokens or 0)))
        return d.action


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Seeded]:
    """team:search at 45 %, team:ops spent (a clamp, then a refusal), three users."""
    db = tmp_path / "ledger.db"
    policy: dict[str, Any] = {
        "ledger": f"sqlite:///{db}",
        "alerts": [],
        "budgets": [
            {"scope": "team:search", "limit": "1k tokens/day"},
            {"scope": "team:ops", "limit": "100 tokens/day"},
            {"scope": "user:*", "limit": "1k tokens/day"},
        ],
    }
    clock = Clock(DAY + 10 * 3600)
    seeded = Seeded(BudgetGuard.from_dict(policy, clock=clock), clock, policy, db)
    assert seeded.call(["team:search", "user:ann"], 190, 10) == "allow"
    assert seeded.call(["team:search", HOSTILE], 240, 10) == "allow"
    assert seeded.call(["team:ops", "user:bob"], 50, 200, cap=200) == "clamp"
    assert seeded.call(["team:ops", "user:bob"], 10, 10) == "deny"
    yield seeded
    seeded.guard.close()


@pytest.fixture
def server(seeded: Seeded) -> Iterator[DashboardServer]:
    """The dashboard of the seeded ledger on a free port, read by a guard of its own."""
    reader = BudgetGuard.from_dict(seeded.policy, clock=seeded.clock)
    srv = DashboardServer(reader, port=0).start()
    yield srv
    srv.stop()
    reader.close()


def get(server: DashboardServer, path: str, method: str = "GET", **headers: str) -> Any:
    """(status, headers, body as JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        body = r.read().decode()
        is_json = r.getheader("Content-Type", "").startswith("application/json")
        return r.status, r, json.loads(body) if is_json and body else body
    finally:
        conn.close()


# -- the JSON API ----------------------------------------------------------------------------


def test_status_api_is_the_guards_status(seeded: Seeded, server: DashboardServer) -> None:
    """/api/status holds `guard.status()` as `to_dict()` gives it, and the server's time."""
    status, _r, body = get(server, "/api/status")
    assert status == 200
    assert body["now"] == seeded.clock.t
    assert body["budgets"] == [s.to_dict() for s in seeded.guard.status()]
    by_scope = {b["scope"]: b["utilization"] for b in body["budgets"]}
    assert by_scope["team:search"] == 0.45 and by_scope["team:ops"] == 1.0
    status, _r, one = get(server, "/api/status?scope=team:ops")
    assert [b["scope"] for b in one["budgets"]] == ["team:ops"]


def test_usage_api_buckets_tops_and_totals_are_the_guards_usage(
    seeded: Seeded, server: DashboardServer
) -> None:
    """Each bucket of each series is `guard.usage()` over that minute; the top spenders and
    the totals are its rows over the period; the decisions are the log, newest first."""
    since = DAY + 10 * 3600
    status, _r, body = get(server, f"/api/usage?since={since:.0f}&bucket=1m")
    assert status == 200, body
    assert body["bucket"] == 60 and body["since"] == since and body["until"] is None
    assert body["buckets"] == [since + 60 * i for i in range(5)]
    for series in body["series"]:
        values = zip(body["buckets"], series["tokens"], series["usd"], strict=True)
        for start, tokens, usd in values:
            rows = seeded.guard.usage(since=start, until=start + 60, scope=series["scope"])
            row = next((r for r in rows if r.key == series["scope"]), None)
            assert tokens == (row.tokens if row else 0)
            assert usd == pytest.approx(row.usd if row else 0.0)
    rows = {r.key: r for r in seeded.guard.usage(since=since)}
    assert [s["scope"] for s in body["series"]][:2] == ["global", "team:search"]
    assert [t["key"] for t in body["top"]["scopes"]] == [
        "team:search", HOSTILE, "user:ann", "team:ops", "user:bob",
    ]  # fmt: skip
    assert [t["key"] for t in body["top"]["users"]] == [HOSTILE, "user:ann", "user:bob"]
    assert body["top"]["scopes"][0]["tokens"] == rows["team:search"].tokens == 450
    totals = body["totals"]
    assert (totals["requests"], totals["denied"], totals["tokens"]) == (3, 1, 550)
    assert totals["usd"] == pytest.approx(rows["global"].usd)
    log = seeded.guard.ledger.records(since=since)
    assert [d["reservation_id"] for d in body["decisions"]] == [
        r.reservation_id for r in reversed(log)
    ]
    assert [d["action"] for d in body["decisions"]] == ["deny", "clamp", "allow", "allow"]
    assert "team:ops" in body["decisions"][0]["note"] and body["decisions"][1]["note"] == ""


def test_the_decisions_timeline_holds_the_latest_records(
    seeded: Seeded, server: DashboardServer
) -> None:
    """`limit=2` gives the two newest records of the period, newest first."""
    _s, _r, body = get(server, "/api/usage?limit=2&bucket=10s")
    assert [d["action"] for d in body["decisions"]] == ["deny", "clamp"]


def test_without_since_the_period_starts_at_the_first_record_of_the_day(
    seeded: Seeded, server: DashboardServer
) -> None:
    """A ledger used for four minutes is charted over those minutes, in round buckets."""
    _s, _r, body = get(server, "/api/usage")
    first = seeded.guard.ledger.records(limit=1)[0].ts
    assert body["since"] == first
    assert body["bucket"] == pick_bucket(seeded.clock.t - first) == 5
    assert sum(body["series"][0]["tokens"]) == 550


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("/api/usage?since=yesterday", "since: cannot read the time 'yesterday'"),
        ("/api/usage?until=nan", "until: cannot read the time 'nan'"),
        ("/api/usage?since=1e400", "since: cannot read the time"),
        ("/api/usage?since=2026-09-22T12:00&until=2026-09-22T11:00", "must be before until"),
        ("/api/usage?bucket=soon", "bucket: not a duration"),
        ("/api/usage?bucket=0.5", "bucket must be at least 1s"),
        ("/api/usage?bucket=1s&since=7d", "above the maximum of 500"),
        ("/api/usage?limit=0", "limit must be a whole number from 1 to 500"),
        ("/api/usage?limit=9999", "limit must be a whole number from 1 to 500"),
        ("/api/usage?sinse=1h", "unknown parameter 'sinse'; known: since, until, bucket, limit"),
        ("/api/usage?since=1h&since=2h", "'since' is given more than once"),
        ("/api/status?scope=planet:mars", "unknown scope kind 'planet'"),
        ("/api/status?window=day", "unknown parameter 'window'"),
    ],
)
def test_a_bad_parameter_is_a_400_that_says_what_to_send(
    server: DashboardServer, query: str, words: str
) -> None:
    """Every parameter is checked; the answer is 400 with the reason as JSON `error`."""
    status, _r, body = get(server, query)
    assert status == 400
    assert words in body["error"]


def test_times_read_as_durations_dates_and_epochs(seeded: Seeded, server: DashboardServer) -> None:
    """`since`/`until` take a time ago, an ISO date or datetime (UTC, or with a zone) and
    epoch seconds; an empty value is the default."""
    now = seeded.clock.t
    for since, expected in [
        ("1h", now - 3600),
        ("2026-09-22", DAY),
        ("2026-09-22T08:00", DAY + 8 * 3600),
        ("2026-09-22T08:00Z", DAY + 8 * 3600),
        (f"{DAY:.0f}", DAY),
    ]:
        _s, _r, body = get(server, f"/api/usage?since={since}&until=&bucket=1h")
        assert body["since"] == expected, since


@pytest.mark.parametrize("path", ["/nope", "/api", "/api/nope", "/static/server.py", "/static/"])
def test_an_unknown_path_is_404(server: DashboardServer, path: str) -> None:
    """Only the page, its two assets and the two APIs exist."""
    status, _r, body = get(server, path)
    assert status == 404 and "no such page" in body["error"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_any_method_but_get_is_405(server: DashboardServer, method: str) -> None:
    """The dashboard is read-only: every other method is refused, with `Allow: GET`."""
    status, r, _body = get(server, "/api/status", method=method)
    assert status == 405 and r.getheader("Allow") == "GET"


def test_a_hostile_scope_is_data_and_the_page_is_static(
    seeded: Seeded, server: DashboardServer
) -> None:
    """A scope that is markup comes back exactly, as a JSON string (never in HTML); the page
    itself holds no ledger data, and its Content-Security-Policy allows no inline script."""
    _s, r, status = get(server, "/api/status")
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    assert HOSTILE in [b["scope"] for b in status["budgets"]]
    code, r, page = get(server, "/")
    assert code == 200 and r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "onerror" not in page and "team:search" not in page
    csp = r.getheader("Content-Security-Policy")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    script = get(server, "/static/dashboard.js")[2]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


def test_a_request_for_another_host_name_is_refused(server: DashboardServer) -> None:
    """On 127.0.0.1 the dashboard answers loopback names only, so a site whose DNS name
    points at 127.0.0.1 cannot read it from a browser."""
    assert get(server, "/api/status", Host="evil.example:8765")[0] == 403
    assert get(server, "/api/status", Host=f"localhost:{server.port}")[0] == 200
    assert get(server, "/api/status", Host=f"[::1]:{server.port}")[0] == 200


def test_an_infinite_utilization_is_null_in_json() -> None:
    """A suspended budget (limit 0) that was used has an infinite utilization: JSON has no
    number for it, so the API sends null (and the page shows ∞)."""
    s = BudgetStatus("team:a", "team:a 0 tokens/day", "day", "tokens", 5.0, 0.0, 0.0, 0.0,
                     float("inf"), None, None)  # fmt: skip
    out = jsonable({"budgets": [s.to_dict()]})
    assert out["budgets"][0]["utilization"] is None
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    "module", ["tb_plugins.dashboard", "tb_plugins.dashboard.data", "tb_plugins.dashboard.server"]
)
def test_doctests(module: str) -> None:
    """The examples in the dashboard's docstrings hold."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_the_page_and_its_assets_are_package_data() -> None:
    """Every file under dashboard/static is matched by pyproject's package-data, so a wheel
    carries the page (the server refuses to start without it)."""
    import tomllib  # the dev environment is Python 3.11+ (mypy's python_version)

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["tb_plugins"]
    package = root / "src" / "tb_plugins"
    static = sorted(p for p in (package / "dashboard" / "static").rglob("*") if p.is_file())
    assert {p.name for p in static} >= {"index.html", "dashboard.js", "dashboard.css"}
    for path in static:
        relative = path.relative_to(package)
        assert any(relative.match(pattern) for pattern in patterns), relative


# -- the page in a browser -------------------------------------------------------------------


def _browser_or_skip() -> tuple[str, str]:
    """The system's chromium and chromedriver; missing, the test skips, or fails under CI."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        message = f"the browser test needs {', '.join(missing)}"
        if IN_CI:
            pytest.fail(f"{message}; under CI=true it must run (.ci/run installs them)")
        pytest.skip(message)
    return chromium, driver


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with nothing downloaded: the driver and the
    browser are given by path, and Selenium Manager is told it is offline."""
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    """``probe()``'s first truthy value, checked until a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what} (last: {value!r})")
        time.sleep(0.05)


_SNAPSHOT = """
const text = (root, sel) => { const n = root.querySelector(sel); return n ? n.textContent : null; };
return {
  refreshes: Number(document.body.dataset.refreshes || 0),
  error: document.getElementById('error').hidden ? null : text(document, '#error'),
  budgets: [...document.querySelectorAll('#budgets tbody tr.budget')].map(tr => ({
    scope: text(tr, 'td.scope'), unit: tr.dataset.unit, pct: text(tr, '.pct'),
    forecast: text(tr, 'td.forecast'), width: tr.querySelector('.fill').style.width,
    level: tr.querySelector('.fill').className})),
  series: [...document.querySelectorAll('#chart svg path.series')].map(p => p.getAttribute('d')),
  dots: document.querySelectorAll('#chart svg circle').length,
  legend: [...document.querySelectorAll('#legend li .name')].map(n => n.textContent),
  decisions: [...document.querySelectorAll('#decisions tbody tr.decision')].map(tr =>
    [tr.dataset.action, text(tr, 'td.scopes')]),
  topScopes: [...document.querySelectorAll('#top-scopes tbody tr')].map(tr => text(tr, 'td.name')),
  topUsers: [...document.querySelectorAll('#top-users tbody tr')].map(tr => text(tr, 'td.name')),
  totals: Object.fromEntries([...document.querySelectorAll('#totals .tile')].map(
    t => [t.dataset.total, text(t, '.value')])),
  images: document.getElementsByTagName('img').length,
};
"""


def _expected_forecast(s: BudgetStatus, now: float) -> str:
    label = fmt_clock(s.forecast_exhausted_at, now)
    return label if label in ("-", "now") else f"{label} UTC"


def test_the_page_shows_every_budget_the_spend_and_follows_new_calls(
    seeded: Seeded, server: DashboardServer, browser: Any, tmp_path: Path
) -> None:
    """In headless Chromium: a row per budget with its utilization and forecast, a line per
    scope on the chart, the decisions and top spenders; the hostile scope is text, not an
    image; a new call shows within a refresh. A screenshot is left in tmp_path."""
    browser.get(server.url + "?refresh=0.5")
    page = wait_for("a first refresh", lambda: _loaded(browser, 1))
    assert page["error"] is None
    now = seeded.clock.t
    expected = {
        (s.scope, s.unit): (f"{round(s.utilization * 100)}%", _expected_forecast(s, now))
        for s in seeded.guard.status()
    }
    shown = {(b["scope"], b["unit"]): (b["pct"], b["forecast"]) for b in page["budgets"]}
    assert shown == expected
    assert shown[("team:search", "tokens")][0] == "45%"
    assert shown[("team:ops", "tokens")] == ("100%", "now")
    assert shown[("team:search", "tokens")][1].endswith(" UTC")  # on course to run out today
    levels = {b["scope"]: b["level"] for b in page["budgets"]}
    assert levels["team:ops"] == "fill full" and levels["team:search"] == "fill ok"
    # the chart: a line per scope drawn, with points where there was spend
    assert len(page["series"]) == len(page["legend"]) >= 2
    assert all(d and d.startswith("M") for d in page["series"]) and page["dots"] > 0
    assert page["legend"][:2] == ["global", "team:search"]
    assert [a for a, _s in page["decisions"]] == ["deny", "clamp", "allow", "allow"]
    assert page["topScopes"][:2] == ["team:search", HOSTILE]
    usd = next(r.usd for r in seeded.guard.usage() if r.key == "global")
    totals = {"requests": "3", "refused": "1", "tokens": "550", "USD": f"${usd:.4f}"}
    assert page["totals"] == totals
    # the hostile name is shown as the text it is, and nothing of it ran
    assert HOSTILE in [b["scope"] for b in page["budgets"]] and HOSTILE in page["topUsers"]
    assert page["images"] == 0
    _no_alert(browser)

    refreshes = page["refreshes"]
    assert seeded.call(["team:search", "user:ann"], 90, 10) == "allow"

    def updated() -> dict[str, Any] | None:
        p = _loaded(browser, refreshes + 1)
        shown = [(b["scope"], b["pct"]) for b in p["budgets"]] if p else []
        return p if ("team:search", "55%") in shown else None

    after = wait_for("team:search at 55 %", updated)
    assert after["decisions"][0] == ["allow", "team:search, user:ann"]
    assert after["totals"]["tokens"] == "650"
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, int(height) + 140)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def _loaded(browser: Any, refreshes: int) -> dict[str, Any] | None:
    page: dict[str, Any] = browser.execute_script(_SNAPSHOT)
    return page if page["refreshes"] >= refreshes else None


def _no_alert(browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check


# -- tb serve and tb demo --serve ------------------------------------------------------------


def _policy_file(seeded: Seeded, tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump(seeded.policy))
    return path


def _lines(stream: Any) -> queue.Queue[str]:
    """The lines of a child's stream, read in a thread (so a test can wait with a deadline)."""
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _url_from(lines: queue.Queue[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if line.startswith("tb dashboard on "):
            return line.split()[3]
    raise AssertionError(f"no dashboard address in {seen!r}")


def _interrupt(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=15)


def test_tb_serve_serves_the_policys_ledger_until_ctrl_c(seeded: Seeded, tmp_path: Path) -> None:
    """`tb serve --port 0` prints its address, answers there, and Ctrl-C (SIGINT) stops it
    with exit status 0 and no traceback."""
    config = _policy_file(seeded, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tb_plugins.cli", "serve", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    try:
        url = _url_from(_lines(proc.stdout), timeout=30)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/status", timeout=10) as r:
            scopes = {b["scope"] for b in json.load(r)["budgets"]}
        assert {"team:search", "team:ops", HOSTILE} <= scopes  # real time: spend is not today's
        assert _interrupt(proc) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tb_serve_on_a_busy_port_is_a_clear_error(
    seeded: Seeded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port already taken ends `tb serve` at once with status 1 and the reason."""
    config = _policy_file(seeded, tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--config", str(config)]) == 1
    assert f"tb: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_tb_serve_defaults_are_the_dashboards() -> None:
    """`tb serve` listens where the dashboard says by default: 127.0.0.1:8765."""
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 8765)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "70000"])


@pytest.mark.slow
def test_tb_demo_serve_serves_the_demos_ledger(tmp_path: Path) -> None:
    """`tb demo --serve --json` prints the demo's JSON, then serves the demo's ledger (its
    address on stderr) until Ctrl-C; the temporary ledger is gone afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tb_plugins.cli", "demo", "--serve", "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    try:
        url = _url_from(_lines(proc.stderr), timeout=120)
        with urllib.request.urlopen(url + "api/status", timeout=10) as r:
            status = json.load(r)
        with urllib.request.urlopen(url + "api/usage", timeout=10) as r:
            usage = json.load(r)
        assert "team:demo" in {b["scope"] for b in status["budgets"]}
        actions = {d["action"] for d in usage["decisions"]}
        assert {"allow", "downgrade", "clamp", "deny"} <= actions
        assert _interrupt(proc) == 0
        summary = json.loads(proc.stdout.read() if proc.stdout else "")
        assert summary["ledger_matches_server"] is True and summary["workdir"]
        assert not Path(summary["workdir"]).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
