"""SampleSink: where an instrument group hands its sample rows (and their ledger).

Two implementations with one contract: :class:`~labdaq.engine.writer.SampleWriter` (in the
engine's process) and :class:`~labdaq.engine.writer_process.WriterProcess` (the same writer
in a child process, the production default). The engine depends only on this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from labdaq.engine.ledger import Ledger
from labdaq.engine.sample_batch import SampleBatch

Rows = Sequence[Sequence[Any]]


class SinkLost(RuntimeError):
    """The sink can take no more rows (its process died); rows not yet committed or
    journaled are gone, and the engine resumes its runs from what is committed."""


class SampleSink(Protocol):
    """Batched, durable, idempotent storage of sample rows (see writer.py for the rules).

    ``put`` hands rows over — a :class:`~labdaq.engine.sample_batch.SampleBatch` (an
    instrument group's, as columns) or plain rows in ``SAMPLE_COLUMNS`` order — with the
    positions, steps and cycles they complete, committed in the same transaction;
    ``flush`` returns once everything handed over is committed or journaled; ``close``
    flushes and stops.
    """

    @property
    def db_available(self) -> bool: ...

    @property
    def journal_pending_rows(self) -> int: ...

    @property
    def rows_written(self) -> int: ...

    @property
    def rows_dropped(self) -> int: ...

    @property
    def dropped_by_run(self) -> dict[int, list[Any]]: ...

    def start(self) -> None: ...

    async def put(self, rows: Rows | SampleBatch, ledger: Ledger | None = None) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...
