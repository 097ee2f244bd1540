"""Recovery: runs picking up after a gap, from the position committed with their samples.

Part of :class:`labdaq.engine.node.AcquisitionNode` (a mixin, so the node's lifecycle
reads on its own in node.py). Three kinds of gap end the same way, in :meth:`_resume`:

* the engine process restarted (``recover``, once the journal of the last one is
  replayed);
* an instrument stopped answering and came back (``_await_and_resume``).

(A dead sample writer stops the node; ``labdaq serve`` restarts the engine, so that is an
engine restart.)

A run resumes at the step it was in, from its saved position, which counts exactly the
committed samples (it was committed in the same transaction as them); the time in
between is a gap with exact bounds (an interruption event) and the first reading after
it is flagged RESUMED. Only a gap longer than ``max_resume_gap_s``, an instrument that
does not come back, or a position that does not match the committed samples ends a run
``interrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from labdaq.engine import wallclock
from labdaq.engine.channel import ChannelRun
from labdaq.engine.events import RunEvent
from labdaq.engine.instruments import answers
from labdaq.engine.node_parts import NodeParts
from labdaq.engine.setpoints import LOST_INSTRUMENT
from labdaq.heartbeat import INSTRUMENT_OK
from labdaq.protocol import ResolvedProtocol
from labdaq.storage import models as m
from labdaq.storage.db import session_scope

log = logging.getLogger(__name__)


class Recovery(NodeParts):

    # -- engine restart ----------------------------------------------------------------
    async def _recover_when_ready(self) -> None:
        """Recover once the database answers and a previous process's journal is replayed.

        Resuming numbers new samples after the last *committed* one, so journaled rows of
        the previous process must be in the database first, or they would collide.
        """
        delay = self.poll_s
        while not self._stopping.is_set():
            try:
                await self.writer.flush()
                if self.writer.journal_pending_rows == 0:
                    await self.recover()
                    return
                why = f"{self.writer.journal_pending_rows} journaled samples not replayed yet"
            except Exception as exc:  # noqa: BLE001 - database not there yet: wait, retry
                why = f"{type(exc).__name__}: {exc}"
            log.warning("recovery waits for the database: %s", why)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)

    async def recover(self) -> None:
        """Resume runs a previous engine process left active, or mark them interrupted."""
        for run, channel in await self.recorder.acquiring():
            await self._resume(run, channel)

    async def _resume(self, run: m.Run, channel: m.Channel,
                      why: str = "acquisition node restarted") -> None:
        async with session_scope(self.maker) as s:
            last = (await s.execute(
                select(m.Sample.seq, m.Sample.t_s, m.Sample.ts_utc)
                .where(m.Sample.run_id == run.id)
                .order_by(m.Sample.seq.desc())
                .limit(1)
            )).first()
            n_samples = await s.scalar(
                select(func.count()).select_from(m.Sample).where(m.Sample.run_id == run.id)
            )
        if run.position is None and last is None:
            # Claimed, but killed before its first sample was committed: nothing of it
            # is on record, so it starts from the beginning.
            log.warning("run %s: no sample committed yet, starting it afresh", run.id)
            started = run.started_at
            if started is not None and started.tzinfo is None:
                started = started.replace(tzinfo=UTC)
            wall_s = (datetime.now(UTC) - started).total_seconds() if started else 0.0
            wait_s = max(wall_s, 0.0) * self.clock.speed
            self.recorder.event(RunEvent(
                run.id, "interruption", "warning",
                f"{why}; run started afresh after a {wait_s:.1f} s wait (nothing of it "
                "was committed)",
                {"cause": "restart_before_first_sample", "last_seq": 0,
                 "samples_committed": 0, "from_t_s": None, "to_t_s": 0.0,
                 "gap_s": wait_s, "gap_wall_s": wall_s}))
            await self._start(run, channel)
            return
        try:
            inst = await self.delegated.instrument_of(channel)
        except Exception as exc:  # noqa: BLE001 - its server is not there yet
            # The program runs on on the cycler: retried with backoff, followed when it
            # answers (engine/delegated_wait.py).
            log.error("run %s: its cycler's server does not answer, retrying: %s",
                      run.id, exc)
            self.delegated.waits.add(run, channel, exc)
            return
        if inst is not None:  # its program ran on the cycler meanwhile: follow it again
            await self.delegated.resume(run, channel, inst, "engine_restart")
            return
        # The limit is in wall seconds (what a cell resting with its output off lives
        # through); the run's own timeline, on the engine clock, moves on by gap_s. A
        # step of the wall clock since the last commit is not time that went by
        # (wallclock.py), and time never runs backwards.
        step_s = wallclock.step_since((run.position or {}).get(wallclock.KEY))
        wall_gap_s = max(0.0, time.time() - last.ts_utc - step_s) if last else 0.0
        gap_s = wall_gap_s * self.clock.speed
        gap: dict[str, Any] = {
            "last_seq": last.seq if last else 0,
            "samples_committed": n_samples,
            "from_t_s": last.t_s if last else None,
            "gap_s": gap_s,
            "gap_wall_s": wall_gap_s,
        }
        if step_s:
            gap["wall_clock_step_s"] = step_s
        pos = run.position
        reason = None
        if pos is None or last is None:
            reason = "no saved position to resume from"
        elif int(pos["seq"]) != int(last.seq):
            # Never expected: a position is committed with the samples it counts.
            reason = (
                f"the saved position (sample {pos['seq']}) does not match the last "
                f"committed sample ({last.seq})"
            )
        elif wall_gap_s > self.max_resume_gap_s:
            reason = (
                f"interrupted for {wall_gap_s:.0f} s, more than the "
                f"{self.max_resume_gap_s:.0f} s a run may be resumed after"
            )
        if reason is None:
            assert pos is not None and last is not None
            try:
                resolved = ResolvedProtocol.model_validate(run.plan)
                cr = ChannelRun(run.id, channel.index, resolved, run.sample_period_s)
                self.aux.wire(run)
                phase = cr.restore(dict(pos), shift_s=gap_s)
                cr.t_s = float(last.t_s) + gap_s
                cr.resumed_from_t_s = float(last.t_s)  # the gap's periods are missed ones
                cr.missed_periods = int(run.missed_periods or 0)
                # Paused stays paused (output off) until someone resumes it.
                cr.pause_requested = run.state == m.RunState.paused.value
                group = await self._group_for(channel.instrument_id)
                # Active before it joins: a breach on its first reading finishes it at once.
                self.active[run.id] = cr
                self.run_groups[run.id] = group
                await group.add(cr, phase, self.clock.now() - cr.t_s)
            except LOST_INSTRUMENT as exc:
                self._release(run.id)
                if channel.instrument_id not in self.instruments:
                    reason = f"could not resume: {type(exc).__name__}: {exc}"
                else:
                    # Lost again as the run rejoined (a flapping link): wait for it once
                    # more. The run stays running; its gap, from the last committed
                    # sample, keeps counting toward max_resume_gap_s.
                    log.warning("run %s: instrument lost again while resuming: %s",
                                run.id, exc)
                    self._wait_for(channel.instrument_id, [run.id],
                                   f"{why}; lost again while resuming: "
                                   f"{type(exc).__name__}: {exc}")
                    return
            except Exception as exc:  # noqa: BLE001
                self._release(run.id)
                reason = f"could not resume: {type(exc).__name__}: {exc}"
        if reason is None:
            assert last is not None
            await self.recorder.resumed(
                run.id, why, {**gap, "to_t_s": last.t_s + gap_s},
                still_active=run.id in self.active,  # not ended by a breach as it rejoined
            )
        else:
            await self.recorder.interrupted(run.id, reason, gap)

    # -- a lost instrument ---------------------------------------------------------------
    def _instrument_lost(self, instrument_id: int, runs: list[ChannelRun], reason: str) -> None:
        """An instrument stopped answering and its group let its runs go: wait for it in
        a task of its own and resume them."""
        for cr in runs:
            self._release(cr.run_id)
        self.stats.instrument_error(self.instruments[instrument_id].name)
        self._wait_for(instrument_id, [cr.run_id for cr in runs], reason)

    def _wait_for(self, instrument_id: int, run_ids: list[int], reason: str) -> None:
        """Wait for the instrument in a task of its own, then resume the runs (a run that
        had nothing committed when it was lost starts afresh: see :meth:`_resume`)."""
        self.heartbeat.instruments[self.instruments[instrument_id].name] = f"lost: {reason}"
        waiter = asyncio.create_task(self._await_instrument(instrument_id, run_ids, reason),
                                     name=f"await-instrument-{instrument_id}")
        self._waiting.add(waiter)
        waiter.add_done_callback(self._waiting.discard)

    async def _await_instrument(self, instrument_id: int, run_ids: list[int],
                                reason: str) -> None:
        try:
            await self._await_and_resume(instrument_id, run_ids, reason)
        except Exception:  # noqa: BLE001 - the runs stay running for the next engine start
            log.exception("runs %s: could not resume after the instrument returned", run_ids)

    async def _await_and_resume(self, instrument_id: int, run_ids: list[int],
                                reason: str) -> None:
        inst = self.instruments[instrument_id]
        # Resuming reads the position committed with the last committed sample.
        await self.writer.flush()
        give_up = time.monotonic() + self.max_resume_gap_s  # wall seconds
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await inst.worker.call(answers, inst.driver)
                self.heartbeat.instruments[inst.name] = INSTRUMENT_OK
                break
            except Exception as exc:  # noqa: BLE001 - still gone: wait and try again
                if time.monotonic() > give_up:
                    log.error("instrument %s did not come back: %s", inst.name, exc)
                    self.heartbeat.instruments[inst.name] = f"lost: {exc}"
                    break
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
        if self._stopping.is_set():
            return  # still running in the database: the next engine start resumes them
        log.warning("instrument %s: resuming %d runs after: %s", inst.name, len(run_ids),
                    reason)
        for run, channel in await self.recorder.acquiring(run_ids):
            # Past max_resume_gap_s this marks the run interrupted, with the reason.
            await self._resume(run, channel, why=f"{reason}; it answered again")
