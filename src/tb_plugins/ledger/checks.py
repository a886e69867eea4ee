"""What a ledger checks before it writes, and the shapes it stores: the maxima of amounts
and override changes, the checks of amounts and names, usage-record rows, and the handling
of a line given twice. Every backend imports these from here (or from
:mod:`tb_plugins.ledger.base`, which re-exports them)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from tb_plugins.core.lines import Line
from tb_plugins.core.usage import UNITS, UsageRecord, UsageRow
from tb_plugins.errors import LedgerError

_S = TypeVar("_S")

MAX_AMOUNT = 2**63 - 1
"""The largest amount a 64-bit counter holds (SQLite and PostgreSQL store signed int64)."""

MAX_OVERRIDE_BODY = 4096
"""The longest override change a ledger stores, in characters."""


def check_override(body: object) -> str:
    """Refuse an override change that is not storable text of at most
    :data:`MAX_OVERRIDE_BODY` characters (before anything is written)."""
    check_text("budget override", body)
    assert isinstance(body, str)
    if len(body) > MAX_OVERRIDE_BODY:
        raise LedgerError(
            f"a budget override of {len(body):,} characters is longer than the "
            f"{MAX_OVERRIDE_BODY:,} a ledger stores"
        )
    return body


def check_after(after: object) -> int:
    """Refuse an override version that is not a whole number from 0 to :data:`MAX_AMOUNT`."""
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= MAX_AMOUNT:
        raise LedgerError(f"an override version must be a whole number >= 0, got {after!r}")
    return after


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
    """Report rows from ``(key, requests, denied, input, output, cached input, usd, clamped,
    downgraded)`` tuples, sorted by key (every backend's ``usage`` ends here)."""
    out = [
        UsageRow(
            key=str(r[0]),
            requests=int(r[1]),
            denied=int(r[2]),
            input_tokens=int(r[3]),
            output_tokens=int(r[4]),
            cached_input_tokens=int(r[5]),
            usd=float(r[6]),
            clamped=int(r[7]),
            downgraded=int(r[8]),
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


@functools.lru_cache(maxsize=8192)
def _scopes(stored: str) -> tuple[str, ...]:
    """A scope list from its JSON; a log repeats its lists, so each is decoded once (the
    reads of ``benchmarks/bench_replay.py`` spend a third of their time decoding JSON)."""
    return tuple(json.loads(stored))


def record_from_row(row: Sequence[Any], text: Callable[[Any], Any] = _as_stored) -> UsageRecord:
    """A usage record from a row of :data:`RECORD_COLUMNS` (scopes and extra as JSON);
    ``text`` reads back the names (id, models, action) a backend stored in a form of its own."""
    extra = row[12]
    return UsageRecord(  # positional: a fifth faster than by keyword, for a million rows
        float(row[0]),  # ts
        text(row[1]),  # reservation_id
        _scopes(row[2]),
        text(row[3]),  # model
        text(row[4]),  # requested_model
        text(row[5]),  # action
        int(row[6]),  # input_tokens
        int(row[7]),  # output_tokens
        int(row[8]),  # cached_input_tokens
        float(row[9]),  # usd
        bool(row[10]),  # priced
        bool(row[11]),  # estimated
        {} if extra == "{}" else json.loads(extra),
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
