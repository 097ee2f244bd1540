"""A journal record's payload: one batch of sample rows and the ledger records that go
with them, in the fixed layout when every row fits it (:mod:`labdaq.engine.journal` frames
the payloads into segment files)::

    payload := kind:u8 nrows:u32 body
      kind 1 "packed": nrows × struct "<qqddqqdd?dddq" (97 bytes): run_id, seq, t_s,
             ts_utc, step_index, cycle_index, voltage_v, current_a, has_temperature,
             temperature_c (0.0 when absent → None), step_capacity_ah, step_energy_wh, flags
      kind 2 "json": UTF-8 JSON array of rows (lists), used when a batch does not fit the
             packed layout (an unexpected None, a big integer, ...); keeps every value.
      kind 3 "packed with age": kind 1's row followed by has_temperature_age:?,
             temperature_age_s:d (106 bytes; None as for the temperature). Written since
             samples gained temperature_age_s; kind 1 and 12-column JSON rows (written
             before) are read back with a NULL age.
      kind | 0x80: the batch's records (positions, steps, cycles; labdaq.engine.ledger)
             come first, as length:u32 + UTF-8 JSON, then the body of kind & 0x7f. They
             are replayed in the same transaction as the rows.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

PAYLOAD_HEAD = struct.Struct("<BI")  # kind, nrows
_ROW_V1 = struct.Struct("<qqddqqdd?dddq")  # kind 1: written before temperature_age_s
_ROW = struct.Struct("<qqddqqdd?dddq?d")
KIND_PACKED = 1
KIND_JSON = 2
KIND_PACKED_AGE = 3
_NCOLS = 13  # SAMPLE_COLUMNS
KIND_HAS_RECORDS = 0x80
_LEN = struct.Struct("<I")


def encode_rows(rows: Sequence[Sequence[Any]], records: bytes | None = None) -> bytes:
    """Payload for one batch: the packed layout when every row fits it, else JSON;
    ``records`` (JSON bytes), when given, travel in front of the rows."""
    try:
        payload = _pack(rows)
    except (struct.error, TypeError, IndexError, ValueError):
        # Not representable in the fixed layout; JSON keeps the values as given.
        body = json.dumps([list(r) for r in rows], default=_json_default).encode()
        payload = PAYLOAD_HEAD.pack(KIND_JSON, len(rows)) + body
    if records is None:
        return payload
    head = PAYLOAD_HEAD.pack(payload[0] | KIND_HAS_RECORDS, len(rows))
    return head + _LEN.pack(len(records)) + records + payload[PAYLOAD_HEAD.size :]


def decode_rows(payload: bytes) -> list[Sequence[Any]]:
    return decode_payload(payload)[0]


def decode_payload(payload: bytes) -> tuple[list[Sequence[Any]], bytes | None]:
    """(rows, records JSON or None) of one record's payload."""
    kind, nrows = PAYLOAD_HEAD.unpack_from(payload)
    body = memoryview(payload)[PAYLOAD_HEAD.size :]
    records = None
    if kind & KIND_HAS_RECORDS:
        kind &= ~KIND_HAS_RECORDS
        (n,) = _LEN.unpack_from(body)
        records = bytes(body[_LEN.size : _LEN.size + n])
        body = body[_LEN.size + n :]
    if kind == KIND_PACKED_AGE:
        out: list[Sequence[Any]] = [
            (a, b, c, d, e, f, g, h, t if has_t else None, i, j, k, age if has_age else None)
            for a, b, c, d, e, f, g, h, has_t, t, i, j, k, has_age, age
            in _ROW.iter_unpack(body)
        ]
    elif kind == KIND_PACKED:
        out = [
            (a, b, c, d, e, f, g, h, t if has_t else None, i, j, k, None)
            for a, b, c, d, e, f, g, h, has_t, t, i, j, k in _ROW_V1.iter_unpack(body)
        ]
    elif kind == KIND_JSON:
        out = [r + [None] * (_NCOLS - len(r)) for r in json.loads(bytes(body))]
    else:
        raise ValueError(f"unknown journal record kind {kind}")
    if len(out) != nrows:
        raise ValueError(f"journal record says {nrows} rows, holds {len(out)}")
    return out, records


def _pack(rows: Sequence[Sequence[Any]]) -> bytes:
    n = len(rows)
    buf = bytearray(PAYLOAD_HEAD.size + n * _ROW.size)
    PAYLOAD_HEAD.pack_into(buf, 0, KIND_PACKED_AGE, n)
    pack_into, size = _ROW.pack_into, _ROW.size
    off = PAYLOAD_HEAD.size
    for r in rows:
        if len(r) != _NCOLS:
            raise ValueError(f"row is not {_NCOLS} columns")
        # The nullable columns: a presence byte keeps None apart from NaN.
        t, age = r[8], r[12]
        has_t, has_age = t is not None, age is not None
        pack_into(buf, off, *r[:8], has_t, t if has_t else 0.0, r[9], r[10], r[11],
                  has_age, age if has_age else 0.0)
        off += size
    return bytes(buf)


def _json_default(obj: Any) -> Any:
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"{type(obj).__name__} is not journalable")
