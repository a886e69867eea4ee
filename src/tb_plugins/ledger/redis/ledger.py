"""The Redis ledger class: its URL and options, its clients, and the two executors that send
the operations' commands (blocking with redis-py's client, awaited with its asyncio client)."""

from __future__ import annotations

import hashlib
import os
import pkgutil
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tb_plugins._lazy import require
from tb_plugins.core.urls import redact_url
from tb_plugins.core.windows import parse_duration
from tb_plugins.errors import ConfigError, LedgerError, LedgerUnavailable
from tb_plugins.ledger.flow import Flow
from tb_plugins.ledger.network import url_options
from tb_plugins.ledger.redis.operations import PIPELINE, RedisOperations

if TYPE_CHECKING:
    import asyncio

    import redis as redis_module
    import redis.asyncio as aredis_module

__all__ = ["LUA", "RedisLedger"]

T = TypeVar("T")

LUA: str = (pkgutil.get_data("tb_plugins.ledger.redis", "ledger.lua") or b"").decode("utf-8")
"""The ledger's one Lua script; its first argument names the operation."""

DEFAULT_SETTLED_TTL = 7 * 86_400.0
_OPTIONS = ("prefix", "timeout", "settled_ttl", "usage_ttl")
_PREFIX = re.compile(r"[A-Za-z0-9_.~:-]{1,100}")
_UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY")


class RedisLedger(RedisOperations):
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
        super().__init__()
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

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLedger:
        """Open ``redis://host:port/db?prefix=…&timeout=…`` (or ``rediss://`` for TLS).

        Keyword options override the URL's: ``prefix``, ``timeout`` (seconds or a duration
        such as ``"500ms"``), ``settled_ttl``, ``usage_ttl`` (durations such as ``"30d"``).

        Raises:
            ConfigError: the URL is not a Redis URL, or an option is unknown or malformed.
        """
        if urlsplit(url).scheme.lower() not in cls.schemes:
            raise ConfigError(f"not a Redis ledger URL: {url!r} (use redis://host:port/db)")
        ours, rest = url_options(url, options, _OPTIONS, "redis-py's URL query options")
        try:
            timeout = parse_duration(ours.get("timeout", 2.0))
            settled = parse_duration(ours.get("settled_ttl", DEFAULT_SETTLED_TTL))
            usage_ttl = ours.get("usage_ttl")
            usage = None if usage_ttl in (None, "", "forever") else parse_duration(usage_ttl)
        except ValueError as exc:
            raise ConfigError(f"ledger {redact_url(url)}: {exc}") from None
        return cls(
            urlunsplit(rest),
            prefix=str(ours.get("prefix", "tb")),
            timeout=timeout,
            settled_ttl=settled,
            usage_ttl=usage,
            display_url=redact_url(url),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, prefix={self.prefix!r})"

    # -- clients -------------------------------------------------------------------------------

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
        import asyncio  # an event loop runs: already imported

        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aloop is not loop or self._apid != os.getpid():
            aredis: Any = require("redis.asyncio", "redis")
            self._aclient = aredis.Redis.from_url(
                self._client_url, **self._client_options(asynchronous=True)
            )
            self._aloop, self._apid = loop, os.getpid()
        assert self._aclient is not None
        return self._aclient

    # -- the two executors: a step is (the client's method, args, kwargs) -----------------

    def _step(self, step: tuple[str, tuple[Any, ...], dict[str, Any]]) -> Any:
        name, args, kwargs = step
        if name == PIPELINE:
            return _queued(self._client.pipeline(transaction=False), args).execute()
        return getattr(self._client, name)(*args, **kwargs)

    async def _astep(self, step: tuple[str, tuple[Any, ...], dict[str, Any]]) -> Any:
        name, args, kwargs = step
        client = self._async()
        if name == PIPELINE:
            return await _queued(client.pipeline(transaction=False), args).execute()
        return await getattr(client, name)(*args, **kwargs)

    # -- calls: the script, wrapped errors, the orphans after --------------------------------

    def _script(self, key: str, args: Sequence[str | bytes]) -> Flow[Any]:
        """``EVALSHA`` of the script, or ``EVAL`` (which caches it) if the server lacks it."""
        try:
            return (yield ("evalsha", (self._sha, 1, key, *args), {}))
        except self._redis.exceptions.NoScriptError:
            return (yield ("eval", (LUA, 1, key, *args), {}))

    def _call(self, flow: Flow[T], *, cleanup: bool = True) -> Flow[T]:
        try:
            result = yield from flow
        except (self._redis.RedisError, OSError) as exc:
            raise self._wrap(exc) from exc
        if cleanup and self._orphans:
            yield from self._release_orphans()
        return result

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

    def _reply_lost(self, exc: LedgerUnavailable) -> bool:
        """A timeout or a dropped connection: the command may have reached the server."""
        errors = self._redis.exceptions
        return isinstance(exc.__cause__, errors.TimeoutError | errors.ConnectionError | OSError)

    def close(self) -> None:
        """Close this process's connections (the data stays in Redis)."""
        self._client.close()

    async def aclose(self) -> None:
        """Close the connections of the running event loop, and the sync ones."""
        import asyncio  # an event loop runs: already imported

        client, self._aclient = self._aclient, None
        if client is not None and self._aloop is asyncio.get_running_loop():
            await client.aclose()
        self.close()


def _queued(pipe: Any, commands: Sequence[tuple[str, tuple[Any, ...]]]) -> Any:
    """``pipe`` with ``commands`` queued on it."""
    for name, args in commands:
        getattr(pipe, name)(*args)
    return pipe
