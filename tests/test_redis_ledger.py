"""What is particular to the Redis ledger: URL options, key layout and hash tag, one script per
operation, real expiry of holds, TTLs, error mapping and the asyncio client.

The ledger contract itself is proved by the conformance suite; the cross-process and failure
behaviours by ``test_shared_ledgers.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_server
from tb_plugins.core.usage import TOKENS, ZERO, add, amounts
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger import LineState, ledger_from_url
from tb_plugins.ledger.redis import RedisLedger
from test_shared_ledgers import (
    REDIS_DB,
    REDIS_HOST,
    REDIS_PORT,
    T0,
    TTL,
    Proxy,
    RedisServer,
    drop_redis_prefix,
    fresh_redis_prefix,
    make_line,
    private_redis,
    redis_url,
    usage_record,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the shared Redis, deleted afterwards."""
    yield from fresh_redis_prefix()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent Redis that the test can stop and restart."""
    yield from private_redis(tmp_path)


@pytest.fixture
def client() -> Iterator[Any]:
    """A plain redis-py client on the test database, to look at what the ledger wrote."""
    import redis

    c = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    yield c
    c.close()


@pytest.fixture
def ledger(redis_prefix: str) -> Iterator[RedisLedger]:
    led = ledger_from_url(redis_url(redis_prefix))
    assert isinstance(led, RedisLedger)
    yield led
    led.close()


def keys_of(client: Any, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{{tb:{prefix}}}*", count=1000))


# -- URL and options -----------------------------------------------------------------------------


def test_url_options_and_keywords_configure_the_ledger() -> None:
    """prefix, timeout, settled_ttl and usage_ttl come from the URL query, keywords win, and
    redis-py's own query options pass through."""
    led = ledger_from_url(
        "redis://:pw@127.0.0.1:6390/3?prefix=app1&timeout=250ms&usage_ttl=30d&client_name=x",
        settled_ttl="1d",
        timeout=1.5,
    )
    assert isinstance(led, RedisLedger)
    assert (led.prefix, led.key_prefix, led.timeout) == ("app1", "{tb:app1}", 1.5)
    assert (led.settled_ttl, led.usage_ttl) == (86_400, 30 * 86_400)
    assert led.where == "127.0.0.1:6390"
    assert "pw" not in led.url and "pw" not in repr(led)
    kwargs = led._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.5
    assert kwargs["client_name"] == "x" and kwargs["db"] == 3
    led.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://127.0.0.1/0", {"pool": 3}, "unknown option"),
        ("redis://127.0.0.1/0?prefix=a}b", {}, "prefix"),
        ("redis://127.0.0.1/0?timeout=soon", {}, "not a duration"),
        ("redis://127.0.0.1/0?no_such_option=1", {}, "unknown Redis option"),
    ],
)
def test_bad_options_are_refused_with_a_config_error(
    url: str, options: dict[str, Any], message: str
) -> None:
    """An unknown option, a prefix that would break the hash tag, or a bad duration is a
    ConfigError that says which."""
    with pytest.raises(ConfigError, match=message):
        ledger_from_url(url, **options)


# -- keys ----------------------------------------------------------------------------------------


def test_every_key_carries_the_hash_tag_so_one_ledger_is_one_cluster_slot(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """All keys of a ledger (lines, holds, settled ids, log, alerts) start with {tb:<prefix>}
    and hash to one Redis Cluster slot; no raw scope text appears in a key name."""
    from redis.crc import key_slot

    scope = "team:{evil} x"
    lines = [make_line(scope), make_line(scope, "rolling:1m"), make_line("global", "total")]
    ledger.reserve("r1", lines, amounts(5, 0, 0), now=T0, expires_at=T0 + TTL)
    ledger.settle("r1", lines, amounts(5, 0, 0), usage_record("r1", lines, amounts(5, 0, 0)),
                  now=T0)  # fmt: skip
    ledger.reserve("r2", lines, amounts(5, 0, 0), now=T0, expires_at=T0 + TTL)
    ledger.claim_alert("team|day|0.8", expires_at=T0 + 86_400)
    keys = keys_of(client, redis_prefix)
    assert len(keys) >= 8
    tag = f"{{tb:{redis_prefix}}}:".encode()
    assert all(k.startswith(tag) for k in keys)
    assert len({key_slot(k) for k in keys}) == 1
    assert not any(b"{evil}" in k or b" x" in k for k in keys)


def test_two_prefixes_on_one_server_are_two_separate_ledgers(
    redis_prefix: str,
) -> None:
    """Ledgers with different prefixes share nothing, even for the same scope."""
    ln = make_line("user:a", tokens=100)
    a = ledger_from_url(redis_url(redis_prefix))
    b = ledger_from_url(redis_url(redis_prefix + "-b"))
    try:
        assert a.reserve("r", [ln], amounts(100, 0, 0), now=T0, expires_at=T0 + TTL).ok
        assert b.reserve("r", [ln], amounts(100, 0, 0), now=T0, expires_at=T0 + TTL).ok
        assert b.status([ln], now=T0)[0].held[TOKENS] == 100
    finally:
        a.close()
        b.close()
        drop_redis_prefix(redis_prefix + "-b")


# -- scripts -------------------------------------------------------------------------------------


def _commands(admin: Any) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        for name, stat in admin.info("commandstats").items()
    }


def test_reserve_settle_and_release_are_one_script_call_each(
    own_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each ledger operation sends one command, EVALSHA (one round trip); after SCRIPT FLUSH
    the first call falls back to EVAL, which loads the script again."""
    import redis

    admin = redis.Redis(host="127.0.0.1", port=own_redis.port)
    led = ledger_from_url(redis_url("one", port=own_redis.port))
    assert isinstance(led, RedisLedger)
    lines = [make_line("global"), make_line("team:t", "rolling:1h"), make_line("user:u")]
    led.status(lines, now=T0)  # loads the script
    sent: list[str] = []
    real = led._client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(led._client, "execute_command", counting)
    admin.config_resetstat()
    led.reserve("r1", lines, amounts(10, 0, 0), now=T0, expires_at=T0 + TTL)
    led.settle("r1", lines, amounts(9, 0, 0), usage_record("r1", lines, amounts(9, 0, 0)),
               now=T0)  # fmt: skip
    led.reserve("r2", lines, amounts(10, 0, 0), now=T0, expires_at=T0 + TTL)
    led.release("r2", now=T0)
    led.status(lines, now=T0)
    assert sent == ["EVALSHA"] * 5
    assert _commands(admin).get("evalsha") == 5
    admin.script_flush()
    admin.config_resetstat()
    sent.clear()
    led.status(lines, now=T0)
    led.status(lines, now=T0)
    assert sent == ["EVALSHA", "EVAL", "EVALSHA"]
    led.close()
    admin.close()


def test_an_expired_hold_is_deleted_and_its_amount_subtracted(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """Once now passes a hold's expiry, the next touch of its line deletes the hold and takes
    its amount out of the line's held counter: nothing of it is left in Redis."""
    ln = make_line("user:a", tokens=100)
    key = f"{{tb:{redis_prefix}}}:l:{ln.key}"
    ledger.reserve("dead", [ln], amounts(70, 0, 0), now=T0, expires_at=T0 + 10)
    ledger.reserve("live", [ln], amounts(20, 0, 0), now=T0, expires_at=T0 + TTL)
    assert {b"H", b"rdead", b"rlive"} <= set(client.hkeys(key))
    assert ledger.status([ln], now=T0 + 10)[0].held[TOKENS] == 20
    assert b"rdead" not in client.hkeys(key)
    assert ledger.release("live", now=T0 + 10) is True
    assert set(client.hkeys(key)) <= {b"n", b"t"}  # no hold, no held counter left


def test_a_released_id_can_reserve_again_and_settles_once(ledger: RedisLedger) -> None:
    """Release then reserve with the same id (the guard does so when it downgrades) holds
    again, and its settle counts once."""
    ln = make_line("user:a", tokens=100)
    assert ledger.reserve("r", [ln], amounts(80, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert ledger.release("r", now=T0) is True
    assert ledger.reserve("r", [ln], amounts(30, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert ledger.status([ln], now=T0)[0].held[TOKENS] == 30
    rec = usage_record("r", [ln], amounts(25, 0, 0))
    assert ledger.settle("r", [ln], amounts(25, 0, 0), rec, now=T0).applied
    assert not ledger.settle("r", [ln], amounts(25, 0, 0), rec, now=T0).applied
    (state,) = ledger.status([ln], now=T0)
    assert state.spent[TOKENS] == 25 and state.held == ZERO


def test_a_reservation_retried_on_other_lines_leaves_no_hold_behind(
    ledger: RedisLedger,
) -> None:
    """Reserving an id again on other lines moves its hold there instead of holding twice."""
    a, b = make_line("user:a", tokens=100), make_line("user:b", tokens=100)
    assert ledger.reserve("r", [a], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert ledger.reserve("r", [b], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL).ok
    assert [s.held[TOKENS] for s in ledger.status([a, b], now=T0)] == [0, 60]


def test_a_rolling_line_keeps_only_the_buckets_its_window_reads(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """Settling into 200 successive one-second buckets of a rolling:1m line keeps at most the
    61 buckets the window reads (and sums exactly those)."""
    for i in range(200):
        ln = make_line("user:a", "rolling:1m", now=T0 + i)
        amt = amounts(1, 0, 0)
        ledger.settle(f"s{i}", [ln], amt, usage_record(f"s{i}", [ln], amt, ts=T0 + i),
                      now=T0 + i)  # fmt: skip
    key = f"{{tb:{redis_prefix}}}:l:{ln.key}"
    entries = len(client.hget(key, "C")) // (7 * 8)
    assert entries <= ln.span
    assert ledger.status([ln], now=T0 + 199)[0].spent[TOKENS] == ln.span


def test_settle_reads_back_exactly_the_watched_lines(ledger: RedisLedger) -> None:
    """settle(watch=...) returns the state of each watched line and None for every other line
    (the script neither computes nor sends those); watch=None reads them all."""
    a, b, c = make_line("team:a", tokens=100), make_line("user:b"), make_line("user:c", "hour")
    amt = amounts(7, 0, 0)
    lines = [a, b, c]
    assert ledger.reserve("r1", lines, amt, now=T0, expires_at=T0 + TTL).ok
    res = ledger.settle("r1", lines, amt, usage_record("r1", lines, amt), now=T0, watch=[1])
    spent = LineState(spent=amt, held=ZERO)
    assert res.applied and res.states == (None, spent, None)
    again = ledger.settle("r1", lines, amt, usage_record("r1", lines, amt), now=T0, watch=[2, 0])
    assert not again.applied and again.states == (spent, None, spent)
    none = ledger.settle("r2", lines, amt, usage_record("r2", lines, amt), now=T0, watch=[])
    assert none.applied and none.states == (None, None, None)
    every = ledger.settle("r3", lines, amt, usage_record("r3", lines, amt), now=T0)
    assert every.states == (LineState(spent=add(add(amt, amt), amt), held=ZERO),) * 3


def test_counters_expire_after_their_window_and_total_ones_never(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """A day line's key expires about a day after its bucket ends; a total line never
    expires; a settled id is remembered for settled_ttl."""
    day, total = make_line("user:a", "day"), make_line("user:a", "total")
    amt = amounts(1, 0, 0)
    ledger.settle("r", [day, total], amt, usage_record("r", [day, total], amt), now=T0)
    p = f"{{tb:{redis_prefix}}}"
    day_ttl = client.ttl(f"{p}:l:{day.key}")
    assert day.expires_at is not None
    assert day.expires_at - T0 + 86_000 < day_ttl <= day.expires_at - T0 + 86_401
    assert client.ttl(f"{p}:l:{total.key}") == -1
    assert 7 * 86_400 - 5 < client.ttl(f"{p}:s:r") <= 7 * 86_400


def test_usage_ttl_bounds_how_long_the_log_is_kept(redis_prefix: str, client: Any) -> None:
    """With usage_ttl, each day of the usage log expires that long after the day ends."""
    led = ledger_from_url(redis_url(redis_prefix, usage_ttl="2d"))
    ln = make_line("user:a")
    led.append_usage(usage_record("d", [ln], amounts(0, 0, 0)))
    ttl = client.ttl(f"{{tb:{redis_prefix}}}:log:2023-11-14")
    end_of_day = 1_700_006_400
    assert end_of_day - T0 + 2 * 86_400 - 5 < ttl <= end_of_day - T0 + 2 * 86_400
    led.close()


def test_scopes_forget_lines_whose_windows_ended_long_ago(ledger: RedisLedger) -> None:
    """scopes() lists a line until a day after its newest bucket stops being read."""
    old = make_line("user:old", "minute")
    amt = amounts(1, 0, 0)
    ledger.settle("a", [old], amt, usage_record("a", [old], amt), now=T0)
    assert ("user:old", "minute") in ledger.scopes()
    later = T0 + 2 * 86_400
    new = make_line("user:new", "minute", now=later)
    ledger.settle("b", [new], amt, usage_record("b", [new], amt, ts=later), now=later)
    assert ledger.scopes() == [("user:new", "minute")]


# -- errors and clocks ---------------------------------------------------------------------------


def test_a_foreign_value_under_a_ledger_key_is_a_ledger_error_not_unavailable(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """A Redis error reply (here WRONGTYPE) raises LedgerError naming the server, while
    connection trouble is LedgerUnavailable."""
    ln = make_line("user:a")
    client.set(f"{{tb:{redis_prefix}}}:l:{ln.key}", "not a hash")
    with pytest.raises(LedgerError, match=r"127\.0\.0\.1:6379") as err:
        ledger.status([ln], now=T0)
    assert not isinstance(err.value, LedgerUnavailable)
    assert err.value.__cause__ is not None


def test_server_time_is_redis_time(ledger: RedisLedger, client: Any) -> None:
    """server_time() reads TIME from Redis."""
    seconds, micros = client.time()
    assert abs(ledger.server_time() - (seconds + micros / 1e6)) < 1.0


def test_the_async_client_follows_the_running_event_loop(ledger: RedisLedger) -> None:
    """Async twins work from one event loop and then from another (a client per loop)."""
    ln = make_line("user:a", tokens=100)

    async def reserve(rid: str) -> bool:
        ok = (await ledger.areserve(rid, [ln], amounts(40, 0, 0), now=T0,
                                    expires_at=T0 + TTL)).ok  # fmt: skip
        assert await ledger.aserver_time() > 0
        return ok

    assert asyncio.run(reserve("a")) is True
    assert asyncio.run(reserve("b")) is True
    assert asyncio.run(reserve("c")) is False
    assert ledger.status([ln], now=T0)[0].held[TOKENS] == 80

    async def close() -> None:
        await ledger.aclose()

    asyncio.run(close())


# -- replies lost: reserve, settle ---------------------------------------------------------------


@pytest.fixture
def proxy(request: pytest.FixtureRequest) -> Iterator[Proxy]:
    """A TCP proxy in front of the shared Redis that a test can make lose replies."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    p = Proxy(REDIS_PORT)
    yield p
    p.close()


def test_a_reserve_whose_reply_was_lost_is_released_at_the_next_call(
    redis_prefix: str, proxy: Proxy
) -> None:
    """A reserve that reached Redis but whose reply never came (socket timeout) holds
    anyway; the ledger remembers its id and releases that phantom hold right after its next
    successful call, and a later settle or release of the id stays harmless."""
    ln = make_line("user:a", tokens=100)
    led = ledger_from_url(redis_url(redis_prefix, port=proxy.port, timeout="200ms"))
    direct = ledger_from_url(redis_url(redis_prefix))
    try:
        led.status([ln], now=T0)  # connected
        proxy.mode = "drop_replies"
        with pytest.raises(LedgerUnavailable):
            led.reserve("lost", [ln], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL)
        assert direct.status([ln], now=T0)[0].held[TOKENS] == 60  # it landed
        proxy.mode = "pass"
        led.status([ln], now=T0)  # the next call succeeds ...
        assert direct.status([ln], now=T0)[0].held == ZERO  # ... and the hold is gone
        assert led.reserve("next", [ln], amounts(100, 0, 0), now=T0, expires_at=T0 + TTL).ok
        assert led.release("lost", now=T0) is False
        rec = usage_record("lost", [ln], amounts(5, 0, 0))
        assert led.settle("lost", [ln], amounts(5, 0, 0), rec, now=T0).applied
        (state,) = direct.status([ln], now=T0)
        assert state.spent[TOKENS] == 5 and state.held[TOKENS] == 100
    finally:
        led.close()
        direct.close()


def test_a_reserve_retried_with_the_same_id_is_not_released_behind_its_back(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id whose reserve timed out and is then reserved again holds: being in use again,
    it is no longer an orphan, so no later call releases its new hold."""
    ln = make_line("user:a", tokens=100)
    _lose_replies(ledger, monkeypatch, "reserve", TimeoutError)
    with pytest.raises(LedgerUnavailable):
        ledger.reserve("r", [ln], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL)
    monkeypatch.undo()
    assert ledger.reserve("r", [ln], amounts(70, 0, 0), now=T0, expires_at=T0 + TTL).ok
    ledger.status([ln], now=T0)
    assert ledger.status([ln], now=T0)[0].held[TOKENS] == 70


def _lose_replies(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch, op: str, error: type[Exception]
) -> list[str]:
    """Make the next script call for ``op`` run on the server and then fail as if its reply
    were lost (``error`` raised after the reply was read); returns the log of ops seen."""
    import redis

    wanted = getattr(redis.exceptions, error.__name__)
    real = ledger._client.parse_response
    seen: list[str] = []
    sent: dict[str, str] = {}
    real_send = ledger._client._send_command_parse_response

    def send(conn: Any, command_name: str, *args: Any, **options: Any) -> Any:
        op_arg = args[4] if len(args) > 4 else ""  # EVALSHA sha 1 key op ...
        sent["op"] = op_arg.decode() if isinstance(op_arg, bytes) else str(op_arg)
        return real_send(conn, command_name, *args, **options)

    def parse(conn: Any, command_name: str, **options: Any) -> Any:
        reply = real(conn, command_name, **options)
        seen.append(sent.get("op", "?"))
        if sent.get("op") == op and seen.count(op) == 1:
            raise wanted("reply lost (simulated)")
        return reply

    monkeypatch.setattr(ledger._client, "_send_command_parse_response", send)
    monkeypatch.setattr(ledger._client, "parse_response", parse)
    return seen


def test_a_settle_retried_after_a_lost_reply_says_applied_and_counts_once(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a settle ran but its reply was lost and redis-py sent it again (a dropped
    connection), the retry recognizes its own earlier run: applied=True (so the guard's alerts
    fire), spend counted and logged once. A second settle call of the id still says False."""
    ln = make_line("user:a", tokens=100)
    amt = amounts(30, 0, 0)
    assert ledger.reserve("r", [ln], amt, now=T0, expires_at=T0 + TTL).ok
    seen = _lose_replies(ledger, monkeypatch, "settle", ConnectionError)
    result = ledger.settle("r", [ln], amt, usage_record("r", [ln], amt), now=T0)
    assert seen == ["settle", "settle"]  # ran twice: the first reply was lost
    assert result.applied is True
    assert result.states == (LineState(spent=amt, held=ZERO),)
    monkeypatch.undo()
    again = ledger.settle("r", [ln], amt, usage_record("r", [ln], amt), now=T0)
    assert again.applied is False
    assert ledger.status([ln], now=T0) == (LineState(spent=amt, held=ZERO),)
    assert len(ledger.records()) == 1


async def test_an_async_reserve_whose_reply_was_lost_is_released_at_the_next_call(
    ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twins do the same: an areserve that ran but timed out before its reply is
    released by the next successful async call."""
    import redis

    ln = make_line("user:a", tokens=100)
    client = ledger._async()
    real = client.evalsha
    calls: list[Any] = []

    async def evalsha(*args: Any) -> Any:
        reply = await real(*args)
        calls.append(args[3])
        if args[3] == "reserve" and len(calls) == 1:
            raise redis.exceptions.TimeoutError("reply lost (simulated)")
        return reply

    monkeypatch.setattr(client, "evalsha", evalsha)
    with pytest.raises(LedgerUnavailable):
        await ledger.areserve("lost", [ln], amounts(60, 0, 0), now=T0, expires_at=T0 + TTL)
    assert ledger.status([ln], now=T0)[0].held[TOKENS] == 60  # sync: not yet cleaned
    await ledger.astatus([ln], now=T0)
    assert (await ledger.astatus([ln], now=T0))[0].held == ZERO
    await ledger.aclose()


def test_a_sum_a_script_cannot_return_as_int64_is_a_ledger_error_writing_nothing(
    ledger: RedisLedger, redis_prefix: str, client: Any
) -> None:
    """A line whose stored sum passed 2**63 (more than the client lets one call add) makes
    status, reserve and settle fail with LedgerError "amount out of range" (a C cast would
    have wrapped it to a negative number), before the reserve or settle writes anything."""
    import struct

    ln = make_line("user:a", "total")
    amt = amounts(1, 0, 0)
    ledger.settle("s0", [ln], amt, usage_record("s0", [ln], amt), now=T0)
    key = f"{{tb:{redis_prefix}}}:l:{ln.key}"
    client.hset(key, "C", struct.pack("<7d", 0, 9.3e18, 1, 0, 0, 1, 1))
    before = client.hgetall(key)
    for op in (
        lambda: ledger.status([ln], now=T0),
        lambda: ledger.reserve("r1", [ln], amt, now=T0, expires_at=T0 + TTL),
        lambda: ledger.settle("s1", [ln], amt, usage_record("s1", [ln], amt), now=T0),
    ):
        with pytest.raises(LedgerError, match=r"amount out of range: a sum of 9\.3e\+18") as err:
            op()
        assert not isinstance(err.value, LedgerUnavailable)
    assert client.hgetall(key) == before
    assert not client.exists(f"{{tb:{redis_prefix}}}:s:s1", f"{{tb:{redis_prefix}}}:r:r1")
    assert len(ledger.records()) == 1


def test_amounts_past_2_53_are_refused_before_they_reach_the_script(ledger: RedisLedger) -> None:
    """The script adds doubles, exact up to 2**53: a larger amount is a LedgerError raised
    before anything is sent (not a silently rounded counter)."""
    ln = make_line("user:a", "total")
    with pytest.raises(LedgerError, match="amount out of range"):
        ledger.reserve("r", [ln], amounts(2**53 + 1, 0, 0), now=T0, expires_at=T0 + TTL)
    assert ledger.reserve("r", [ln], amounts(2**53 - 1, 0, 0), now=T0, expires_at=T0 + TTL).ok
