"""The Redis ledger's wire format: what goes to ``ledger.lua`` and what comes back.

Speed tricks, justified by the ``redis`` rows of ``benchmarks/bench_shared_ledgers.py``
(reserve + settle against two bare round trips): the numbers of a call go to the script as one
string of packed little-endian doubles instead of one argument each (no formatting here, no
``tonumber`` there), the states come back as packed int64s unpacked with one ``struct`` call,
and a usage record's JSON is assembled from cached parts (a call's scopes, model and action
recur from call to call), so only its numbers, id and ``extra`` are encoded per call.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Sequence

from tb_plugins.core.usage import UsageRecord
from tb_plugins.ledger.base import LineState
from tb_plugins.ledger.checks import json_text, out_of_range

__all__ = ["decode_record", "encode_record", "num", "pack", "states", "token", "watched"]


def num(value: float) -> str:
    """A float as Redis and Lua read it back exactly."""
    return repr(float(value))


@functools.lru_cache(maxsize=256)
def _doubles(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


@functools.lru_cache(maxsize=256)
def _int64s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}q")


def pack(numbers: Sequence[float]) -> bytes:
    """Numbers as the script reads them: little-endian doubles, one argument for all.

    Raises:
        LedgerError: a number no double holds (``amount out of range``).
    """
    try:
        return _doubles(len(numbers)).pack(*numbers)
    except (struct.error, OverflowError, TypeError) as exc:
        raise out_of_range("a number for the Redis script", exc) from exc


def states(packed: bytes) -> tuple[LineState, ...]:
    """The script's states: 12 little-endian int64s per line (6 spent, then 6 held)."""
    v = _int64s(len(packed) // 8).unpack(packed)
    return tuple(
        LineState(spent=v[i : i + 6], held=v[i + 6 : i + 12]) for i in range(0, len(v), 12)
    )


def watched(packed: bytes, mask: Sequence[bool] | None) -> tuple[LineState | None, ...]:
    """Per line, its state if the script read it back (``mask``; every line when None)."""
    read = states(packed)
    if mask is None:
        return read
    it = iter(read)
    return tuple(next(it) if w else None for w in mask)


def token() -> str:
    """A random token naming one settle call (see ``P:s:<rid>`` in ``ledger.lua``)."""
    return os.urandom(8).hex()


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


def encode_record(r: UsageRecord) -> str:
    """The record as a JSON object (what :func:`decode_record` reads back)."""
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


def decode_record(member: bytes) -> UsageRecord:
    """A usage record from its log entry: 16 hex digits of its sequence, then its JSON."""
    d = json.loads(member[16:].decode("utf-8"))
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
