"""The Redis ledger: one Redis (or one Redis Cluster slot) shared by every host.

``redis://[[user]:password@]host:port/db`` or ``rediss://…`` (TLS). Options, in the URL query or
as keywords: ``prefix`` (the ledger's namespace, default ``tb``), ``timeout`` (seconds, default
2), ``settled_ttl`` (how long a settled id is remembered, default ``7d``) and ``usage_ttl`` (how
long the usage log is kept, default forever). Other query options go to redis-py unchanged
(e.g. ``?client_name=proxy-1``).

**Atomicity.** A reservation across every budget of every scope of a call is one Lua script
(``lua/ledger.lua``, sent with ``EVALSHA``, or ``EVAL`` when the server lost its script cache):
one round trip, all lines held or none. Settle and release are scripts too, idempotent by
reservation id for ``settled_ttl`` (a settled id is remembered that long). Each line keeps a
held counter (the sum of its live holds) and each hold with its expiry; once a hold's expiry
passes, the next reserve, settle or status that touches the line deletes it and subtracts its
amount from the held counter, so the hold of a process that died really returns after its TTL.
A settle that comes after the hold expired still records the spend, and reads back (and
sends) only the states of the lines it is asked to ``watch``.

**Durability.** The ledger is exactly as durable as the Redis server's persistence settings.
A Redis started with ``--save ""`` and ``--appendonly no`` keeps the ledger in memory only:
a restart or crash of that server loses every counter, hold and usage record, and budgets start
again from zero. With RDB snapshots (``save``) a crash loses the writes since the last
snapshot; with ``appendonly yes`` and ``appendfsync everysec`` (the usual production setting)
it loses at most about one second of writes; ``appendfsync always`` loses none, at the cost of
an fsync per write. A replica that is promoted after a failover may miss the last writes that
had not reached it. Use PostgreSQL (``postgresql://``) when the spend record must survive
anything the database survives.

**Memory.** Counters and holds take a few hundred bytes per line. The usage log lives in
Redis memory too: each settled call keeps its record (about 0.4 kB for a four-scope path) and
its settled mark (about 0.1 kB, for ``settled_ttl``), so a million calls a day grow Redis by
about half a gigabyte a day unless ``usage_ttl`` bounds how long the log is kept.

**Redis Cluster.** Every key of one ledger carries the hash tag ``{tb:<prefix>}``, so all of
them live in one hash slot and the scripts are legal on a cluster. It also means one ledger is
one slot, hence one shard: a cluster adds capacity for *several* ledgers (different
``prefix`` values land on different slots), not for one. To scale a single ledger, give its
shard a faster machine; ``benchmarks/bench_shared_ledgers.py`` measures what one serves.

**Time.** :meth:`RedisLedger.server_time` is Redis's ``TIME``, so guards on hosts with skewed
clocks agree on window boundaries.

**Failures.** ``timeout`` bounds connecting and every reply (``socket_connect_timeout`` and
``socket_timeout``). A dropped connection is retried once at once (a pooled connection that a
restart or ``CLIENT KILL`` closed); a timeout is never retried. Connection errors and timeouts
raise :class:`~tb_plugins.errors.LedgerUnavailable` naming ``host:port`` (never the password);
other Redis errors raise :class:`~tb_plugins.errors.LedgerError`, and so does anything the
ledger cannot store: an amount above ``2**53`` (the script adds doubles, exact to there) or a
sum an int64 cannot return (``amount out of range``), refused before anything is written.

A call whose reply was lost may still have run. A reserve (or release) that times out or loses
its connection is remembered, and its hold is released right after the ledger's next
successful call (one more round trip then, and only then), so no phantom hold outlives an
outage by more than a call; settling or releasing that id later is harmless. A settle sent
again by the retry above carries the same random token as its first run: if that run went
through, the script recognizes it and still answers ``applied``, while a second ``settle``
call of the id answers ``applied=False`` and charges nothing.

Keys (``P`` is ``{tb:<prefix>}``; scope names appear only percent-escaped, see
:func:`~tb_plugins.ledger.base.line_key`)::

    P:l:<line>            one hash per line: settled spend per bucket, the held counter,
                          each live hold (expires a day after the line's newest bucket)
    P:r:<id>, P:s:<id>    the lines a reservation holds on; the mark (the settle call's
                          token) of a settled id
    P:lines               every line with spend (for ``tb status``)
    P:log:<day>, P:logdays, P:seq  the usage log, one sorted set per UTC day
    P:a:<alert>           alerts already claimed

Example:
    >>> from tb_plugins import ledger_from_url
    >>> ledger = ledger_from_url("redis://127.0.0.1:6379/0?prefix=myapp")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from tb_plugins._lazy import require
from tb_plugins.core.usage import Amounts, UsageRecord, UsageRow
from tb_plugins.core.windows import parse_duration
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.base import (
    GroupBy,
    Ledger,
    Line,
    LineState,
    ReserveResult,
    SettleResult,
    check_amounts,
    check_record_amounts,
    check_text,
    check_texts,
    distinct_lines,
    distinct_watch,
    json_text,
    out_of_range,
    spread,
    usage_rows,
)

if TYPE_CHECKING:
    import redis as redis_module
    import redis.asyncio as aredis_module

__all__ = ["RedisLedger"]

T = TypeVar("T")
logger = logging.getLogger("tb_plugins")

LUA: str = resources.files("tb_plugins.ledger").joinpath("lua/ledger.lua").read_text("utf-8")
"""The ledger's one Lua script; its first argument names the operation."""

HOLD_GRACE = 3600  # seconds a line's hold keys outlive the last hold on them
COUNTER_GRACE = 86_400  # seconds a bucket's counter outlives its window (like SQLite's prune)
ALERT_GRACE = 86_400  # seconds an alert claim outlives its expires_at
DEFAULT_SETTLED_TTL = 7 * 86_400.0
_OPTIONS = ("prefix", "timeout", "settled_ttl", "usage_ttl")
_PREFIX = re.compile(r"[A-Za-z0-9_.~:-]{1,100}")
_UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY")
MAX_AMOUNT = 2**53
"""The largest amount the script adds exactly (its arithmetic is on doubles)."""
ORPHANS_MAX = 10_000  # reservation ids kept for a later release (see RedisLedger._orphan)
ORPHANS_BATCH = 500  # ids released per round trip


def _num(value: float) -> str:
    """A float as Redis and Lua read it back exactly."""
    return repr(float(value))


@functools.lru_cache(maxsize=256)
def _doubles(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


@functools.lru_cache(maxsize=256)
def _int64s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}q")


def _pack(numbers: Sequence[float]) -> bytes:
    """Numbers as the script reads them: little-endian doubles, one argument for all.

    Raises:
        LedgerError: a number no double holds (``amount out of range``).
    """
    try:
        return _doubles(len(numbers)).pack(*numbers)
    except (struct.error, OverflowError, TypeError) as exc:
        raise out_of_range("a number for the Redis script", exc) from exc


def _states(packed: bytes) -> tuple[LineState, ...]:
    """The script's states: 12 little-endian int64s per line (6 spent, then 6 held)."""
    v = _int64s(len(packed) // 8).unpack(packed)
    return tuple(
        LineState(spent=v[i : i + 6], held=v[i + 6 : i + 12]) for i in range(0, len(v), 12)
    )


def _token() -> str:
    """A random token naming one settle call (see ``P:s:<rid>`` in ``lua/ledger.lua``)."""
    return os.urandom(8).hex()


def _watch_mask(n: int, watch: Sequence[int] | None) -> list[bool] | None:
    """Per line, whether a settle reads its state back (None: every line)."""
    if watch is None:
        return None
    mask = [False] * n
    for i in watch:
        mask[i] = True
    return mask


def _watched(packed: bytes, watched: Sequence[bool] | None) -> tuple[LineState | None, ...]:
    """Per line, its state if the script read it back (``watched``; all when None)."""
    states = _states(packed)
    if watched is None:
        return states
    it = iter(states)
    return tuple(next(it) if w else None for w in watched)


def _ttl(seconds: float, grace: float) -> int:
    """A positive whole number of seconds: ``seconds`` from now (at least 0) plus ``grace``."""
    return max(math.ceil(max(seconds, 0.0) + grace), 1)


@functools.lru_cache(maxsize=64)
def _day_name(start: int) -> str:
    return datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%d")


def _day(ts: float) -> tuple[str, int]:
    """The UTC day of ``ts`` as ``YYYY-MM-DD`` and the epoch seconds it starts at."""
    start = int(ts // 86_400) * 86_400
    return _day_name(start), start


_json_str = json.encoder.encode_basestring
"""A str as a JSON string, non-ASCII kept (``ensure_ascii=False``)."""


@functools.lru_cache(maxsize=1024)
def _record_head(
    scopes: tuple[str, ...], model: str | None, requested: str | None, action: str
) -> str:
    """The JSON members of a usage record that recur from call to call (cached)."""
    dump = functools.partial(json.dumps, ensure_ascii=False)
    return (f',"scopes":{dump(list(scopes))},"model":{dump(model)},'
            f'"requested_model":{dump(requested)},"action":{dump(action)}')  # fmt: skip


def _json_num(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else json.dumps(float(x))


def _encode_record(r: UsageRecord) -> str:
    """The record as a JSON object (what :func:`_decode_record` reads back), built from cached
    parts: only the numbers, the id and ``extra`` are encoded per call."""
    rid = "null" if r.reservation_id is None else _json_str(r.reservation_id)
    extra = json_text(r.extra, compact=True) if r.extra else "{}"
    path = tuple(r.scopes)
    head = _record_head if sum(map(len, path)) <= 1024 else _record_head.__wrapped__
    return (
        f'{{"ts":{_json_num(r.ts)},"id":{rid}'
        f"{head(path, r.model, r.requested_model, r.action)}"
        f',"in":{int(r.input_tokens)},"out":{int(r.output_tokens)},'
        f'"cached":{int(r.cached_input_tokens)},"usd":{_json_num(r.usd)},'
        f'"priced":{"true" if r.priced else "false"},'
        f'"estimated":{"true" if r.estimated else "false"},"extra":{extra}}}'
    )


def _decode_record(member: bytes) -> UsageRecord:
    d = json.loads(member[16:].decode("utf-8"))  # after the 16 hex digits of its sequence
    return UsageRecord(
        ts=float(d["ts"]),
        reservation_id=d["id"],
        scopes=tuple(d["scopes"]),
        model=d["model"],
        requested_model=d["requested_model"],
        action=d["action"],
        input_tokens=int(d["in"]),
        output_tokens=int(d["out"]),
        cached_input_tokens=int(d["cached"]),
        usd=float(d["usd"]),
        priced=bool(d["priced"]),
        estimated=bool(d["estimated"]),
        extra=d["extra"],
    )


def group_usage(
    records: Sequence[UsageRecord], group_by: GroupBy, scope: str | None
) -> list[UsageRow]:
    """Totals of ``records`` grouped by scope (each distinct scope of a record), model or UTC
    day: ``requests`` counts settled records, ``denied`` refused ones, and the token and usd
    sums cover settled records only. Sorted by key."""
    if group_by not in ("scope", "model", "day"):
        raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0])
    for r in records:
        if scope is not None and scope not in r.scopes:
            continue
        if group_by == "scope":
            keys = list(dict.fromkeys(r.scopes))
        elif group_by == "model":
            keys = [r.model]
        else:
            keys = [_day(r.ts)[0]]
        for key in keys:
            row = sums[key]
            if r.action == "deny":
                row[1] += 1
                continue
            row[0] += 1
            row[2] += r.input_tokens
            row[3] += r.output_tokens
            row[4] += r.cached_input_tokens
            row[5] += r.usd
    return usage_rows((key, *v) for key, v in sums.items())


class RedisLedger(Ledger):
    """A ledger in Redis, shared by every process and host that opens the same URL and prefix.

    Args:
        url: the ``redis://`` or ``rediss://`` URL, without this ledger's own options.
        prefix: the ledger's namespace; keys start with ``{tb:<prefix>}``.
        timeout: seconds to connect and to wait for each reply.
        settled_ttl: seconds a settled reservation id is remembered (a second settle of the
            same id within that time changes nothing).
        usage_ttl: seconds each day of the usage log is kept after it ends (None: forever).
        display_url: the URL shown in messages (the password is never shown).

    Example:
        >>> ledger = RedisLedger.from_url("redis://127.0.0.1:6379/0?prefix=demo")  # doctest: +SKIP
        >>> ledger.server_time() > 0  # doctest: +SKIP
        True
    """

    schemes = ("redis", "rediss")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tb",
        timeout: float = 2.0,
        settled_ttl: float = DEFAULT_SETTLED_TTL,
        usage_ttl: float | None = None,
        display_url: str | None = None,
    ) -> None:
        self._redis = require("redis", "redis")
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(
                f"ledger prefix {prefix!r} must be 1-100 characters of A-Z a-z 0-9 _ . ~ : -"
            )
        if timeout <= 0:
            raise ConfigError(f"ledger timeout must be positive, got {timeout!r}")
        self.url = display_url or url
        self.prefix = prefix
        self.key_prefix = "{tb:" + prefix + "}"
        self.timeout = float(timeout)
        self.settled_ttl = max(int(settled_ttl), 1)
        self.usage_ttl = usage_ttl
        parts = urlsplit(url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self._client_url = url
        self._client = self._redis.Redis.from_url(url, **self._client_options(asynchronous=False))
        self._check_options(self._client)
        self._sha = hashlib.sha1(LUA.encode("utf-8")).hexdigest()
        self._aclient: aredis_module.Redis | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._apid = os.getpid()
        # Reservation ids whose reserve (or release) got no reply: it may have run all the
        # same, so their holds are released at the next successful call (see _orphan).
        self._orphans: dict[str, None] = {}
        self._orphans_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLedger:
        """Open ``redis://host:port/db?prefix=…&timeout=…`` (or ``rediss://`` for TLS).

        Keyword options override the URL's: ``prefix``, ``timeout`` (seconds or a duration
        such as ``"500ms"``), ``settled_ttl``, ``usage_ttl`` (durations such as ``"30d"``).

        Raises:
            ConfigError: the URL is not a Redis URL, or an option is unknown or malformed.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in cls.schemes:
            raise ConfigError(f"not a Redis ledger URL: {url!r} (use redis://host:port/db)")
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for ledger {_hide_password(url)}; "
                f"known: {', '.join(_OPTIONS)} (and redis-py's URL query options)"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in _OPTIONS}
        rest = [(k, v) for k, v in query if k not in _OPTIONS]
        ours.update({k: v for k, v in options.items() if v is not None})
        client_url = urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote)))
        try:
            timeout = parse_duration(ours.get("timeout", 2.0))
            settled = parse_duration(ours.get("settled_ttl", DEFAULT_SETTLED_TTL))
            usage_ttl = ours.get("usage_ttl")
            usage = None if usage_ttl in (None, "", "forever") else parse_duration(usage_ttl)
        except ValueError as exc:
            raise ConfigError(f"ledger {_hide_password(url)}: {exc}") from None
        return cls(
            client_url,
            prefix=str(ours.get("prefix", "tb")),
            timeout=timeout,
            settled_ttl=settled,
            usage_ttl=usage,
            display_url=_hide_password(url),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, prefix={self.prefix!r})"

    # -- connections ---------------------------------------------------------------------------

    def _client_options(self, *, asynchronous: bool) -> dict[str, Any]:
        if asynchronous:
            retry_mod: Any = require("redis.asyncio.retry", "redis")
        else:
            retry_mod = require("redis.retry", "redis")
        backoff = require("redis.backoff", "redis")
        exceptions = self._redis.exceptions
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            # One immediate retry, on a dropped connection only: a pooled socket that a restart
            # or CLIENT KILL closed reconnects at once; a timeout is never retried (no hangs).
            "retry": retry_mod.Retry(
                backoff.NoBackoff(), 1, supported_errors=(exceptions.ConnectionError,)
            ),
            "health_check_interval": 0,
            "decode_responses": False,
        }

    def _check_options(self, client: redis_module.Redis) -> None:
        pool = client.connection_pool
        try:
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            raise ConfigError(f"ledger {self.url}: unknown Redis option ({exc})") from None

    def _async(self) -> aredis_module.Redis:
        """The asyncio client of the running event loop (a client is bound to its loop)."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aloop is not loop or self._apid != os.getpid():
            aredis: Any = require("redis.asyncio", "redis")
            self._aclient = aredis.Redis.from_url(
                self._client_url, **self._client_options(asynchronous=True)
            )
            self._aloop, self._apid = loop, os.getpid()
        assert self._aclient is not None
        return self._aclient

    def _wrap(self, exc: BaseException) -> LedgerError:
        errors = self._redis.exceptions
        if isinstance(exc, errors.ConnectionError | errors.TimeoutError | OSError):
            return LedgerUnavailable(f"Redis ledger at {self.where} is unreachable: {exc}")
        if isinstance(exc, errors.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES):
            return LedgerUnavailable(f"Redis ledger at {self.where} is not serving: {exc}")
        text = str(exc)
        if "amount out of range" in text:  # the script refused a sum (see ints in ledger.lua)
            detail = text[text.index("amount") :].split(" script: ")[0]
            return LedgerError(f"Redis ledger at {self.where}: {detail}; nothing was written")
        return LedgerError(f"Redis ledger at {self.where}: {type(exc).__name__}: {text}")

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except (self._redis.RedisError, OSError) as exc:
            raise self._wrap(exc) from exc
        if self._orphans:
            self._release_orphans()
        return result

    async def _acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await fn()
        except (self._redis.RedisError, OSError) as exc:
            raise self._wrap(exc) from exc
        if self._orphans:
            await self._arelease_orphans()
        return result

    def _script(self, key: str, args: Sequence[str | bytes]) -> Any:
        """``EVALSHA`` of the script, or ``EVAL`` (which caches it) if the server lacks it."""
        try:
            return self._client.evalsha(self._sha, 1, key, *args)
        except self._redis.exceptions.NoScriptError:
            return self._client.eval(LUA, 1, key, *args)

    async def _ascript(self, key: str, args: Sequence[str | bytes]) -> Any:
        client = self._async()
        try:
            return await client.evalsha(self._sha, 1, key, *args)
        except self._redis.exceptions.NoScriptError:
            return await client.eval(LUA, 1, key, *args)

    def _eval(self, key: str, args: Sequence[str | bytes]) -> Any:
        """Run the script (one round trip, wrapped errors)."""
        return self._call(lambda: self._script(key, args))

    async def _aeval(self, key: str, args: Sequence[str | bytes]) -> Any:
        return await self._acall(lambda: self._ascript(key, args))

    # -- reservations whose reply was lost ---------------------------------------------------

    def _orphan(self, reservation_id: str, exc: LedgerUnavailable) -> None:
        """Remember ``reservation_id`` when its reserve (or release) failed after the command
        may have reached the server (a timeout or a dropped connection: the reply was not
        seen). A reserve that lands unseen would hold until its TTL; the next successful call
        releases it instead (:meth:`_release_orphans`)."""
        errors = self._redis.exceptions
        if not isinstance(exc.__cause__, errors.TimeoutError | errors.ConnectionError | OSError):
            return
        with self._orphans_lock:
            self._orphans[reservation_id] = None
            while len(self._orphans) > ORPHANS_MAX:  # the oldest expire by their TTL anyway
                del self._orphans[next(iter(self._orphans))]

    def _adopt(self, reservation_id: str) -> None:
        """Forget ``reservation_id`` as an orphan: it is being reserved, settled or released
        again, which replaces or drops its hold by itself."""
        if self._orphans:
            with self._orphans_lock:
                self._orphans.pop(reservation_id, None)

    def _orphan_batch(self) -> list[str]:
        with self._orphans_lock:
            batch = list(self._orphans)[:ORPHANS_BATCH]
            for rid in batch:
                del self._orphans[rid]
        return batch

    def _orphans_back(self, batch: Sequence[str], exc: BaseException) -> None:
        with self._orphans_lock:
            for rid in batch:
                self._orphans.setdefault(rid, None)
        logger.warning("tb_plugins: Redis ledger at %s: releasing %d reservation(s) that may "
                       "have landed unseen failed (retried later): %s",
                       self.where, len(batch), exc)  # fmt: skip

    def _forget_args(self, batch: Sequence[str]) -> list[str | bytes]:
        return ["forget", self.key_prefix, _num(time.time()), *batch]

    def _release_orphans(self) -> None:
        """Release (best effort, one round trip) the holds of up to ``ORPHANS_BATCH`` orphans;
        runs after a successful call, so no phantom hold outlives an outage by more than one
        call. A later settle or release of such an id still works (it finds no hold)."""
        batch = self._orphan_batch()
        if batch:
            try:
                self._script(self._rkey(batch[0]), self._forget_args(batch))
            except (self._redis.RedisError, OSError) as exc:
                self._orphans_back(batch, exc)

    async def _arelease_orphans(self) -> None:
        """Async :meth:`_release_orphans`."""
        batch = self._orphan_batch()
        if batch:
            try:
                await self._ascript(self._rkey(batch[0]), self._forget_args(batch))
            except (self._redis.RedisError, OSError) as exc:
                self._orphans_back(batch, exc)

    # -- script arguments ----------------------------------------------------------------------

    def _rkey(self, reservation_id: str) -> str:
        return f"{self.key_prefix}:r:{reservation_id}"

    def _reserve_args(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        now: float,
        expires_at: float,
    ) -> list[str | bytes]:
        check_amounts(amounts, MAX_AMOUNT)
        check_texts(reservation_id, lines)
        numbers: list[float] = [now, expires_at, *amounts]
        hold_ttl = _ttl(expires_at - now, HOLD_GRACE)
        for ln in lines:
            a, b, c, d, e, f = ln.limits
            numbers += (ln.bucket, ln.span, ln.width, -1 if ln.expires_at is None else hold_ttl,
                        -1 if a is None else a, -1 if b is None else b, -1 if c is None else c,
                        -1 if d is None else d, -1 if e is None else e,
                        -1 if f is None else f)  # fmt: skip
        return ["reserve", self.key_prefix, reservation_id, _pack(numbers),
                *[ln.key for ln in lines]]  # fmt: skip

    def _settle_args(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        now: float,
        watched: Sequence[bool] | None,
        token: str,
    ) -> list[str | bytes]:
        check_amounts(amounts, MAX_AMOUNT)
        check_texts(reservation_id, lines, record)
        member, ts, day, start, log_ttl = self._log_args(record)
        numbers: list[float] = [now, self.settled_ttl, *amounts, log_ttl, start]
        for i, ln in enumerate(lines):
            exp = ln.expires_at
            read = 1 if watched is None or watched[i] else 0
            if exp is None:
                numbers += (ln.bucket, ln.span, ln.width, -1, math.inf, read)
            else:
                numbers += (ln.bucket, ln.span, ln.width, _ttl(exp - now, COUNTER_GRACE),
                            exp + COUNTER_GRACE, read)  # fmt: skip
        return ["settle", self.key_prefix, reservation_id, _pack(numbers), member, ts, day,
                token, *[ln.key for ln in lines]]  # fmt: skip

    def _log_args(self, record: UsageRecord) -> tuple[str, str, str, int, float]:
        """The record's JSON, its ts (as text), its UTC day, the day's start, and how long to
        keep that day (-1: forever)."""
        check_record_amounts(record)
        day, start = _day(record.ts)
        ttl = -1 if self.usage_ttl is None else _ttl(start + 86_400 - record.ts, self.usage_ttl)
        return _encode_record(record), _num(record.ts), day, start, ttl

    def _append_args(self, record: UsageRecord) -> list[str | bytes]:
        check_texts(record=record)
        member, ts, day, start, ttl = self._log_args(record)
        return ["log", self.key_prefix, member, ts, day, str(start), str(ttl)]

    def _status_args(self, lines: Sequence[Line], now: float) -> list[str | bytes]:
        check_texts(lines=lines)
        numbers: list[float] = [now]
        for ln in lines:
            numbers += [ln.bucket, ln.span, ln.width]
        return ["status", self.key_prefix, _pack(numbers), *(ln.key for ln in lines)]

    def _alert_ttl(self, expires_at: float | None) -> int | None:
        return None if expires_at is None else _ttl(expires_at - time.time(), ALERT_GRACE)

    def _records_query(self, since: float | None, until: float | None) -> tuple[str, str, str, str]:
        low = "-inf" if since is None else _num(since)
        high = "+inf" if until is None else "(" + _num(until)
        day_low = "-inf" if since is None else str(_day(since)[1])
        return low, high, day_low, high

    # -- the atomic operations -----------------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Hold ``amounts`` on every line if every limit allows it, else change nothing.

        One script: expired holds of the lines are dropped first, and a reservation id that
        already holds is replaced (its old hold does not count against the new check).
        """
        unique, index = distinct_lines(lines)  # a line given twice holds once
        args = self._reserve_args(reservation_id, unique, amounts, now, expires_at)
        self._adopt(reservation_id)
        try:
            reply = self._eval(self._rkey(reservation_id), args)
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise
        return ReserveResult(ok=bool(reply[0]), states=spread(_states(reply[1]), index))

    async def areserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Async :meth:`reserve`."""
        unique, index = distinct_lines(lines)
        args = self._reserve_args(reservation_id, unique, amounts, now, expires_at)
        self._adopt(reservation_id)
        try:
            reply = await self._aeval(self._rkey(reservation_id), args)
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise
        return ReserveResult(ok=bool(reply[0]), states=spread(_states(reply[1]), index))

    def settle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Replace the hold by ``amounts`` on each line and log ``record``; idempotent by id
        for ``settled_ttl``.

        Only the ``watch`` lines (all when None) are read back; the others' states are None.
        The call carries a random token: if its reply is lost and redis-py sends it again,
        the script finds the id settled with this same token and still answers
        ``applied=True``; a second ``settle`` call of the id answers ``applied=False``.
        """
        unique, index = distinct_lines(lines)  # a line given twice is charged once
        watched = _watch_mask(len(unique), distinct_watch(watch, index))
        args = self._settle_args(reservation_id, unique, amounts, record, now, watched, _token())
        self._adopt(reservation_id)
        reply = self._eval(self._rkey(reservation_id), args)
        states = spread(_watched(reply[1], watched), index)
        return SettleResult(applied=bool(reply[0]), states=states)

    async def asettle(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        record: UsageRecord,
        *,
        now: float,
        watch: Sequence[int] | None = None,
    ) -> SettleResult:
        """Async :meth:`settle`."""
        unique, index = distinct_lines(lines)
        watched = _watch_mask(len(unique), distinct_watch(watch, index))
        args = self._settle_args(reservation_id, unique, amounts, record, now, watched, _token())
        self._adopt(reservation_id)
        reply = await self._aeval(self._rkey(reservation_id), args)
        states = spread(_watched(reply[1], watched), index)
        return SettleResult(applied=bool(reply[0]), states=states)

    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold; True if a live (unexpired) hold was removed."""
        check_text("reservation id", reservation_id)
        args: list[str | bytes] = ["release", self.key_prefix, reservation_id, _num(now)]
        self._adopt(reservation_id)
        try:
            return bool(self._eval(self._rkey(reservation_id), args))
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release`."""
        check_text("reservation id", reservation_id)
        args: list[str | bytes] = ["release", self.key_prefix, reservation_id, _num(now)]
        self._adopt(reservation_id)
        try:
            return bool(await self._aeval(self._rkey(reservation_id), args))
        except LedgerUnavailable as exc:
            self._orphan(reservation_id, exc)
            raise

    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line (expired holds are dropped first, so they do not count)."""
        reply = self._eval(f"{self.key_prefix}:lines", self._status_args(lines, now))
        return _states(reply)

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status`."""
        reply = await self._aeval(f"{self.key_prefix}:lines", self._status_args(lines, now))
        return _states(reply)

    # -- bookkeeping ---------------------------------------------------------------------------

    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair with spend whose window is still read, sorted."""
        members = self._call(lambda: self._client.zrange(f"{self.key_prefix}:lines", 0, -1))
        return sorted(_split_line_key(m) for m in members)

    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True for the first claim of ``alert_key`` (``SET NX``); the claim is kept until a
        day after ``expires_at``."""
        check_text("alert key", alert_key)
        key = f"{self.key_prefix}:a:{alert_key}"
        ttl = self._alert_ttl(expires_at)
        return bool(self._call(lambda: self._client.set(key, b"1", nx=True, ex=ttl)))

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert`."""
        check_text("alert key", alert_key)
        key = f"{self.key_prefix}:a:{alert_key}"
        ttl = self._alert_ttl(expires_at)
        return bool(await self._acall(lambda: self._async().set(key, b"1", nx=True, ex=ttl)))

    def append_usage(self, record: UsageRecord) -> None:
        """Log a record with no spend (a refused call)."""
        self._eval(f"{self.key_prefix}:seq", self._append_args(record))

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage`."""
        await self._aeval(f"{self.key_prefix}:seq", self._append_args(record))

    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """The first ``limit`` records with ``since <= ts < until``, oldest first (two round
        trips: the days, then every day's records in one pipeline)."""
        low, high, day_low, day_high = self._records_query(since, until)
        p = self.key_prefix

        def read() -> list[bytes]:
            days = self._client.zrangebyscore(f"{p}:logdays", day_low, day_high)
            if not days:
                return []
            pipe = self._client.pipeline(transaction=False)
            for day in days:
                pipe.zrangebyscore(f"{p}:log:{_text(day)}", low, high)
            return [m for chunk in pipe.execute() for m in chunk]

        members = self._call(read)
        if limit is not None:
            members = members[: max(limit, 0)]
        return [_decode_record(m) for m in members]

    async def arecords(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Async :meth:`records`."""
        low, high, day_low, day_high = self._records_query(since, until)
        p = self.key_prefix
        client = self._async()

        async def read() -> list[bytes]:
            days = await client.zrangebyscore(f"{p}:logdays", day_low, day_high)
            if not days:
                return []
            pipe = client.pipeline(transaction=False)
            for day in days:
                pipe.zrangebyscore(f"{p}:log:{_text(day)}", low, high)
            return [m for chunk in await pipe.execute() for m in chunk]

        members = await self._acall(read)
        if limit is not None:
            members = members[: max(limit, 0)]
        return [_decode_record(m) for m in members]

    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals of records with ``since <= ts < until``, grouped by scope, model or UTC day
        (read from Redis, grouped here)."""
        if group_by not in ("scope", "model", "day"):
            raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
        if scope is not None:
            check_text("scope name", scope)
        return group_usage(self.records(since=since, until=until), group_by, scope)

    async def ausage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        if group_by not in ("scope", "model", "day"):
            raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
        if scope is not None:
            check_text("scope name", scope)
        return group_usage(await self.arecords(since=since, until=until), group_by, scope)

    def server_time(self) -> float:
        """Redis's clock (``TIME``), in epoch seconds."""
        seconds, micros = self._call(self._client.time)
        return int(seconds) + int(micros) / 1e6

    async def aserver_time(self) -> float:
        """Async :meth:`server_time`."""
        seconds, micros = await self._acall(self._async().time)
        return int(seconds) + int(micros) / 1e6

    def ping(self) -> None:
        """One bare round trip (``PING``), e.g. to measure the network floor."""
        self._call(self._client.ping)

    def close(self) -> None:
        """Close this process's connections (the data stays in Redis)."""
        self._client.close()

    async def aclose(self) -> None:
        """Close the connections of the running event loop, and the sync ones."""
        client, self._aclient = self._aclient, None
        if client is not None and self._aloop is asyncio.get_running_loop():
            await client.aclose()
        self.close()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _split_line_key(member: bytes) -> tuple[str, str]:
    scope, _, window = member.decode("utf-8").partition("|")
    return unquote(scope), window


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
