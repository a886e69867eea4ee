"""The PostgreSQL ledger's wire format: the parameters of its statements, the states they
return, and how names are kept in text columns.

Speed tricks, justified by the ``postgres`` and ``pg-async`` rows of
``benchmarks/bench_shared_ledgers.py`` (reserve + settle against two bare round trips): the
array parameters are packed here in PostgreSQL's binary array format, so neither side parses
text and psycopg adapts nothing element by element; every int goes as an int8, so each statement
keeps one server-side prepared plan; the states come back as one bytea (``array_send``)
unpacked with one ``struct`` call; and the hashes of line keys and the columns of a scope path,
which recur from call to call, are cached.

PostgreSQL text cannot hold NUL: the names the usage log keeps as text (reservation id, models,
action; alert keys) escape it with U+FDD0, a noncharacter (reserved for internal use):
NUL -> U+FDD0 "0", U+FDD0 -> U+FDD0 U+FDD0. Names without either are stored as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from tb_plugins.core.usage import UsageRecord
from tb_plugins.ledger.base import Line, LineState

__all__ = [
    "F64",
    "I32",
    "ByteaArray",
    "Float8Array",
    "Int4Array",
    "adapters",
    "array",
    "from_text",
    "hashes",
    "int8_values",
    "int8s",
    "keys",
    "record_args",
    "sha",
    "states",
    "to_text",
    "watched",
]


class _PgArray(bytes):
    """An array parameter already in PostgreSQL's binary format; ``oid`` is its array type."""

    __slots__ = ()
    oid = 0


class Int8Array(_PgArray):
    __slots__ = ()
    oid = 1016


class Int4Array(_PgArray):
    __slots__ = ()
    oid = 1007


class Float8Array(_PgArray):
    __slots__ = ()
    oid = 1022


class ByteaArray(_PgArray):
    __slots__ = ()
    oid = 1001


class TextArray(_PgArray):
    __slots__ = ()
    oid = 1009


_A = TypeVar("_A", bound=_PgArray)
I32 = struct.Struct(">i")
F64 = struct.Struct(">d")
_NULL = b"\xff\xff\xff\xff"  # the length of a NULL element


@functools.lru_cache(maxsize=64)
def _pairs(n: int) -> struct.Struct:
    """n (length, int8) pairs: the elements of an int8 array."""
    return struct.Struct(">" + "iq" * n)


def _head(elem_oid: int, dims: Sequence[int], nulls: bool = False) -> bytes:
    """The header of a binary array: dimensions, null flag, element type, sizes and bounds."""
    bounds = [x for d in dims for x in (d, 1)]
    return struct.pack(f">iii{len(bounds)}i", len(dims), nulls, elem_oid, *bounds)


def int8s(values: Sequence[int], dims: Sequence[int] | None = None) -> Int8Array:
    """An int8[] parameter (``dims``: its shape, default 1-D)."""
    n = len(values)
    if not n:
        return Int8Array(_head(20, ()))
    body = _pairs(n).pack(*[x for v in values for x in (8, v)])
    return Int8Array(_head(20, dims or (n,)) + body)


def array(cls: type[_A], elem_oid: int, items: Sequence[bytes | None]) -> _A:
    """A 1-D array parameter of already encoded elements (None: NULL)."""
    if not items:
        return cls(_head(elem_oid, ()))
    parts = [_head(elem_oid, (len(items),), any(x is None for x in items))]
    parts += [_NULL if x is None else I32.pack(len(x)) + x for x in items]
    return cls(b"".join(parts))


def int8_values(packed: bytes | None) -> tuple[int, ...]:
    """The elements of an int8 array as array_send gives it (any shape), in order."""
    if not packed:
        return ()
    ndim = I32.unpack_from(packed)[0]
    start = 12 + 8 * ndim
    values: tuple[int, ...] = _pairs((len(packed) - start) // 12).unpack_from(packed, start)
    return values[1::2]


_ADAPTERS: list[Any] = []


def adapters(pg: Any) -> Any:
    """psycopg's adapters, plus: the packed arrays above go as they are, and every Python int
    is dumped as an int8 (text and binary), so the statements always send the same parameter
    types (one prepared plan each) and the server casts nothing."""
    if not _ADAPTERS:
        from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

        class PackedDumper(pg.adapt.Dumper):  # type: ignore[misc]
            format = pg.pq.Format.BINARY

            def dump(self, obj: bytes) -> bytes:
                return obj

        found = pg.adapt.AdaptersMap(pg.adapters)
        found.register_dumper(int, Int8Dumper)
        found.register_dumper(int, Int8BinaryDumper)
        for cls in (Int8Array, Int4Array, Float8Array, ByteaArray, TextArray):
            dumper = type(f"{cls.__name__}Dumper", (PackedDumper,), {"oid": cls.oid})
            found.register_dumper(cls, dumper)
        _ADAPTERS.append(found)
    return _ADAPTERS[0]


def sha(text: str) -> bytes:
    """The SHA-256 of ``text``: how lines, scopes, reservations and alerts are found."""
    return hashlib.sha256(text.encode("utf-8")).digest()


_short_sha = functools.lru_cache(maxsize=4096)(sha)


def _key_sha(text: str) -> bytes:
    """:func:`sha` of a line key or scope: cached, as they recur from call to call (unless
    long, to bound the cache's memory)."""
    return _short_sha(text) if len(text) <= 256 else sha(text)


def keys(lines: Sequence[Line]) -> TextArray:
    """The lines' keys, as a text[] parameter."""
    return array(TextArray, 25, [ln.key.encode() for ln in lines])


def hashes(lines: Sequence[Line]) -> ByteaArray:
    """The hashes of the lines' keys, as a bytea[] parameter."""
    return array(ByteaArray, 17, [_key_sha(ln.key) for ln in lines])


_ESC = "\ufdd0"
_UNESCAPE = re.compile(_ESC + "(.)", re.DOTALL)


def to_text(value: str | None) -> str | None:
    """``value`` as PostgreSQL text can hold it (NUL escaped, see the module)."""
    if value is None or ("\x00" not in value and _ESC not in value):
        return value
    return value.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")


def from_text(value: Any) -> Any:
    """The name :func:`to_text` stored (a column's value: text or NULL)."""
    if value is None or _ESC not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\x00" if m[1] == "0" else _ESC if m[1] == _ESC else m[0], value)


@functools.lru_cache(maxsize=1024)
def _scope_args(scopes: tuple[str, ...]) -> tuple[str, ByteaArray, TextArray]:
    """The usage log's columns for a record's scopes: the JSON list, and the hash and escaped
    name of each distinct scope."""
    escaped = [quote(s, safe="") for s in dict.fromkeys(scopes)]
    found = array(ByteaArray, 17, [_key_sha(s) for s in escaped])
    return json.dumps(list(scopes)), found, array(TextArray, 25, [s.encode() for s in escaped])


def record_args(r: UsageRecord) -> tuple[Any, ...]:
    """The parameters of a usage record (``_RECORD_ARGS`` of the statements)."""
    path = tuple(r.scopes)
    short = sum(map(len, path)) <= 1024  # cache only what bounds the cache's memory
    scopes, scope_hashes, escaped = (_scope_args if short else _scope_args.__wrapped__)(path)
    extra = json.dumps(r.extra, default=str) if r.extra else "{}"
    return (
        float(r.ts), to_text(r.reservation_id), scopes, to_text(r.model),
        to_text(r.requested_model), to_text(r.action),
        int(r.input_tokens), int(r.output_tokens), int(r.cached_input_tokens), float(r.usd),
        bool(r.priced), bool(r.estimated), extra, scope_hashes, escaped,
    )  # fmt: skip


def _state(v: Sequence[int], at: int) -> LineState:
    """The line state of the 12 integers from ``v[at]``: 6 spent, then 6 held."""
    return LineState(spent=(v[at], v[at + 1], v[at + 2], v[at + 3], v[at + 4], v[at + 5]),
                     held=(v[at + 6], v[at + 7], v[at + 8], v[at + 9], v[at + 10],
                           v[at + 11]))  # fmt: skip


def states(v: Sequence[int], at: int, index: Sequence[int]) -> tuple[LineState, ...]:
    """Line states from 12 integers per distinct line from ``v[at]``, in the order ``index``
    gives."""
    found = [_state(v, i) for i in range(at, len(v), 12)]
    return tuple(found[i] for i in index)


def watched(
    v: Sequence[int], index: Sequence[int], pick: Sequence[int]
) -> tuple[LineState | None, ...]:
    """Per given line, the state read back for its distinct line (12 integers each from
    ``v[12]``, in the order of ``pick``), or None when it was not read."""
    read = {u: _state(v, 12 * (k + 1)) for k, u in enumerate(pick)}
    return tuple(read.get(u) for u in index)
