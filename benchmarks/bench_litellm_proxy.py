"""What ``proxy_handler`` costs the LiteLLM proxy: latency and throughput, with and without it.

Proxy processes from ``examples/litellm_proxy/config.yaml`` run side by side in the same
run, in front of the same fake upstream (its own process): one with the tb_plugins callback
(SQLite ledger, budgets on the key, user, team and org of every request), one without it.
Both use the example's custom auth, so the callback is the only difference. A third proxy
with a no-op callback defining the same hooks separates LiteLLM's own cost of running such a
callback from tb_plugins' work. Every request
sends a distinct ~1,000-token prompt (so token counting is never a cache hit) and asks for
16 output tokens. Rounds alternate between the proxies so drift hits all alike.

``--breakdown`` adds two proxies running ``proxy_handler`` with one part of its work replaced
by a stand-in that does nothing (the ledger's I/O; the token count), and prints how many
points of the throughput lost each part accounts for.

* latency: one request at a time, p50 and p99 of the round-trip seen by the client;
* throughput: ``--concurrency`` requests in flight, requests per second;
* CPU: during the throughput rounds, the CPU time the proxy process used per request served
  (all its threads, and its event loop's thread alone), read from ``/proc`` (Linux only): the
  work ``proxy_handler`` adds to each request, less noisy than requests per second, since the
  load generator and the fake upstream share the machine.

Only 127.0.0.1 is contacted; the number of requests is bounded by the options::

    python benchmarks/bench_litellm_proxy.py [--latency-requests 400]
        [--throughput-requests 2400] [--rounds 8] [--ledger URL] [--breakdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tb_plugins import count_tokens
from tb_plugins.testing.fake_openai import FakeOpenAIProcess

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "litellm_proxy"
KEY = "sk-bench"
NOOP = '''
from litellm.integrations.custom_logger import CustomLogger


class Noop(CustomLogger):
    """The hooks proxy_handler defines, doing nothing: LiteLLM's own cost of such a callback."""

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        return data

    async def async_post_call_response_headers_hook(
        self, data, user_api_key_dict, response, request_headers=None, litellm_call_info=None
    ):
        return {"x-noop": "1"}

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        pass

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        return None

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict, response, request_data
    ):
        async for item in response:
            yield item


noop_handler = Noop()
'''
# --breakdown: proxy_handler with one part of its work replaced by a stand-in that does
# nothing, to show what each part costs the proxy. Diagnostics only, never for real use.
BREAKDOWN = '''
import os

from tb_plugins import BudgetGuard
from tb_plugins.integrations.litellm_proxy import TokenBudgetProxyHandler
from tb_plugins.ledger.base import (LineState, ReserveResult, SettleResult)

ZERO = (0,) * 6


class NoLedgerIO:
    """Admits everything at once, writes nothing: the guard without ledger round trips."""

    url = "none://"

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def areserve(self, rid, lines, amounts, *, now, expires_at):
        return ReserveResult(True, tuple(LineState(ZERO, ZERO) for _ in lines))

    async def asettle(self, rid, lines, amounts, record, *, now, watch=None):
        return SettleResult(True, tuple(None for _ in lines))

    async def arelease(self, rid, *, now):
        return True


class FixedCount:
    """1,000 tokens for every request: the guard without token counting."""

    def count_messages(self, model, messages, tools=None):
        return 1000

    def count_text(self, model, text):
        return 1000

    def is_exact(self, model):
        return True


no_ledger = BudgetGuard.from_config(os.environ["TB_PLUGINS_CONFIG"])
no_ledger.ledger = NoLedgerIO(no_ledger.ledger)
no_ledger_handler = TokenBudgetProxyHandler(no_ledger)
no_count = BudgetGuard.from_config(os.environ["TB_PLUGINS_CONFIG"])
no_count.tokenizer = FixedCount()
no_count_handler = TokenBudgetProxyHandler(no_count)
'''
PARTS = {
    "handler, no ledger I/O": "breakdown.no_ledger_handler",
    "handler, no counting": "breakdown.no_count_handler",
}
BASE_TEXT = " ".join(
    f"Paragraph {i}: the quarterly report covers revenue, churn, hiring and the roadmap "
    f"for the search team, with notes on latency budgets and on-call load."
    for i in range(32)
)


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}. {BASE_TEXT}"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_configs(
    tmp: Path, upstream: str, ledger: str, breakdown: bool = False
) -> dict[str, Path]:
    """The proxy configs (three, five with ``breakdown``), and their policy and key table."""
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    for entry in config["model_list"]:
        entry["litellm_params"]["api_base"] = upstream
    bare = {k: v for k, v in config.items() if k not in ("litellm_settings", "callback_settings")}
    noop = {**bare, "litellm_settings": {"callbacks": ["noop.noop_handler"]}}
    variants = [
        ("without proxy_handler", bare),
        ("no-op callback", noop),
        ("with proxy_handler", config),
    ]
    if breakdown:
        variants += [
            (name, {**bare, "litellm_settings": {"callbacks": [target]}})
            for name, target in PARTS.items()
        ]
    configs = {}
    for name, cfg in variants:
        d = tmp / name.replace(" ", "-").replace(",", "").replace("/", "")
        d.mkdir()
        shutil.copy(EXAMPLE / "custom_auth.py", d / "custom_auth.py")
        (d / "noop.py").write_text(NOOP)
        (d / "breakdown.py").write_text(BREAKDOWN)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        configs[name] = d / "config.yaml"
    (tmp / "keys.yaml").write_text(
        yaml.safe_dump(
            {
                KEY: {
                    "key_alias": "bench",
                    "user_id": "bench-user",
                    "team_id": "bench-team",
                    "org_id": "bench-org",
                }
            }
        )
    )
    policy = {
        "ledger": ledger or f"sqlite:///{tmp / 'ledger.db'}",
        "budgets": [
            {"scope": "org:*", "limit": "10B tokens/month"},
            {"scope": "team:*", "limit": "1B tokens/day"},
            {"scope": "user:*", "limit": "1B tokens/day"},
            {"scope": "key:*", "limit": "100M tokens/rolling:1m"},
        ],
    }
    (tmp / "budgets.yaml").write_text(yaml.safe_dump(policy))
    return configs


def start_proxy(config: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = config.parent / "proxy.log"
    proc = subprocess.Popen(
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
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"proxy exited during boot; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health/liveliness", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"proxy at {url} not ready after 120s; log:\n{log.read_text()[-3000:]}")


class Counter:
    """Request numbers (each request gets a distinct prompt) and the errors seen per proxy."""

    def __init__(self) -> None:
        self.i = 0
        self.errors: dict[str, list[str]] = {}

    def next(self) -> int:
        self.i += 1
        return self.i


async def one(client: httpx.AsyncClient, url: str, c: Counter) -> float | None:
    """One request's round trip in seconds, or None (recorded in ``c.errors``) if not a 200."""
    body = {"model": "gpt-4o", "max_tokens": 16, "messages": prompt(c.next())}
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        c.errors.setdefault(url, []).append(f"{r.status_code}: {r.text[:300]}")
        return None
    return elapsed


async def latency_round(client: httpx.AsyncClient, url: str, n: int, c: Counter) -> list[float]:
    times = [await one(client, url, c) for _ in range(n)]
    return [t for t in times if t is not None]


async def throughput_round(
    client: httpx.AsyncClient, url: str, n: int, concurrency: int, c: Counter
) -> tuple[int, float]:
    """Requests answered 200 and the seconds it took, ``concurrency`` in flight."""
    queue = list(range(n))
    ok = 0

    async def worker() -> None:
        nonlocal ok
        while queue:
            queue.pop()
            elapsed = await one(client, url, c)  # not `ok += await ...`: that loses updates
            ok += elapsed is not None

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, time.perf_counter() - t0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by process ``pid`` and by its main thread;
    NaN where ``/proc`` cannot tell (not Linux)."""

    def read(path: str) -> float:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / _TICK

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(
    urls: dict[str, str], pids: dict[str, int], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    limits = httpx.Limits(
        max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    c = Counter()
    lat: dict[str, list[float]] = {name: [] for name in urls}
    thr: dict[str, list[tuple[int, float]]] = {name: [] for name in urls}
    cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in urls}  # process, main thread
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=60) as client:
        for url in urls.values():  # warm up both (imports, connection pools, SQLite)
            await latency_round(client, url, args.warmup, c)
            await throughput_round(client, url, args.warmup, args.concurrency, c)
        rounds = args.rounds
        for _ in range(rounds):
            for name, url in urls.items():
                lat[name] += await latency_round(client, url, args.latency_requests // rounds, c)
        for _ in range(rounds):
            for name, url in urls.items():
                before = cpu_seconds(pids[name])
                thr[name].append(
                    await throughput_round(
                        client, url, args.throughput_requests // rounds, args.concurrency, c
                    )
                )
                after = cpu_seconds(pids[name])
                cpu[name][0] += after[0] - before[0]
                cpu[name][1] += after[1] - before[1]
    out = {}
    for name in urls:
        done = sum(n for n, _ in thr[name])
        secs = sum(t for _, t in thr[name])
        out[name] = {
            "rounds_rps": [n / t for n, t in thr[name]],
            "errors": len(c.errors.get(urls[name], [])),
            "first_error": (c.errors.get(urls[name]) or [""])[0],
            "p50": pct(lat[name], 0.50) * 1e3,
            "p99": pct(lat[name], 0.99) * 1e3,
            "mean": statistics.fmean(lat[name]) * 1e3,
            "rps": done / secs,
            "cpu": cpu[name][0] / done * 1e3,  # ms per request served
            "cpu_main": cpu[name][1] / done * 1e3,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency-requests", type=int, default=400)
    parser.add_argument("--throughput-requests", type=int, default=2400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=8, help="rounds per measure; proxies alternate within each"
    )
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument(
        "--ledger", default="", help="ledger URL (default: a fresh SQLite file), e.g. memory://"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also run proxy_handler without ledger I/O and without counting (diagnostics)",
    )
    args = parser.parse_args()

    tokens = count_tokens("gpt-4o", prompt(1))
    upstream = FakeOpenAIProcess.spawn()
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    procs = []
    try:
        configs = write_configs(tmp, upstream.base_url, args.ledger, args.breakdown)
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": "sk-" + secrets.token_hex(16),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "TB_PLUGINS_CONFIG": str(tmp / "budgets.yaml"),
            "TB_EXAMPLE_KEYS": str(tmp / "keys.yaml"),
            "NO_PROXY": "127.0.0.1,localhost",
        }
        started = {name: start_proxy(cfg, env) for name, cfg in configs.items()}
        procs = [p for p, _, _ in started.values()]
        for proc, url, log in started.values():
            wait_ready(proc, url, log)
        urls = {name: url for name, (_, url, _) in started.items()}
        print(
            f"prompt ~{tokens} tokens, 16 output tokens, {args.latency_requests} sequential "
            f"requests per proxy for latency, {args.throughput_requests} at concurrency "
            f"{args.concurrency} for throughput; ledger {args.ledger or 'sqlite (temp file)'}; "
            f"{os.cpu_count()} CPUs"
        )
        pids = {name: proc.pid for name, (proc, _, _) in started.items()}
        res = asyncio.run(run(urls, pids, args))
        served = len(upstream.requests)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base, noop, tb = (
        res[k] for k in ("without proxy_handler", "no-op callback", "with proxy_handler")
    )
    print()
    print(
        f"{'':24} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>8} {'cpu ms':>7} "
        f"{'loop ms':>7} {'errors':>7}"
    )
    for name, r in res.items():
        print(
            f"{name:24} {r['p50']:8.2f} {r['p99']:8.2f} {r['mean']:8.2f} {r['rps']:8.1f} "
            f"{r['cpu']:7.2f} {r['cpu_main']:7.2f} {r['errors']:7d}"
        )
    d50, d99 = tb["p50"] - base["p50"], tb["p99"] - base["p99"]
    lost = (1 - tb["rps"] / base["rps"]) * 100
    print(
        f"{'added by proxy_handler':24} {d50:+8.2f} {d99:+8.2f} "
        f"{tb['mean'] - base['mean']:+8.2f} {-lost:+7.1f}% {tb['cpu'] - base['cpu']:+7.2f} "
        f"{tb['cpu_main'] - base['cpu_main']:+7.2f}"
    )
    own_lost = (1 - tb["rps"] / noop["rps"]) * 100
    # Each round runs the proxies back to back: the loss within a round is free of drift.
    paired = sorted(
        (1 - t / b) * 100 for t, b in zip(tb["rounds_rps"], base["rounds_rps"], strict=True)
    )
    paired_median = statistics.median(paired)
    print(
        f"{'  of which tb_plugins':24} {tb['p50'] - noop['p50']:+8.2f} "
        f"{tb['p99'] - noop['p99']:+8.2f} {tb['mean'] - noop['mean']:+8.2f} {-own_lost:+7.1f}% "
        f"{tb['cpu'] - noop['cpu']:+7.2f} {tb['cpu_main'] - noop['cpu_main']:+7.2f}"
    )
    print(
        f"throughput lost per round (paired, {len(paired)} rounds): median {paired_median:.1f}%,"
        f" range {paired[0]:.1f}% to {paired[-1]:.1f}%"
    )
    print()
    print(
        f"target: <= 1 ms added at p50: {'met' if d50 <= 1.0 else 'MISSED'} ({d50:+.2f} ms); "
        f"<= 5% throughput lost: {'met' if lost <= 5.0 else 'MISSED'} ({lost:.1f}% overall, "
        f"{paired_median:.1f}% median of paired rounds)"
    )
    if args.breakdown:
        parts = ", ".join(
            f"{name.removeprefix('handler, ')}: {(1 - res[name]['rps'] / base['rps']) * 100:.1f}%"
            for name in PARTS
        )
        print(f"throughput lost by proxy_handler {lost:.1f}%; with one part stubbed out: {parts}")
    print(f"upstream served {served} requests")
    for name, r in res.items():
        if r["errors"]:
            print(f"{name}: {r['errors']} requests failed, e.g. {r['first_error']}")


if __name__ == "__main__":
    main()
