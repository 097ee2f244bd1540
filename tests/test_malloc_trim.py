"""labdaq.malloc_trim: the API's periodic return of free malloc memory to the OS."""

from __future__ import annotations

import asyncio
import ctypes.util

import pytest

from labdaq import malloc_trim


def test_trim_works_where_glibc_is() -> None:
    has_glibc = ctypes.util.find_library("c") is not None and malloc_trim._trim is not None
    assert malloc_trim.trim() is has_glibc


async def test_trim_forever_trims_each_period_until_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if malloc_trim._trim is None:
        pytest.skip("no malloc_trim in this C library")
    calls: list[int] = []
    third = asyncio.Event()

    def fake(pad: int) -> int:
        calls.append(pad)
        if len(calls) == 3:
            third.set()
        return 1

    monkeypatch.setattr(malloc_trim, "_trim", fake)
    task = asyncio.create_task(malloc_trim.trim_forever(every_s=0.0))
    await asyncio.wait_for(third.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:3] == [0, 0, 0]
