"""Local append-only journal for sample batches the database could not take.

When the database is unavailable (SQLite file locked beyond its busy timeout, PostgreSQL
down or restarting), :class:`~labdaq.engine.writer.SampleWriter` appends each batch here
and replays the journal, oldest record first, once the database answers again. Inserts
are idempotent on ``(run_id, seq)``, so replaying a record that was (partly) committed
before a crash is harmless; that is what lets this module stay simple: a record is only
ever appended, and a file is only deleted after every record in it has been committed.

On-disk format (all integers little-endian)::

    directory/samples-<10-digit segment number>.journal
    file    := header record*
    header  := b"LDQJ" version:u8 (=1) reserved:3 bytes (zero)          8 bytes
    record  := length:u32 crc:u32 payload[length]
               crc = CRC-32 (zlib) over the 4 length bytes followed by the payload
    payload := one batch: its rows and ledger records (labdaq.engine.journal_payload)

Why length + CRC per record: each append is one ``write`` followed by ``fsync``, so a crash
(power cut, kill -9) can only leave the *last* record of the newest file incomplete. On
open, each file is read up to the first record whose header or payload is short or whose
CRC does not match; everything before it is valid, the rest is reported and ignored.
New records always go to a new segment after a restart, never after a torn tail.

Disk bound: ``max_bytes`` caps the total size of all segment files (default 1 GiB ≈ 10 M
sample rows). A batch whose record would exceed it is not written (``append_many`` returns
how many batches fit); the writer then drops that batch and raises its
``journal_overflowed`` flag so the engine can record an interruption instead of stalling
acquisition. Segments rotate at ``segment_bytes`` so
that replayed files can be deleted while new records are still being appended.

Not thread-safe: the writer calls it from one task, one call at a time (in a worker
thread, because ``fsync`` blocks).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labdaq.engine.journal_payload import PAYLOAD_HEAD, decode_payload, decode_rows, encode_rows

__all__ = ["Journal", "Record", "decode_payload", "decode_rows", "encode_rows"]

log = logging.getLogger(__name__)

MAGIC = b"LDQJ"
VERSION = 1
FILE_HEADER = MAGIC + bytes([VERSION, 0, 0, 0])
_REC_HEAD = struct.Struct("<II")  # length, crc
_LEN = struct.Struct("<I")
# A record larger than this can only be a corrupt length field (batches are far smaller).
MAX_RECORD_BYTES = 256 << 20
_NAME = re.compile(r"^samples-(\d{10})\.journal$")


@dataclass(frozen=True)
class Record:
    """One journaled batch, as returned by :meth:`Journal.peek`."""

    segment: int
    offset: int
    end: int  # offset just past this record
    rows: list[Sequence[Any]]
    records: bytes | None = None  # the batch's ledger records (JSON), if any


def _fsync_dir(path: Path) -> None:
    # A new or deleted file is durable only once its directory entry is.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """Append-only segment files of length-prefixed, CRC-checked sample batches."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._ends: dict[int, int] = {}  # segment -> offset past its last valid record
        self._sizes: dict[int, int] = {}  # segment -> bytes on disk (torn tails included)
        self._rows: dict[int, int] = {}  # segment -> rows not yet consumed
        self._active: int | None = None
        self._next_seg = 1  # segment numbers only grow, so names never collide
        self._fh: Any = None
        self._cursor: tuple[int, int] | None = None  # (segment, offset) of next to replay
        self.pending_rows = 0
        self.ignored_bytes = 0  # torn or corrupt bytes found at open
        self.lost_rows = 0  # rows in records that could not be read back for replay
        self.last_append_error: OSError | None = None  # why the last append stopped short
        self._opened = False

    # -- state ------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def segments(self) -> list[Path]:
        return [self._path(s) for s in sorted(self._sizes)]

    def _path(self, seg: int) -> Path:
        return self.directory / f"samples-{seg:010d}.journal"

    # -- open / scan ------------------------------------------------------------------
    def open(self) -> None:
        """Scan existing segments (left by a previous process) so they are replayed first."""
        if self._opened:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.iterdir()):
            m = _NAME.match(path.name)
            if m:
                self._next_seg = max(self._next_seg, int(m.group(1)) + 1)
                self._scan(int(m.group(1)), path)
        self._cursor = (min(self._ends), len(FILE_HEADER)) if self._ends else None
        self._opened = True

    def _scan(self, seg: int, path: Path) -> None:
        data = path.read_bytes()
        if len(data) < len(FILE_HEADER):
            # Crashed while creating the file: nothing was ever acknowledged from it.
            path.unlink()
            return
        if data[:4] != MAGIC or data[4] != VERSION:
            log.error("journal %s: not a version-%d journal file, left untouched", path, VERSION)
            return
        off, rows = len(FILE_HEADER), 0
        while True:
            rec = _read_record(data, off)
            if rec is None:
                break
            payload, end = rec
            rows += PAYLOAD_HEAD.unpack_from(payload)[1]
            off = end
        if off < len(data):
            self.ignored_bytes += len(data) - off
            log.warning(
                "journal %s: %d bytes after offset %d are a torn or corrupt record; ignored",
                path,
                len(data) - off,
                off,
            )
        self._ends[seg] = off
        self._sizes[seg] = len(data)
        self._rows[seg] = rows
        self.pending_rows += rows

    # -- append -----------------------------------------------------------------------
    def append_many(
        self,
        batches: Sequence[Sequence[Sequence[Any]]],
        records: Sequence[bytes | None] | None = None,
    ) -> int:
        """Append one record per batch, then fsync once; returns how many batches fit.

        ``records[i]``, when given, is batch i's ledger records (JSON), kept with its rows.

        Batches beyond the disk bound are not written (the caller counts them as lost).
        Raises OSError only when not even the first batch could be written.
        """
        self.last_append_error = None
        if not self._opened:
            self.open()
        blobs: list[bytes] = []
        total = self.size_bytes
        for j, rows in enumerate(batches):
            payload = encode_rows(rows, records[j] if records is not None else None)
            head = struct.pack("<I", len(payload))
            crc = zlib.crc32(payload, zlib.crc32(head))
            blob = head + struct.pack("<I", crc) + payload
            if total + len(blob) + len(FILE_HEADER) > self.max_bytes:
                break
            total += len(blob)
            blobs.append(blob)
        written = 0
        try:
            for blob, rows in zip(blobs, batches, strict=False):
                fh, seg = self._segment_for(len(blob))
                try:
                    _write_all(fh, blob)
                except OSError:
                    # Cut a partial record off again so later appends stay readable; if
                    # even that fails, never append to this file again.
                    try:
                        os.ftruncate(fh.fileno(), self._ends[seg])
                    except OSError:
                        self._close_active(sync=False)
                    raise
                self._ends[seg] += len(blob)
                self._sizes[seg] += len(blob)
                self._rows[seg] += len(rows)
                self.pending_rows += len(rows)
                written += 1
        except OSError as exc:
            self.last_append_error = exc
            if not written:
                raise
            log.error("journal append stopped after %d of %d batches: %s", written, len(blobs), exc)
        if written and self._fh is not None and self.fsync:
            try:
                os.fsync(self._fh.fileno())
            except OSError as exc:
                self.last_append_error = exc
                raise
        return written

    def _segment_for(self, nbytes: int) -> tuple[Any, int]:
        seg = self._active
        if seg is not None and self._sizes[seg] + nbytes > self.segment_bytes:
            self._close_active(sync=True)
            seg = None
        if seg is None:
            seg = self._next_seg
            fh = open(self._path(seg), "xb", buffering=0)  # noqa: SIM115 - kept for appends
            self._next_seg += 1
            try:
                _write_all(fh, FILE_HEADER)
                if self.fsync:
                    os.fsync(fh.fileno())
                    _fsync_dir(self.directory)
            except OSError:
                fh.close()
                self._path(seg).unlink(missing_ok=True)
                raise
            self._fh, self._active = fh, seg
            self._ends[seg] = self._sizes[seg] = len(FILE_HEADER)
            self._rows[seg] = 0
            if self._cursor is None:
                self._cursor = (seg, len(FILE_HEADER))
        return self._fh, seg

    def _close_active(self, sync: bool = False) -> None:
        if self._fh is not None:
            try:
                if sync and self.fsync:
                    os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
        self._fh, self._active = None, None

    # -- replay -----------------------------------------------------------------------
    def peek(self) -> Record | None:
        """The oldest record not yet consumed, or None when everything is replayed."""
        recs = self.peek_many(0)
        return recs[0] if recs else None

    def peek_many(self, max_rows: int) -> list[Record]:
        """The oldest records not yet consumed, in order, as many as fit in ``max_rows``
        rows (always at least one while any is left), without crossing into a later file.

        Replaying them in one transaction is what lets a journal drain faster than new
        rows arrive: replayed one small record at a time, it had fallen ever further
        behind and filled its bound.

        A first record that cannot be read back (file removed or damaged after it was
        scanned) is skipped with the rest of its file, its rows counted in ``lost_rows``,
        so one bad file cannot stop the replay of everything behind it. A bad record
        after the first only ends the list; the next call reaches it as a first record.
        """
        while self._cursor is not None:
            seg, off = self._cursor
            if off >= self._ends[seg]:
                if not self._finish_segment(seg):
                    break
                continue
            try:
                with open(self._path(seg), "rb") as fh:
                    fh.seek(off)
                    data = fh.read(self._ends[seg] - off)
                rec = _read_record(data, 0)
                if rec is None:
                    raise ValueError(f"record at offset {off} no longer valid")
                payload, end = rec
                out = [Record(seg, off, off + end, *decode_payload(payload))]
            except (OSError, ValueError, struct.error) as exc:
                log.error("journal %s unreadable, rest of file lost: %s", self._path(seg), exc)
                self.lost_rows += self._rows.get(seg, 0)
                self._finish_segment(seg)
                continue
            n = len(out[0].rows)
            while (rec := _read_record(data, end)) is not None:
                payload, nxt = rec
                try:
                    rows, records = decode_payload(payload)
                except (ValueError, struct.error):
                    break
                if n + len(rows) > max_rows:
                    break
                out.append(Record(seg, off + end, off + nxt, rows, records))
                n += len(rows)
                end = nxt
            return out
        # Nothing left to read, so nothing can be pending (keeps a caller's
        # "while pending_rows: peek()" loop from spinning on a miscount).
        self.pending_rows = 0
        return []

    def consume(self, rec: Record) -> None:
        """Mark ``rec`` committed to the database; delete its file once fully replayed."""
        assert self._cursor == (rec.segment, rec.offset), "records are consumed in order"
        n = len(rec.rows)
        self._rows[rec.segment] -= n
        self.pending_rows -= n
        self._cursor = (rec.segment, rec.end)
        if rec.end >= self._ends[rec.segment]:
            self._finish_segment(rec.segment)

    def _finish_segment(self, seg: int) -> bool:
        """Delete a fully replayed segment and move the cursor on; False if none follows."""
        if seg == self._active:
            # Everything appended so far is committed: start a fresh file next time so
            # this one can go now rather than when the next rotation happens.
            self._close_active()
        self._delete(seg)
        later = [s for s in self._ends if s > seg]
        self._cursor = (min(later), len(FILE_HEADER)) if later else None
        return bool(later)

    def _delete(self, seg: int) -> None:
        try:
            self._path(seg).unlink()
        except FileNotFoundError:
            pass
        self.pending_rows -= self._rows.pop(seg, 0)
        self._ends.pop(seg, None)
        self._sizes.pop(seg, None)
        if self.fsync:
            _fsync_dir(self.directory)

    def close(self) -> None:
        self._close_active()


def _write_all(fh: Any, blob: bytes) -> None:
    # An unbuffered file may take fewer bytes than offered; a record must go out whole.
    view = memoryview(blob)
    while view:
        n = fh.write(view)
        view = view[n:]


def _read_record(data: bytes | memoryview, off: int) -> tuple[bytes, int] | None:
    """(payload, end offset) of the record at ``off``, or None if short or corrupt."""
    if off + _REC_HEAD.size > len(data):
        return None
    length, crc = _REC_HEAD.unpack_from(data, off)
    start = off + _REC_HEAD.size
    if length < PAYLOAD_HEAD.size or length > MAX_RECORD_BYTES or start + length > len(data):
        return None
    payload = bytes(data[start : start + length])
    if zlib.crc32(payload, zlib.crc32(data[off : off + 4])) != crc:
        return None
    return payload, start + length
