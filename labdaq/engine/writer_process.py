"""The sample writer in a process of its own: same contract as SampleWriter, no shared GIL.

Why: inside the engine process the writer's ``executemany`` runs in a thread that releases
the GIL on every row's ``sqlite3_step`` and then waits for the acquisition loop to give it
back, so a batch took several times longer next to a busy loop than alone
(docs/performance.md). The design map puts the writer in its own process for that reason.

Data path::

    engine process                          writer process
    put(batch) ── pipe (binary batch) ──▶ receiver thread ─▶ SampleWriter ─▶ database
       ▲                                   (decode to rows)       │        └▶ journal
       └────────── stats (rows settled, db state) ◀── every 20 ms ┘

* An instrument group's rows arrive as a :class:`~labdaq.engine.sample_batch.SampleBatch`
  (numpy columns) and cross the pipe in its binary form, one ``send_bytes`` per put: the
  engine's loop neither builds row tuples nor pickles them; the child's receiver thread
  decodes them to the rows it inserts. Rows handed over as plain sequences, and the
  flush/close requests, go pickled as before (:mod:`.sample_batch` tells them apart).

* Back-pressure as in SampleWriter: rows sent and not yet settled (committed, journaled,
  rejected or dropped) in the child count against ``max_pending_rows``; ``put`` waits for
  the child's next report when they would exceed it.
* ``flush`` covers every row handed over before it (the pipe keeps order) and returns when
  the child's SampleWriter.flush does; ``close`` flushes, closes and waits for the child.
* The child exits at once, writing nothing more, when the pipe to its engine breaks (the
  engine was killed): rows it had not committed are lost exactly as they would be in a
  killed single process, and a restarted engine never races a leftover writer for the
  same ``(run_id, seq)``. Journal files it wrote are replayed by the next writer.
* A dead child (crash, OOM kill) raises :class:`WriterProcessDied` from ``put`` and
  ``flush`` and calls ``on_death``: the groups turn their outputs off and keep their runs,
  the node stops, and ``labdaq serve`` restarts the engine (and so the writer), which
  resumes the runs after their last committed sample and the position committed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from labdaq.engine.ledger import Ledger
from labdaq.engine.sample_batch import SampleBatch, decode, encode, is_batch
from labdaq.engine.sample_rows import rows_of
from labdaq.engine.sink import SinkLost

log = logging.getLogger(__name__)

Rows = Sequence[Sequence[Any]]

# Counters and state mirrored from the child's SampleWriter after every report.
_STATS = (
    "rows_written", "batches_written", "rows_journaled", "rows_replayed", "rows_rejected",
    "rows_dropped", "journal_overflowed", "db_available", "journal_pending_rows",
    "last_error", "rows_settled", "dropped_by_run",
)
_REPORT_S = 0.02


class WriterProcessDied(SinkLost):
    """The writer process is gone; samples handed to it after its last report are lost."""


class WriterProcess:
    """Proxy for a SampleWriter running in a child process (see the module docstring).

    Exposes what the engine uses of SampleWriter: ``start``, ``put``, ``flush``, ``close``,
    ``pending_rows``, ``journal_pending_rows``, ``max_pending_rows`` and the counters.
    """

    def __init__(
        self,
        database_url: str,
        batch_rows: int = 2000,
        batch_age_s: float = 0.5,
        max_pending_rows: int = 200_000,
        journal_dir: Path | None = None,
        **writer_kwargs: Any,
    ) -> None:
        self.database_url = database_url
        self.max_pending_rows = max(1, max_pending_rows)
        self._kwargs = dict(
            batch_rows=batch_rows, batch_age_s=batch_age_s,
            max_pending_rows=self.max_pending_rows,
            journal_dir=str(journal_dir) if journal_dir is not None else None,
            **writer_kwargs,
        )
        self._proc: Any = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called once with the reason when the child dies (not on close): the node stops
        # so that its supervisor restarts the engine, writer included.
        self.on_death: Callable[[str], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._sent = 0
        self._space = asyncio.Event()
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tokens = itertools.count(1)
        self._dead: str | None = None
        self._closing = False
        self.rows_written = 0
        self.batches_written = 0
        self.rows_journaled = 0
        self.rows_replayed = 0
        self.rows_rejected = 0
        self.rows_dropped = 0
        self.journal_overflowed = False
        self.db_available = True
        self.journal_pending_rows = 0
        self.last_error: str | None = None
        self.rows_settled = 0
        self.dropped_by_run: dict[int, list[Any]] = {}

    # -- state ------------------------------------------------------------------------
    @property
    def pending_rows(self) -> int:
        """Rows handed over and not yet settled in the child."""
        return self._sent - self.rows_settled

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            return
        self._loop = asyncio.get_running_loop()
        # A fresh interpreter running this module, not multiprocessing's spawn (which
        # re-imports the parent's __main__) or fork (the engine has threads and a loop).
        parent, child = mp.Pipe(duplex=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(child.fileno())],
            stdin=subprocess.PIPE, pass_fds=(child.fileno(),), close_fds=True,
        )
        child.close()
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"url": self.database_url, **self._kwargs}).encode())
        self._proc.stdin.close()
        self._conn = parent
        self._loop.add_reader(parent.fileno(), self._on_readable)

    async def put(self, rows: Rows | SampleBatch, ledger: Ledger | None = None) -> None:
        """Hand rows over (with their ledger, see SampleWriter.put); waits only while
        ``max_pending_rows`` are unsettled."""
        n = len(rows)
        if not n:
            return
        self._check_alive()
        while self.pending_rows + n > self.max_pending_rows and self.pending_rows > 0:
            self._space.clear()
            await self._space.wait()
            self._check_alive()
        if isinstance(rows, SampleBatch):
            self._send_bytes(encode(rows, ledger))
        else:
            self._send(("put", rows if isinstance(rows, list) else list(rows), ledger))
        self._sent += n

    async def flush(self) -> None:
        """Return once every row handed over so far is committed or durably journaled."""
        reply = await self._request("flush")
        if "error" in reply:
            raise RuntimeError(f"writer process: {reply['error']}")

    async def close(self) -> None:
        """Flush, stop the child and wait for it; a journal left behind is replayed later."""
        if self._proc is None:
            return
        try:
            if self._dead is None:
                await self._request("close")
                self._closing = True
        finally:
            proc, self._proc = self._proc, None
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
            self._detach()

    # -- internals --------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise WriterProcessDied(f"writer process ended: {self._dead}")
        if self._proc is None:
            raise RuntimeError("writer process not started")

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_bytes(self, buf: bytes) -> None:
        assert self._conn is not None
        try:
            self._conn.send_bytes(buf)
        except (OSError, ValueError) as exc:
            self._died(f"pipe closed ({exc})")
            raise WriterProcessDied(f"writer process ended: {self._dead}") from exc

    async def _request(self, kind: str) -> dict[str, Any]:
        self._check_alive()
        assert self._loop is not None
        token = next(self._tokens)
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiters[token] = fut
        try:
            self._send((kind, token))
            return await fut
        finally:
            self._waiters.pop(token, None)

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll(0):
                self._handle(conn.recv())
        except (EOFError, OSError) as exc:
            if self._closing:
                self._detach()  # the child has closed and exited
                return
            code = self._proc.poll() if self._proc is not None else None
            self._died(f"pipe closed ({type(exc).__name__}), exit code {code}")

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        stats: dict[str, Any] = msg[-1]
        for name in _STATS:
            if name in stats:
                setattr(self, name, stats[name])
        self._space.set()
        if kind in ("flushed", "closed"):
            fut = self._waiters.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(stats)
        elif kind == "fatal":
            self._died(str(stats.get("error")))

    def _died(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            log.error("sample writer process: %s", why)
            if self.on_death is not None:
                self.on_death(why)
        self._space.set()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(WriterProcessDied(f"writer process ended: {why}"))
        self._detach()

    def _detach(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn.fileno())
            conn.close()


# -- the child ---------------------------------------------------------------------------
def _child_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s writer: %(message)s")
    conn = Connection(int(argv[0]))
    kwargs = json.loads(sys.stdin.read())
    database_url = kwargs.pop("url")
    asyncio.run(_child(conn, database_url, kwargs))


async def _child(conn: Connection, database_url: str, kwargs: dict[str, Any]) -> None:
    from labdaq.engine.writer import SampleWriter
    from labdaq.storage.db import create_engine

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def deliver(msgs: list[tuple[Any, ...]]) -> None:
        for msg in msgs:
            inbox.put_nowait(msg)

    def message() -> tuple[Any, ...]:
        buf = conn.recv_bytes()
        if is_batch(buf):
            batch, ledger = decode(buf)
            return ("put", rows_of(batch), ledger)
        msg: tuple[Any, ...] = pickle.loads(buf)
        return msg

    def receive() -> None:
        # A thread, so the pipe is drained while the writer awaits the database. What is
        # already waiting in the pipe goes over in one hand-off: waking the loop for each
        # tick's rows cost as much as reading them.
        while True:
            try:
                msgs = [message()]
                while len(msgs) < 256 and conn.poll():
                    msgs.append(message())
            except (EOFError, OSError):
                # The engine is gone without closing us: stop now (module docstring).
                os._exit(0)
            except Exception:  # noqa: BLE001 - a message we cannot read: end like a crash
                log.exception("sample writer: unreadable message from the engine")
                os._exit(1)
            loop.call_soon_threadsafe(deliver, msgs)

    engine = create_engine(database_url)
    jd = kwargs.pop("journal_dir")
    writer = SampleWriter(engine, journal_dir=Path(jd) if jd else None, **kwargs)

    def stats() -> dict[str, Any]:
        now = {name: getattr(writer, name) for name in _STATS}
        # A copy: the writer updates these bounds in place, and report() compares.
        now["dropped_by_run"] = {k: list(v) for k, v in writer.dropped_by_run.items()}
        return now

    def reply(*msg: Any) -> None:
        conn.send(msg)  # only from this event loop's thread; receive() only reads

    async def report() -> None:
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(_REPORT_S)
            now = stats()
            if now != last:
                reply("stats", now)
                last = now

    async def flush(token: int) -> None:
        try:
            await writer.flush()
        except Exception as exc:  # noqa: BLE001 - reported to the engine
            reply("flushed", token, {**stats(), "error": f"{type(exc).__name__}: {exc}"})
            return
        reply("flushed", token, stats())

    writer.start()
    threading.Thread(target=receive, name="writer-pipe", daemon=True).start()
    reporter = asyncio.create_task(report())
    flushes: set[asyncio.Task[None]] = set()
    try:
        while True:
            msg = await inbox.get()
            kind = msg[0]
            if kind == "put":
                await writer.put(msg[1], msg[2])
            elif kind == "flush":
                task = asyncio.create_task(flush(msg[1]))
                flushes.add(task)
                task.add_done_callback(flushes.discard)
            elif kind == "close":
                await writer.close()
                reporter.cancel()
                reply("closed", msg[1], stats())
                break
    except Exception as exc:  # noqa: BLE001 - tell the engine, then end
        log.exception("sample writer failed")
        with contextlib.suppress(Exception):
            reply("fatal", {**stats(), "error": f"{type(exc).__name__}: {exc}"})
    finally:
        await engine.dispose()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
