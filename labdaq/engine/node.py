"""Acquisition node: owns the instruments, claims queued runs and supervises channel workers.

Runs in its own OS process (``labdaq engine``), never in the API's: see docs/architecture.md
"Processes" for the measurements behind that.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.clock import EngineClock
from labdaq.engine.plan import Plan
from labdaq.engine.worker import ChannelWorker, RunContext, RunOutcome
from labdaq.engine.writer import SampleWriter
from labdaq.storage import models as m
from labdaq.storage.db import session_scope, sessionmaker

log = logging.getLogger(__name__)


def load_driver_class(name: str) -> type:
    """Find a driver by its entry-point name in the ``labdaq.drivers`` group."""
    found = {ep.name: ep for ep in entry_points(group="labdaq.drivers")}
    if name not in found:
        raise LookupError(f"no driver named {name!r}; installed: {sorted(found)}")
    cls: type = found[name].load()
    return cls


@dataclass
class OpenInstrument:
    row_id: int
    name: str
    driver: Any
    worker: Any  # labdaq.drivers.transport.InstrumentWorker


class AcquisitionNode:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: EngineClock,
        poll_s: float = 0.2,
        batch_rows: int = 2000,
        batch_age_s: float = 0.5,
        node_name: str | None = None,
    ) -> None:
        self.engine = engine
        self.maker = sessionmaker(engine)
        self.clock = clock
        self.poll_s = poll_s
        self.writer = SampleWriter(engine, batch_rows=batch_rows, batch_age_s=batch_age_s)
        self.node_name = node_name or socket.gethostname()
        self.instruments: dict[int, OpenInstrument] = {}
        self.active: dict[int, tuple[asyncio.Task[RunOutcome], RunContext]] = {}
        self._stopping = asyncio.Event()

    # -- instruments -------------------------------------------------------------------
    async def _open_instrument(self, row: m.Instrument) -> OpenInstrument:
        from labdaq.drivers.transport import InstrumentWorker, open_transport

        cls = load_driver_class(row.driver)
        worker = InstrumentWorker(name=row.name)

        def _open() -> Any:
            transport = open_transport(row.resource, **(row.options or {}).get("transport", {}))
            return cls(transport, name=row.name)

        driver = await worker.call(_open)
        inst = OpenInstrument(row.id, row.name, driver, worker)
        self.instruments[row.id] = inst
        return inst

    async def _instrument_for(self, instrument_id: int) -> OpenInstrument:
        inst = self.instruments.get(instrument_id)
        if inst is None:
            async with session_scope(self.maker) as s:
                row = await s.get(m.Instrument, instrument_id)
                assert row is not None
            inst = await self._open_instrument(row)
        return inst

    # -- lifecycle ---------------------------------------------------------------------
    async def recover(self) -> None:
        """Runs left active by a previous engine process are marked, never silently lost."""
        async with session_scope(self.maker) as s:
            rows = (
                await s.scalars(
                    select(m.Run).where(m.Run.state.in_([m.RunState.running, m.RunState.paused]))
                )
            ).all()
            for run in rows:
                run.state = m.RunState.interrupted.value
                run.ended_at = datetime.now(UTC)
                run.end_reason = "acquisition node restarted while the run was active"
                s.add(
                    m.Event(
                        run_id=run.id,
                        kind="interruption",
                        severity="warning",
                        message=run.end_reason,
                        data={"last_seq": run.last_seq, "elapsed_s": run.elapsed_s},
                        actor=self.node_name,
                    )
                )

    async def open_all(self) -> None:
        """Connect every configured instrument and make it safe before any run starts."""
        async with session_scope(self.maker) as s:
            rows = (await s.scalars(select(m.Instrument))).all()
        for row in rows:
            try:
                inst = await self._open_instrument(row)
                await inst.worker.call(inst.driver.safe_shutdown)
            except Exception as exc:  # noqa: BLE001 - one broken instrument must not stop the rest
                log.error("instrument %s (%s) not ready: %s", row.name, row.resource, exc)

    async def run_forever(self) -> None:
        self.writer.start()
        await self.recover()
        await self.open_all()
        try:
            while not self._stopping.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        for _task, ctx in self.active.values():
            ctx.stop.set()
        if self.active:
            await asyncio.gather(*(t for t, _ in self.active.values()), return_exceptions=True)
        await self.writer.close()
        for inst in self.instruments.values():
            try:
                await inst.worker.call(inst.driver.all_off)
            except Exception as exc:  # noqa: BLE001
                log.error("could not make %s safe: %s", inst.name, exc)
            inst.worker.shutdown(wait=False)

    # -- scheduling --------------------------------------------------------------------
    async def tick(self) -> None:
        await self._apply_requests()
        await self._claim_queued()
        await self._publish_progress()

    async def _apply_requests(self) -> None:
        if not self.active:
            return
        async with session_scope(self.maker) as s:
            rows = (
                await s.execute(
                    select(m.Run.id, m.Run.requested_action).where(
                        m.Run.id.in_(list(self.active)), m.Run.requested_action.is_not(None)
                    )
                )
            ).all()
        for run_id, action in rows:
            if action == "stop":
                self.active[run_id][1].stop.set()

    async def _claim_queued(self) -> None:
        async with session_scope(self.maker) as s:
            queued = (
                await s.execute(
                    select(m.Run, m.Channel)
                    .join(m.Channel, m.Channel.id == m.Run.channel_id)
                    .where(m.Run.state == m.RunState.queued.value)
                    .order_by(m.Run.id)
                )
            ).all()
        for run, channel in queued:
            if run.id in self.active:
                continue
            async with session_scope(self.maker) as s:
                # Claim atomically: only one node moves a run out of 'queued'.
                res = await s.execute(
                    update(m.Run)
                    .where(m.Run.id == run.id, m.Run.state == m.RunState.queued.value)
                    .values(
                        state=m.RunState.running.value,
                        started_at=datetime.now(UTC),
                        node=self.node_name,
                    )
                )
                if getattr(res, "rowcount", 0) != 1:
                    continue
            await self._start(run, channel)

    async def _start(self, run: m.Run, channel: m.Channel) -> None:
        try:
            inst = await self._instrument_for(channel.instrument_id)
        except Exception as exc:  # noqa: BLE001
            await self._finish(run.id, RunOutcome("failed", f"instrument unavailable: {exc}"))
            return
        plan = Plan.model_validate(run.plan)
        run_id = run.id
        ctx = RunContext(
            run_id=run_id,
            channel=channel.index,
            plan=plan,
            cycler=inst.driver,
            call=inst.worker.call,
            writer=self.writer,
            clock=self.clock,
            on_step_end=lambda d: self._record(m.Step(run_id=run_id, **d)),
            on_cycle_end=lambda d: self._record(m.Cycle(run_id=run_id, **d)),
            on_event=lambda kind, sev, msg, data: self._record(
                m.Event(
                    run_id=run_id,
                    kind=kind,
                    severity=sev,
                    message=msg,
                    data=data,
                    actor=self.node_name,
                )
            ),
            start_seq=run.last_seq,
        )
        worker = ChannelWorker(ctx)
        task = asyncio.create_task(self._supervise(worker), name=f"run-{run_id}")
        self.active[run_id] = (task, ctx)

    async def _supervise(self, worker: ChannelWorker) -> RunOutcome:
        run_id = worker.ctx.run_id
        try:
            outcome = await worker.run()
        except Exception as exc:  # noqa: BLE001 - any failure ends the run, with its reason
            log.exception("run %s failed", run_id)
            outcome = RunOutcome("failed", f"{type(exc).__name__}: {exc}")
        await self._finish(run_id, outcome, worker.ctx)
        self.active.pop(run_id, None)
        return outcome

    async def _finish(
        self, run_id: int, outcome: RunOutcome, ctx: RunContext | None = None
    ) -> None:
        async with session_scope(self.maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.state = outcome.state
            run.end_reason = outcome.reason
            run.ended_at = datetime.now(UTC)
            run.requested_action = None
            if ctx is not None:
                run.last_seq = ctx.progress.last_seq
                run.elapsed_s = ctx.progress.elapsed_s
                run.step_index = ctx.progress.step_index
                run.cycle_index = ctx.progress.cycle_index
            s.add(
                m.Event(
                    run_id=run_id,
                    kind="state",
                    severity="info" if outcome.state == "completed" else "warning",
                    message=f"run {outcome.state}: {outcome.reason}",
                    data={"state": outcome.state},
                    actor=self.node_name,
                )
            )

    async def _record(self, row: Any) -> None:
        async with session_scope(self.maker) as s:
            s.add(row)

    async def _publish_progress(self) -> None:
        if not self.active:
            return
        async with session_scope(self.maker) as s:
            for run_id, (_task, ctx) in list(self.active.items()):
                p = ctx.progress
                await s.execute(
                    update(m.Run)
                    .where(m.Run.id == run_id)
                    .values(
                        step_index=p.step_index,
                        step_count=p.step_count,
                        cycle_index=p.cycle_index,
                        elapsed_s=p.elapsed_s,
                        last_seq=p.last_seq,
                    )
                )
