"""The sample journal's format: payload encoding (packed, JSON, records written before the
temperature age), framing, corruption, read-ahead and its disk bound (labdaq.engine.journal)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from labdaq.engine.journal import FILE_HEADER, Journal, decode_rows, encode_rows
from tests.test_writer import _rows


def test_journal_encoding_round_trips() -> None:
    packed = [(1, 2, 0.5, 1.7e9, 3, 4, 3.7, -1.0, None, 0.1, 0.2, 5, None),
              (1, 3, 0.0, 0.0, 0, 0, 0.0, 0.0, math.inf, 0.0, 0.0, 0, 1.25)]
    assert decode_rows(encode_rows(packed)) == packed
    assert encode_rows(packed)[0] == 3  # fixed 106-byte rows (with the temperature's age)
    odd = [[1, 2**70, "x", None, 0, 0, 1.0, 2.0, 3.0, 4.0, 5.0, 6, None]]  # not packable
    assert encode_rows(odd)[0] == 2
    assert decode_rows(encode_rows(odd)) == odd
    nan = decode_rows(encode_rows([(1, 2, 0.0, 0.0, 0, 0, 0.0, 0.0, math.nan, 0.0, 0.0, 0,
                                    math.nan)]))
    assert math.isnan(nan[0][8]) and math.isnan(nan[0][12])


def test_journal_reads_records_written_before_the_temperature_age() -> None:
    """A journal left by the previous version (12 columns, kind 1 or JSON) replays with
    a NULL age."""
    import struct

    from labdaq.engine.journal import decode_payload

    row = (1, 2, 0.5, 1.7e9, 3, 4, 3.7, -1.0, True, 25.0, 0.1, 0.2, 5)
    v1 = struct.pack("<BI", 1, 1) + struct.Struct("<qqddqqdd?dddq").pack(*row)
    assert decode_payload(v1)[0] == [(1, 2, 0.5, 1.7e9, 3, 4, 3.7, -1.0, 25.0, 0.1, 0.2, 5,
                                      None)]
    old_json = struct.pack("<BI", 2, 1) + b"[[1, 2, 0.5, 0, 3, 4, 3.7, -1.0, null, 0, 0, 5]]"
    assert decode_payload(old_json)[0] == [[1, 2, 0.5, 0, 3, 4, 3.7, -1.0, None, 0, 0, 5,
                                            None]]


def test_journal_detects_corruption_rotates_and_deletes(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=25_000)
    batches = [_rows(1, i * 100 + 1, 100) for i in range(5)]  # ~9.7 kB each: 2 per file
    assert j.append_many(batches) == 5
    assert j.pending_rows == 500 and len(j.segments) == 3
    j.close()
    last = j.segments[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last record: CRC mismatch
    last.write_bytes(bytes(data))

    j = Journal(tmp_path)
    j.open()
    assert j.pending_rows == 400 and j.ignored_bytes > 0
    seen: list[Any] = []
    while (rec := j.peek()) is not None:
        seen += rec.rows
        j.consume(rec)
    assert seen == [r for b in batches[:4] for r in b]
    assert j.pending_rows == 0 and not list(tmp_path.iterdir())
    # New records after a restart go to a new file, never behind a torn tail.
    assert j.append_many([_rows(1, 1, 10)]) == 1
    (f,) = list(tmp_path.iterdir())
    assert f.read_bytes().startswith(FILE_HEADER)


def test_journal_peek_many_reads_ahead_without_consuming(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    batches = [_rows(1, i * 100 + 1, 100) for i in range(5)]
    assert j.append_many(batches) == 5
    recs = j.peek_many(350)
    assert [len(r.rows) for r in recs] == [100, 100, 100]
    assert [r.rows for r in recs] == batches[:3]
    assert j.pending_rows == 500  # nothing consumed yet
    assert [r.rows for r in j.peek_many(10)] == [batches[0]]  # one even if over the cap
    for r in recs:
        j.consume(r)
    assert [r.rows for r in j.peek_many(10_000)] == batches[3:]
    assert j.pending_rows == 200


def test_journal_disk_bound(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=25_000)
    assert j.append_many([_rows(1, 1, 100)] * 5) == 2
    assert j.size_bytes <= 25_000 and j.pending_rows == 200
