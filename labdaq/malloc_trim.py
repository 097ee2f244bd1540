"""Give glibc malloc's free memory back to the OS now and then, in the API process.

The API frees most of what a request allocates (SQLite result rows, JSON bodies, Arrow
tables) from several threads (the event loop, anyio's worker pool, aiosqlite's connection
threads); glibc keeps freed chunks in its heaps for reuse, and a heap whose top is in use
keeps the free holes below it resident, so under a steady load the API's resident
memory grew while the memory in use did not (docs/performance.md, "What grew in the
API"). ``malloc_trim(0)`` releases the
free pages of every arena (madvise, not only the top), so resident memory follows what
is in use. It takes a lock per arena for a moment; once a minute is nothing next to a
request.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Any

#: Seconds between two trims.
TRIM_EVERY_S = 60.0

_log = logging.getLogger(__name__)


def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _libc()


def trim() -> bool:
    """Release malloc's free memory to the OS; False where there is no malloc_trim."""
    if _trim is None:
        return False
    _trim(0)
    return True


async def trim_forever(every_s: float = TRIM_EVERY_S) -> None:
    """:func:`trim` every ``every_s`` seconds, on a worker thread (the event loop does not
    wait for the arenas' locks)."""
    if _trim is None:
        _log.info("no malloc_trim in this C library; memory is not trimmed")
        return
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(trim)
