"""The two drivers: one runs a flow against the ledger with plain calls, the other awaits the
ledger's async twins. A flow is a generator that yields ledger operations
``(name, args, kwargs)`` and receives their results (or their errors, thrown back in), so each
decision is written once and the sync and async paths differ only here.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any, TypeVar

from tb_plugins.errors import LedgerError, LedgerUnavailable
from tb_plugins.ledger import Ledger

__all__ = ["Flow", "Op", "drive", "adrive", "ledger_error", "quiet"]

logger = logging.getLogger("tb_plugins")

T = TypeVar("T")
Op = tuple[str, tuple[Any, ...], dict[str, Any]]
"""A ledger operation: the method's name (``a`` + name for the async twin), its arguments."""
Flow = Generator[Op, Any, T]


def drive(ledger: Ledger, flow: Flow[T]) -> T:
    """Run ``flow`` to its end, calling ``ledger``'s sync methods."""
    send: Any = None
    exc: BaseException | None = None
    while True:
        try:
            op = flow.throw(exc) if exc is not None else flow.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        name, args, kwargs = op
        exc = None
        try:
            send = getattr(ledger, name)(*args, **kwargs)
        except Exception as e:
            exc = ledger_error(e)


async def adrive(ledger: Ledger, flow: Flow[T]) -> T:
    """Run ``flow`` to its end, awaiting ``ledger``'s async methods."""
    send: Any = None
    exc: BaseException | None = None
    while True:
        try:
            op = flow.throw(exc) if exc is not None else flow.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        name, args, kwargs = op
        exc = None
        try:
            send = await getattr(ledger, "a" + name)(*args, **kwargs)
        except Exception as e:
            exc = ledger_error(e)


def ledger_error(exc: Exception) -> LedgerError:
    """What a ledger operation's failure means: an OSError (or a backend's own
    LedgerUnavailable) is an outage; anything else is a refusal or a bug, never read as
    "unreachable", so fail_open never admits a call the ledger refused."""
    if isinstance(exc, LedgerError):
        return exc
    err: LedgerError
    if isinstance(exc, OSError):
        err = LedgerUnavailable(f"{type(exc).__name__}: {exc}")
    else:
        err = LedgerError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def quiet(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Flow[Any]:
    """A best-effort ledger operation: failures are logged, not raised."""
    try:
        return (yield (name, args, kwargs))
    except LedgerError as exc:
        logger.warning("tb_plugins: ledger %s failed: %s", name, exc)
        return None
