"""Webhook and Slack alert sinks: delivery off the call path, retries, drops, payloads, policy;
four processes sharing a ledger send each alert once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tb_plugins import BudgetGuard, Usage
from tb_plugins.config import load_policy_dict
from tb_plugins.engine.alerts import Alert, SlackSink, WebhookSink
from tb_plugins.errors import ConfigError

T0 = 1_790_000_000.0  # 2026-09-21, a fixed instant
MSGS = [{"role": "user", "content": "hi"}]
WAIT = 5.0  # the most a test waits for a worker; it returns as soon as the worker is done


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script."""

    url: str
    answers: list[int]  # status codes to answer, in order; 200 once they run out
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    hang: threading.Event | None = None  # when set, the handler waits for it before answering


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="", answers=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.requests.append(
                {"path": self.path, "type": self.headers["Content-Type"], "json": json.loads(body)}
            )
            rec.arrived.set()
            if rec.hang is not None:
                rec.hang.wait(WAIT)
            status = rec.answers.pop(0) if rec.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield rec
    finally:
        if rec.hang is not None:
            rec.hang.set()
        server.shutdown()
        server.server_close()


def alert(threshold: float = 0.8) -> Alert:
    return Alert("team:search", "search daily", "day", threshold, 0.83, T0 + 3600, T0)


def guard(sinks: list[Any], **policy: Any) -> BudgetGuard:
    data: dict[str, Any] = {
        "ledger": "memory://",
        "alerts": [],
        # One alert per crossing: no forecast alert (tests/test_forecast_alerts.py has those).
        "budgets": [
            {
                "scope": "team:a",
                "tokens": 100,
                "window": "day",
                "alerts": [0.1],
                "forecast_alert": False,
            }
        ],
    }
    data.update(policy)
    return BudgetGuard.from_dict(data, clock=lambda: T0, alert_sinks=sinks)


def cross_threshold(g: BudgetGuard) -> tuple[float, int]:
    """Settle a call that crosses the 10% alert; return the settle's wall time and alerts."""
    d = g.check(model="gpt-4o", messages=MSGS, max_tokens=1, scopes=["team:a"])
    start = time.perf_counter()
    charge = g.settle(d, Usage(input_tokens=50, output_tokens=0))
    return time.perf_counter() - start, len(charge.alerts)


def test_a_webhook_alert_arrives_as_json(receiver: Receiver) -> None:
    """The alert crossing a threshold is POSTed once as JSON with its fields and message."""
    sink = WebhookSink(receiver.url)
    g = guard([sink])
    _, fired = cross_threshold(g)
    assert fired == 1
    assert sink.flush(WAIT)
    (req,) = receiver.requests
    assert req["path"] == "/hook" and req["type"] == "application/json"
    assert req["json"]["scope"] == "team:a" and req["json"]["threshold"] == 0.1
    assert "crossed 10%" in req["json"]["message"]
    assert (sink.sent, sink.failed, sink.dropped) == (1, 0, 0)


def test_server_errors_are_retried_with_exponential_backoff(receiver: Receiver) -> None:
    """Two 500s then a 200: the alert is delivered once, after backing off 0.5 s then 1 s."""
    receiver.answers = [500, 500]
    waits: list[float] = []
    sink = WebhookSink(receiver.url, retries=3, backoff=0.5, sleep=waits.append)
    sink(alert())
    assert sink.flush(WAIT)
    assert len(receiver.requests) == 3
    assert waits == [0.5, 1.0]
    assert (sink.sent, sink.failed, sink.dropped) == (1, 0, 0)


def test_429_is_retried_and_gives_up_after_the_retries(receiver: Receiver) -> None:
    """Too Many Requests is retried; when every attempt fails the alert is counted as failed."""
    receiver.answers = [429, 429, 429]
    waits: list[float] = []
    sink = WebhookSink(receiver.url, retries=2, backoff=0.25, sleep=waits.append)
    sink(alert())
    assert sink.flush(WAIT)
    assert len(receiver.requests) == 3 and waits == [0.25, 0.5]
    assert (sink.sent, sink.failed) == (0, 1)


def test_a_client_error_is_not_retried(receiver: Receiver, caplog: Any) -> None:
    """A 400 is final: one request, no backoff, failed counted and logged, nothing raised."""
    receiver.answers = [400]
    waits: list[float] = []
    sink = WebhookSink(receiver.url, sleep=waits.append)
    sink(alert())
    assert sink.flush(WAIT)
    assert len(receiver.requests) == 1 and waits == []
    assert (sink.sent, sink.failed) == (0, 1)
    assert "HTTP 400" in caplog.text and "/hook" not in caplog.text  # the path stays secret


def test_an_unreachable_receiver_is_retried_then_counted_as_failed() -> None:
    """A refused connection is retried like a 5xx and ends as one failure, never raised."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.server_close()  # nothing listens on the port now
    waits: list[float] = []
    sink = WebhookSink(url, retries=1, sleep=waits.append)
    sink(alert())
    assert sink.flush(WAIT)
    assert waits == [0.5] and (sink.sent, sink.failed) == (0, 1)


def test_a_hanging_receiver_does_not_slow_the_model_call(receiver: Receiver) -> None:
    """The settle that fires the alert returns at once while the receiver never answers."""
    receiver.hang = threading.Event()
    sink = WebhookSink(receiver.url, timeout=0.2, retries=0)
    g = guard([sink])
    elapsed, fired = cross_threshold(g)
    assert fired == 1
    assert elapsed < 0.5
    assert receiver.arrived.wait(WAIT)  # the worker is stuck on the receiver meanwhile
    assert sink.flush(WAIT)  # the POST's own timeout ends it
    assert (sink.sent, sink.failed) == (0, 1)


def test_a_full_queue_drops_the_alert_and_counts_it(receiver: Receiver, caplog: Any) -> None:
    """With one alert in flight and the queue full, the next alert is dropped with a warning."""
    receiver.hang = threading.Event()
    sink = WebhookSink(receiver.url, queue_size=1, retries=0)
    sink(alert(0.5))
    assert receiver.arrived.wait(WAIT)  # the worker holds the first alert
    sink(alert(0.8))  # queued
    sink(alert(1.0))  # no room
    assert sink.dropped == 1
    assert "queue full" in caplog.text
    receiver.hang.set()
    assert sink.flush(WAIT)
    assert [r["json"]["threshold"] for r in receiver.requests] == [0.5, 0.8]
    assert (sink.sent, sink.failed, sink.dropped) == (2, 0, 1)


def test_one_worker_thread_serves_every_alert_of_a_sink(receiver: Receiver) -> None:
    """Many alerts share the sink's single worker: no thread per alert."""

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "tb-alert-webhook"}

    sink = WebhookSink(receiver.url)
    before = workers()
    for i in range(20):
        sink(alert(0.05 * (i + 1)))
    assert len(workers() - before) == 1
    assert sink.flush(WAIT)
    assert sink.sent == 20 and len(receiver.requests) == 20


def test_the_slack_payload_is_text_plus_one_mrkdwn_section(receiver: Receiver) -> None:
    """Slack gets its incoming-webhook body naming budget, scope, use, threshold and reset."""
    sink = SlackSink(receiver.url)
    sink(Alert("team:<search>", "search & co", "day", 0.8, 0.83, T0 + 3600, T0))
    assert sink.flush(WAIT)
    (req,) = receiver.requests
    body = req["json"]
    assert set(body) == {"text", "blocks"}
    assert "\n" not in body["text"]
    (block,) = body["blocks"]
    assert block["type"] == "section" and block["text"]["type"] == "mrkdwn"
    text = block["text"]["text"]
    for part in (
        "search &amp; co",
        "team:&lt;search&gt;",
        "83% used",
        "crossed 80%",
        "resets 2026",
    ):
        assert part in text and part in body["text"]
    assert "<" not in text and sink.sent == 1


def test_the_policy_builds_a_slack_sink_and_close_flushes_it(receiver: Receiver) -> None:
    """`slack:` in the policy posts Slack's payload; guard.close() waits for it to be sent."""
    g = guard([], alerts=[{"slack": receiver.url, "timeout": "2s", "retries": 1}])
    _, fired = cross_threshold(g)
    assert fired == 1
    g.close()
    (req,) = receiver.requests
    assert set(req["json"]) == {"text", "blocks"}


def test_the_policy_accepts_slack_with_timeout_and_retries() -> None:
    """`{slack: URL, timeout, retries}` loads; log and webhook entries load as before."""
    policy = load_policy_dict(
        {
            "alerts": [
                {"log": "info"},
                {"webhook": "http://127.0.0.1:9000/hook"},
                {"slack": "https://hooks.slack.com/services/T/B/X", "timeout": "10s", "retries": 0},
            ]
        }
    )
    slack = policy.alerts[2]
    assert (slack.url, slack.timeout, slack.retries) == (
        "https://hooks.slack.com/services/T/B/X",
        10.0,
        0,
    )


BAD_SINKS = [
    ("two kinds", {"log": "info", "slack": "http://x"}, "exactly one of"),
    ("webhook and slack", {"webhook": "http://x", "slack": "http://y"}, "exactly one of"),
    ("no kind", {"timeout": 5}, "exactly one of"),
    ("slack not http", {"slack": "file:///etc/passwd"}, "field 'slack': expected an http(s) URL"),
    ("timeout above 60 s", {"webhook": "http://x", "timeout": 61}, "field 'timeout'"),
    ("timeout zero", {"slack": "http://x", "timeout": 0}, "field 'timeout'"),
    ("retries above 10", {"slack": "http://x", "retries": 11}, "field 'retries'"),
    ("retries negative", {"webhook": "http://x", "retries": -1}, "field 'retries'"),
    ("retries bool", {"webhook": "http://x", "retries": True}, "field 'retries'"),
    ("timeout on a log sink", {"log": "info", "timeout": 5}, "webhook and slack sinks only"),
]


@pytest.mark.parametrize(("case", "entry", "names"), BAD_SINKS, ids=[b[0] for b in BAD_SINKS])
def test_each_bad_alert_sink_is_refused_naming_the_entry(
    case: str, entry: dict[str, Any], names: str
) -> None:
    """A bad `alerts:` entry raises ConfigError naming the entry and what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_policy_dict({"alerts": [{"log": "info"}, entry]}, source="budgets.yaml")
    message = str(info.value)
    assert message.startswith("budgets.yaml: alerts[1]")
    assert names in message


def test_a_sink_refuses_a_url_that_is_not_http() -> None:
    """WebhookSink built in Python refuses other schemes as the policy does."""
    with pytest.raises(ValueError, match="http"):
        WebhookSink("file:///etc/passwd")


WORKER = textwrap.dedent(
    """
    import sys
    from tb_plugins import BudgetExceeded, BudgetGuard, Usage

    guard = BudgetGuard.from_config(sys.argv[1])
    for _ in range(12):
        try:
            d = guard.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=["team:a"])
        except BudgetExceeded:
            continue
        guard.settle(d, Usage(input_tokens=49, output_tokens=0))
    guard.close()  # flushes the webhook queue
    """
)


def test_four_processes_send_each_alert_once(receiver: Receiver, tmp_path: Path) -> None:
    """Thresholds 50 % and 80 % and the first refusal of a 1,000-token day budget, crossed by
    four processes racing on one ledger: exactly one POST each."""
    policy = {
        "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
        "alerts": [{"webhook": receiver.url}],
        "budgets": [
            {"scope": "team:a", "limit": "1k tokens/day", "alerts": [0.5, 0.8],
             "forecast_alert": False},
        ],
    }  # fmt: skip
    config = tmp_path / "budgets.yaml"
    config.write_text(yaml.safe_dump(policy))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen([sys.executable, str(script), str(config)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err.decode()
    sent = sorted((r["json"]["kind"], r["json"]["threshold"]) for r in receiver.requests)
    assert sent == [("exhausted", 1.0), ("threshold", 0.5), ("threshold", 0.8)]
    assert all(r["json"]["scope"] == "team:a" for r in receiver.requests)
    assert json.dumps(receiver.requests)  # every body was JSON


def _call_seconds(guard: BudgetGuard, calls: int) -> float:
    """Wall time of `calls` check + settle cycles that each cross a threshold."""
    start = time.perf_counter()
    for i in range(calls):
        d = guard.check(model="gpt-4o", input_tokens=1, max_tokens=1, scopes=[f"team:t{i}"])
        guard.settle(d, Usage(input_tokens=60, output_tokens=0))
    return time.perf_counter() - start


def test_a_hanging_or_failing_receiver_adds_nothing_to_call_latency(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Twenty calls that each fire an alert take no longer (within 50 ms in all) against a
    receiver that hangs or answers 500 than against no sink at all."""
    budgets = [{"scope": "team:*", "tokens": 100, "window": "day", "alerts": [0.5],
                "forecast_alert": False}]  # fmt: skip
    data = {"ledger": "memory://", "alerts": [], "budgets": budgets}
    baseline = min(_call_seconds(BudgetGuard.from_dict(data), 20) for _ in range(3))

    hanging = BudgetGuard.from_dict({**data, "alerts": [{"webhook": receiver.url, "retries": 0}]})
    receiver.hang = threading.Event()
    with_hang = _call_seconds(hanging, 20)
    receiver.hang.set()
    receiver.hang = None

    receiver.answers = [500] * 200
    failing = BudgetGuard.from_dict({**data, "alerts": [{"webhook": receiver.url, "retries": 1}]})
    with_500 = _call_seconds(failing, 20)
    assert with_hang < baseline + 0.05, (with_hang, baseline)
    assert with_500 < baseline + 0.05, (with_500, baseline)
    assert receiver.arrived.is_set()  # the sinks really were sending meanwhile
    hanging.close()
    failing.close()
