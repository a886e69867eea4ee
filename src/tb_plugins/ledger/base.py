"""The ledger contract every backend implements.

A ledger stores, per *line* (one scope in one window), the settled spend in each bucket and
the live *holds* of reservations. The guard decides; the ledger only does three atomic things:

* :meth:`Ledger.reserve` — for every line of a call, check that settled spend + live holds +
  the new amounts stay within each limited unit, and if *all* do, hold the amounts on every line
  under one reservation id. All or nothing, in one transaction / script.
* :meth:`Ledger.settle` — replace the hold by the actual amounts (which may exceed the
  estimate), append a usage record; idempotent by reservation id, and it still records the spend
  when the hold has already expired.
* :meth:`Ledger.release` — drop the hold (error, cancellation).

Holds carry an absolute expiry; a hold whose owner died stops counting once ``now`` passes it,
and is purged. Which holds a line counts depends on its window (see :attr:`Line.rolling`): on a
line that sums one bucket (a calendar window, ``total``) only the holds made in that bucket
(a hold made in last period's bucket does not count against the new period); on a rolling line
every live hold, whatever bucket it was made in, because a hold is spend not yet charged, and a
call may run longer than the window (its spend is charged in the bucket of its settle). Only
settled spend is windowed by buckets.

Time is always passed in (``now``), never read by the ledger, so tests inject a clock and shared
ledgers can follow the server's clock through :meth:`Ledger.server_time`.

Amount vectors are six integers (see :mod:`tb_plugins.core.usage`). Storage keys come from
:func:`line_key`, which escapes scope names so no scope can reach another's keys.

**Hostile input.** A ledger checks what it is given before it writes anything, so that bad
input is a plain :class:`~tb_plugins.errors.LedgerError` (the guard never admits a call on it)
and never a :class:`~tb_plugins.errors.LedgerUnavailable` (which ``fail_open`` would admit
unchecked): :func:`check_amounts` refuses an amount that is not a whole number from 0 to the
backend's maximum (64-bit storage: ``2**63 - 1``), and :func:`check_texts` a name that is not
valid Unicode text (a lone surrogate such as ``"\\ud800"`` cannot be stored as UTF-8). Any other
text is stored and reported exactly, NUL and other control characters included. Only a real
connection failure (refused, reset, timed out, locked, missing file) is ``LedgerUnavailable``.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, ParamSpec, TypeVar

from tb_plugins.core.lines import Line, LineState, ReserveResult, SettleResult, line_key
from tb_plugins.core.usage import UNITS, Amounts, UsageRecord, UsageRow
from tb_plugins.errors import LedgerError

__all__ = [
    "MAX_AMOUNT",
    "GroupBy",
    "Ledger",
    "LineState",
    "ReserveResult",
    "SettleResult",
    "Line",
    "line_key",
]

GroupBy = Literal["scope", "model", "day"]

MAX_AMOUNT = 2**63 - 1
"""The largest amount a 64-bit counter holds (SQLite and PostgreSQL store signed int64)."""


_P = ParamSpec("_P")
_S = TypeVar("_S")
_R = TypeVar("_R")


async def _to_thread(fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    import asyncio  # not at import time: `import tb_plugins` stays light

    return await asyncio.to_thread(fn, *args, **kwargs)


def distinct_lines(
    lines: Sequence[Line], *, by_key: bool = True
) -> tuple[Sequence[Line], Sequence[int]]:
    """The distinct lines, first kept, and per given line its index among them. Writes
    compare keys (a line given twice holds and spends once); reads (``by_key=False``) also
    compare buckets, so two windows of one key read apart."""
    if by_key and len({ln.key for ln in lines}) == len(lines):
        return lines, range(len(lines))  # the usual case: every line once, in order
    seen: dict[Any, int] = {}
    unique: list[Line] = []
    index: list[int] = []
    for ln in lines:
        ident = ln.key if by_key else (ln.key, ln.bucket, ln.span, ln.width)
        if ident not in seen:
            seen[ident] = len(unique)
            unique.append(ln)
        index.append(seen[ident])
    return unique, index


def spread(states: Sequence[_S], index: Sequence[int]) -> tuple[_S, ...]:
    """States of the distinct lines back in the order of the given lines."""
    if isinstance(index, range):  # every line was given once (see distinct_lines)
        return tuple(states)
    return tuple([states[i] for i in index])


def distinct_watch(watch: Sequence[int] | None, index: Sequence[int]) -> list[int] | None:
    """``watch`` (indexes of given lines) as indexes of the distinct lines (None: all)."""
    return None if watch is None else sorted({index[i] for i in watch})


def usage_rows(rows: Iterable[Sequence[Any]]) -> list[UsageRow]:
    """Report rows from ``(key, requests, denied, input, output, cached input, usd)`` tuples,
    sorted by key (every backend's ``usage`` ends here)."""
    out = [
        UsageRow(
            key=str(r[0]),
            requests=int(r[1]),
            denied=int(r[2]),
            input_tokens=int(r[3]),
            output_tokens=int(r[4]),
            cached_input_tokens=int(r[5]),
            usd=float(r[6]),
        )
        for r in rows
    ]
    return sorted(out, key=lambda row: row.key)


def check_report(group_by: str, scope: str | None) -> None:
    """Refuse a usage report the ledgers cannot make.

    Raises:
        ValueError: ``group_by`` is not ``scope``, ``model`` or ``day``.
        LedgerError: ``scope`` is not storable text (see :func:`check_text`).
    """
    if group_by not in ("scope", "model", "day"):
        raise ValueError(f"group_by must be 'scope', 'model' or 'day', not {group_by!r}")
    if scope is not None:
        check_text("scope name", scope)


RECORD_COLUMNS = (
    "ts, reservation_id, scopes, model, requested_model, action, input_tokens, output_tokens, "
    "cached_input_tokens, usd, priced, estimated, extra"
)
"""The usage log's columns in the SQL ledgers, in the order :func:`record_from_row` reads."""


def _as_stored(value: Any) -> Any:
    return value


def record_from_row(row: Sequence[Any], text: Callable[[Any], Any] = _as_stored) -> UsageRecord:
    """A usage record from a row of :data:`RECORD_COLUMNS` (scopes and extra as JSON);
    ``text`` reads back the names (id, models, action) a backend stored in a form of its own."""
    return UsageRecord(
        ts=float(row[0]),
        reservation_id=text(row[1]),
        scopes=tuple(json.loads(row[2])),
        model=text(row[3]),
        requested_model=text(row[4]),
        action=text(row[5]),
        input_tokens=int(row[6]),
        output_tokens=int(row[7]),
        cached_input_tokens=int(row[8]),
        usd=float(row[9]),
        priced=bool(row[10]),
        estimated=bool(row[11]),
        extra=json.loads(row[12]),
    )


_INT = frozenset({int})  # the one type an amount may have (not bool, not float)


def out_of_range(what: str, detail: object) -> LedgerError:
    """The error of a value a ledger cannot store: ``amount out of range: ...``."""
    return LedgerError(f"amount out of range: {what}: {detail}")


def check_amounts(values: Sequence[int], maximum: int = MAX_AMOUNT) -> None:
    """Refuse, before anything is written, an amount vector a ledger cannot store exactly.

    Raises:
        LedgerError: ``amount out of range: ...``, naming the unit, when an amount is not a
            whole number from 0 to ``maximum`` (or the vector is not six of them).

    Example:
        >>> check_amounts((10, 10, 0, 0, 1, 1))  # fine: returns None
    """
    fine = len(values) == 6 and _INT.issuperset(map(type, values))
    if fine and min(values) >= 0 and max(values) <= maximum:
        return
    if len(values) != 6:
        raise out_of_range("amounts", f"{len(values)} values, not 6 ({', '.join(UNITS)})")
    for unit, v in zip(UNITS, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, int):
            raise out_of_range(unit, f"{v!r} is not a whole number")
        if not 0 <= v <= maximum:
            raise out_of_range(unit, f"{v} is not between 0 and {maximum}")


def check_record_amounts(record: UsageRecord, maximum: int = MAX_AMOUNT) -> None:
    """Refuse a usage record whose token counts a ledger cannot store (see
    :func:`check_amounts`)."""
    values = (record.input_tokens, record.output_tokens, record.cached_input_tokens)
    if _INT.issuperset(map(type, values)) and min(values) >= 0 and max(values) <= maximum:
        return
    for name, v in zip(("input_tokens", "output_tokens", "cached_input_tokens"), values,
                       strict=True):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= maximum:
            raise out_of_range(f"usage record {name}", f"{v!r} (must be 0 to {maximum})")


def valid_text(value: object) -> bool:
    """Whether ``value`` is a str every backend can store: encodable as UTF-8 (no lone
    surrogate). NUL and other control characters are fine."""
    if type(value) is str and value.isascii():  # O(1) in CPython: the common case
        return True
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_text(value: Any, *, compact: bool = False) -> str:
    """``value`` as JSON (``default=str``), non-ASCII kept as is, except that a string holding
    a lone surrogate is written with ``\\u`` escapes (which read back exactly) instead of
    failing to encode."""
    separators = (",", ":") if compact else None
    text = json.dumps(value, ensure_ascii=False, separators=separators, default=str)
    if valid_text(text):
        return text
    return json.dumps(value, separators=separators, default=str)


def check_text(what: str, value: object) -> None:
    """Refuse a name (scope, model, reservation id, ...) that is not storable text.

    Raises:
        LedgerError: ``value`` is not a str, or holds a lone surrogate (e.g. ``"m\\ud800"``,
            which UTF-8 cannot encode); the message shows it escaped.
    """
    if valid_text(value):
        return
    if not isinstance(value, str):
        raise LedgerError(f"{what} must be text, got {type(value).__name__} {value!r}")
    shown = value if len(value) <= 200 else value[:200] + "..."
    raise LedgerError(
        f"{what} {shown!a} is not valid text: it contains a lone surrogate, which no "
        f"ledger can store (refused before anything was written)"
    )


def check_texts(
    reservation_id: str | None = None,
    lines: Sequence[Line] = (),
    record: UsageRecord | None = None,
) -> None:
    """:func:`check_text` on every name a reserve, settle or log writes: the reservation id,
    each line's scope and key, and the record's id, scopes, models and action."""
    # The common case (ASCII str everywhere) is checked inline, without a call per name: this
    # runs on every reserve and settle.
    names: list[object] = [reservation_id] if reservation_id is not None else []
    for ln in lines:
        names.append(ln.scope)
        names.append(ln.key)
    if record is not None:
        names.append(record.reservation_id)
        names.extend(record.scopes)
        names.append(record.model)
        names.append(record.requested_model)
        names.append(record.action)
    try:
        if "".join(names).isascii():  # type: ignore[arg-type]  # a non-str raises TypeError
            return
    except TypeError:
        pass
    if reservation_id is not None:
        check_text("reservation id", reservation_id)
    for ln in lines:
        check_text("scope name", ln.scope)
        check_text("line key", ln.key)
    if record is not None:
        if record.reservation_id is not None:
            check_text("usage record reservation id", record.reservation_id)
        for scope in record.scopes:
            check_text("scope name", scope)
        for what, text in (("model", record.model), ("requested model", record.requested_model)):
            if text is not None:
                check_text(f"{what} name", text)
        check_text("usage record action", record.action)


class Ledger(abc.ABC):
    """Durable spend per (scope, window), shared by every guard that opens the same URL.

    Subclasses declare ``schemes`` and implement the sync methods; the async twins (``a``
    prefix) default to running the sync method in a worker thread. The backends of this
    package derive from :class:`~tb_plugins.ledger.flow.FlowLedger` instead, which writes each
    operation once and runs it blocking or with native async I/O.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    url: str = ""

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> Ledger:
        """Open the ledger a URL names.

        Every backend accepts ``timeout`` (seconds): the most any single operation may wait
        for the store (lock, connection or reply) before raising ``LedgerUnavailable``. The
        guard passes ``timeout=policy.ledger_timeout``.
        """

    # -- the atomic operations ---------------------------------------------------------------

    @abc.abstractmethod
    def reserve(
        self,
        reservation_id: str,
        lines: Sequence[Line],
        amounts: Amounts,
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Hold ``amounts`` on every line if every limit of every line allows it; else nothing.

        Holds that expired at or before ``now`` do not count (a backend drops them when it
        likes); on a rolling line every other hold counts, whatever bucket it was made in (see
        :class:`Line`). A limit allows the call when ``spent + held + amount <= limit`` for
        that unit.
        """

    @abc.abstractmethod
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
        """Drop the hold (if still there), add ``amounts`` to each line's bucket, append
        ``record`` to the usage log. A second settle of the same id changes nothing.

        ``watch`` lists the indexes of the lines whose states the caller reads afterwards
        (for alerts); ``None`` means every line. Other lines' states may come back ``None``.
        """

    @abc.abstractmethod
    def release(self, reservation_id: str, *, now: float) -> bool:
        """Drop the hold. Returns True if a live hold was removed."""

    @abc.abstractmethod
    def status(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Spent and held per line (expired holds do not count; on a rolling line every live
        hold counts, whatever bucket it was made in)."""

    # -- bookkeeping -----------------------------------------------------------------------

    @abc.abstractmethod
    def scopes(self) -> list[tuple[str, str]]:
        """Every (scope, window) pair that has a counter, for listing pattern budgets."""

    @abc.abstractmethod
    def claim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """True exactly once per ``alert_key`` across every process (until ``expires_at``)."""

    @abc.abstractmethod
    def append_usage(self, record: UsageRecord) -> None:
        """Append a record with no spend to the usage log (refused calls)."""

    @abc.abstractmethod
    def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Totals of the usage log grouped by scope (a record counts under each of its
        scopes), model or UTC day, optionally only records that carry ``scope``."""

    @abc.abstractmethod
    def records(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Usage records in time order."""

    def server_time(self) -> float | None:
        """The shared clock of a networked ledger (epoch seconds), or None to use the local
        clock. Guards that share a ledger follow it so they agree on window boundaries."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- async twins ---------------------------------------------------------------------------

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
        return await _to_thread(
            self.reserve, reservation_id, lines, amounts, now=now, expires_at=expires_at
        )

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
        return await _to_thread(
            self.settle, reservation_id, lines, amounts, record, now=now, watch=watch
        )

    async def arelease(self, reservation_id: str, *, now: float) -> bool:
        """Async :meth:`release`."""
        return await _to_thread(self.release, reservation_id, now=now)

    async def astatus(self, lines: Sequence[Line], *, now: float) -> tuple[LineState, ...]:
        """Async :meth:`status`."""
        return await _to_thread(self.status, lines, now=now)

    async def aclaim_alert(self, alert_key: str, *, expires_at: float | None) -> bool:
        """Async :meth:`claim_alert`."""
        return await _to_thread(self.claim_alert, alert_key, expires_at=expires_at)

    async def aappend_usage(self, record: UsageRecord) -> None:
        """Async :meth:`append_usage`."""
        await _to_thread(self.append_usage, record)

    async def ascopes(self) -> list[tuple[str, str]]:
        """Async :meth:`scopes`."""
        return await _to_thread(self.scopes)

    async def ausage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        group_by: GroupBy = "scope",
        scope: str | None = None,
    ) -> list[UsageRow]:
        """Async :meth:`usage`."""
        return await _to_thread(
            self.usage, since=since, until=until, group_by=group_by, scope=scope
        )

    async def arecords(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[UsageRecord]:
        """Async :meth:`records`."""
        return await _to_thread(self.records, since=since, until=until, limit=limit)

    async def aserver_time(self) -> float | None:
        """Async :meth:`server_time`."""
        return self.server_time()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
