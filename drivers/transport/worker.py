"""One worker thread per instrument: blocking I/O off the event loop, in order.

One job: :class:`InstrumentWorker` — the executor that runs a driver's blocking calls
for one instrument strictly one at a time, in submission order.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

class InstrumentWorker:
    """One worker thread per instrument: blocking I/O runs off the event loop, in order.

    ``await worker.call(transport.query, "*IDN?")``. Calls submitted from one coroutine
    or several are executed strictly one at a time in submission order.
    """

    def __init__(self, name: str = "instrument") -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"labdaq-{name}")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
        """Thread-side submission (returns a concurrent.futures.Future)."""
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    async def __aenter__(self) -> InstrumentWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
