"""Scheduling: the node's periodic round (every ``poll_s``).

Part of :class:`labdaq.engine.node.AcquisitionNode` (a mixin, so the node's lifecycle
reads on its own in node.py). Each round: record a wall-clock jump and samples the writer
had to drop, hand the API's commands (``runs.requested_action``) to the runs' groups'
inboxes, and take the next run of each free channel's queue (labdaq/run_queue.py): claim
and start it, or hold it in awaiting_cell for a technician.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from labdaq.engine.channel import ChannelRun, Phase
from labdaq.engine.events import Command, RunEnded, RunEvent
from labdaq.engine.group import InstrumentGroup
from labdaq.engine.node_parts import NodeParts
from labdaq.engine.setpoints import LOST_INSTRUMENT
from labdaq.protocol import ResolvedProtocol
from labdaq.run_states import SAFETY_STOP_REASON
from labdaq.storage import models as m

log = logging.getLogger(__name__)


class Scheduling(NodeParts):

    async def tick(self) -> None:
        """One scheduler round. A database error is logged, never fatal: acquisition goes
        on in the groups, samples and records wait for the database."""
        self._watch_wall_clock()
        self._report_dropped()
        try:
            await self._apply_requests()
            await self._claim_queued()
            await self._beat()
        except Exception as exc:  # noqa: BLE001
            # Once per outage at warning level; every poll would flood the log.
            level = logging.DEBUG if self._scheduler_error else logging.WARNING
            log.log(level, "scheduler: database not available (%s: %s)", type(exc).__name__, exc)
            self._scheduler_error = True
        else:
            if self._scheduler_error:
                log.warning("scheduler: database available again")
            self._scheduler_error = False
        finally:
            self.rounds += 1

    def _watch_wall_clock(self) -> None:
        """Record a wall-clock jump (NTP step, a technician setting the time) on every
        active run. Step and run timing use the monotonic clock and are unaffected; the
        samples' ts_utc follow the wall clock, so a jump shows there and the event says
        by how much.

        A jump counts once the wall clock has held its new offset from the monotonic
        clock for two rounds in a row. One reading that disagrees with the rounds before
        and after it is a bad reading, not a step: recorded, it would put two false jumps
        on every active run, or one when it is the first reading a process takes (seen
        under libfaketime, which answers with the real time while another thread reads
        its timestamp file, wolfcw/libfaketime#452)."""
        offset_s = self.wall_clock() - time.monotonic()
        threshold_s = self.clock_jump_threshold_s
        settled, pending = self._clock_offset_s, self._clock_pending_s
        if settled is not None and abs(offset_s - settled) < threshold_s:
            # Follow NTP slewing round by round, so it never adds up to a jump.
            self._clock_offset_s, self._clock_pending_s = offset_s, None
            return
        if pending is None or abs(offset_s - pending) >= threshold_s:
            self._clock_pending_s = offset_s  # a new offset: wait for the next round
            return
        self._clock_offset_s, self._clock_pending_s = offset_s, None
        if settled is None:
            return  # the process's first settled reading: nothing to compare it with
        jump_s = offset_s - settled
        log.warning("wall clock jumped %+.3f s against the monotonic clock", jump_s)
        data = {"jump_s": jump_s, "offset_before_s": settled, "offset_after_s": offset_s}
        for run_id in list(self.active):
            self.recorder.event(RunEvent(
                run_id, "clock_jump", "warning",
                f"wall clock jumped {jump_s:+.3f} s; run timing follows the monotonic "
                "clock, sample ts_utc the wall clock", data))

    def _report_dropped(self) -> None:
        """An interruption event for samples the writer had to drop (journal full or
        failing during a database outage), with the bounds of what is missing; repeated
        with the new bounds if more of the same run are dropped later."""
        for run_id, (seq0, seq1, t0, t1, n) in list(self.writer.dropped_by_run.items()):
            if self._dropped_reported.get(run_id) == n:
                continue
            self._dropped_reported[run_id] = n
            self.recorder.event(RunEvent(
                run_id, "interruption", "error",
                f"up to {n} samples lost: the database was unavailable and the local "
                "journal was full or failing",
                # "At most": a batch whose write timed out counts as dropped, yet may have
                # committed after all; the samples table says which are really missing.
                {"cause": "journal_overflow", "from_seq": seq0, "to_seq": seq1,
                 "from_t_s": t0, "to_t_s": t1, "samples_lost_at_most": n}))

    async def _apply_requests(self) -> None:
        """The API's commands for active runs → their groups' inboxes; a pause or resume
        is recorded as the state it leads to once handed over."""
        if not self.active and not self.delegated.runs:
            return
        for run_id, action in await self.recorder.requested(
                [*self.active, *self.delegated.runs]):
            if run_id in self.delegated.runs and action in ("stop", "pause", "resume"):
                self.delegated.command(run_id, action)
                if action != "stop":
                    await self.recorder.command_taken(run_id, action)
                continue
            group = self.run_groups.get(run_id)
            if group is None or action not in ("stop", "safety_stop", "pause", "resume"):
                continue
            group.command(run_id, Command(action),
                          SAFETY_STOP_REASON if action == "safety_stop" else None)
            if action not in ("stop", "safety_stop"):  # a stop: recorded when it has ended
                await self.recorder.command_taken(run_id, action)

    async def _claim_queued(self) -> None:
        """The head of every free channel's queue: start it, or hold it for a technician
        (its ``not_before`` and the strict order are the queue's: labdaq/run_queue.py).
        The round's starts are claimed in one transaction and join their groups in one
        step per instrument (:meth:`_start_many`)."""
        now = datetime.fromtimestamp(self.wall_clock(), UTC)
        starting: list[tuple[m.Run, m.Channel]] = []
        for d in await self.recorder.queue_heads(now):
            if d.run.id in self.active or d.run.id in self.delegated.runs:
                continue
            if not d.start:
                await self.recorder.hold(d.run.id, d.reason or "")
            else:
                starting.append((d.run, d.channel))
        if not starting:
            return
        claimed = await self.recorder.claim_many([(r.id, c.id) for r, c in starting])
        await self._start_many([(r, c) for r, c in starting if r.id in claimed])

    async def _start(self, run: m.Run, channel: m.Channel) -> None:
        await self._start_many([(run, channel)])

    async def _start_many(self, starts: list[tuple[m.Run, m.Channel]]) -> None:
        """Start claimed runs: each resolved and prepared on its own (yielding to the
        loops in between), then per instrument the hardware protection in as few
        commands as the driver takes and one join of all of them (InstrumentGroup.add_many)."""
        joining: dict[int, list[tuple[m.Run, m.Channel, ChannelRun, Phase]]] = {}
        for run, channel in starts:
            try:
                # A cycler that runs its own step program gets the whole protocol.
                if (inst := await self.delegated.instrument_of(channel)) is not None:
                    await self.delegated.start(run, channel, inst)
                    continue
                resolved = ResolvedProtocol.model_validate(run.plan)
                cr = ChannelRun(run.id, channel.index, resolved, run.sample_period_s)
                self.aux.wire(run)
                tr = cr.start(0.0)
                if tr.done or tr.next_phase is None:
                    cr.outcome = ("completed", "the program has no measuring step")
                    await self._on_event(RunEnded(cr))
                    continue
                joining.setdefault(channel.instrument_id, []).append(
                    (run, channel, cr, tr.next_phase))
            except Exception as exc:  # noqa: BLE001 - the run fails with its reason
                self._not_started(run, channel, exc)
            # Preparing hundreds of runs is CPU on the loop the groups tick on.
            await asyncio.sleep(0)
        for instrument_id, batch in joining.items():
            try:
                await self._join(instrument_id, batch)
            except LOST_INSTRUMENT as exc:
                for run, channel, _, _ in batch:
                    self._not_started(run, channel, exc)
            except Exception as exc:  # noqa: BLE001 - one run's fault fails that run only
                if len(batch) == 1:
                    self._not_started(batch[0][0], batch[0][1], exc)
                    continue
                # Nothing of the batch joined (add_many leaves no trace when it fails):
                # each run again on its own, so only the one at fault fails.
                for run, _, _, _ in batch:
                    self.active.pop(run.id, None)
                    self.run_groups.pop(run.id, None)
                for item in batch:
                    try:
                        await self._join(instrument_id, [item])
                    except Exception as exc1:  # noqa: BLE001
                        self._not_started(item[0], item[1], exc1)

    async def _join(self, instrument_id: int,
                    batch: list[tuple[m.Run, m.Channel, ChannelRun, Phase]]) -> None:
        """Prepared runs of one instrument: its protection, then one join of all."""
        group = await self._group_for(instrument_id)
        await self._protect(group, [(ch, cr) for _, ch, cr, _ in batch])
        for run, _, cr, _ in batch:
            # Active before it joins: a breach on its first reading finishes it.
            self.active[run.id] = cr
            self.run_groups[run.id] = group
        await group.add_many([(cr, phase) for _, _, cr, phase in batch], self.clock.now())

    async def _protect(self, group: InstrumentGroup,
                       runs: list[tuple[m.Channel, ChannelRun]]) -> None:
        """Layer one of safety: the instrument's own protection trips even if we stall.
        Channels with the same limits in one command where the instrument takes lists."""
        by_limits: dict[tuple[float, float], list[int]] = {}
        for channel, cr in runs:
            lim = cr.limits
            by_limits.setdefault((lim.max_voltage_v, lim.max_abs_current_a), []).append(
                channel.index)
        lists = group.driver.sets_channel_lists
        for (v_max, i_max), chans in by_limits.items():
            for ch in ([chans] if lists and len(chans) > 1 else chans):
                await group.call_between_ticks(group.driver.configure_protection, ch,
                                               v_max, i_max)

    def _not_started(self, run: m.Run, channel: m.Channel, exc: Exception) -> None:
        """A run that could not start fails with its reason, or waits for its instrument."""
        self._release(run.id)
        if not isinstance(exc, LOST_INSTRUMENT) or channel.instrument_id not in self.instruments:
            log.error("run %s could not start: %s: %s", run.id, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, LOST_INSTRUMENT))
            self.recorder.finished(run.id, ("failed", f"{type(exc).__name__}: {exc}"), None)
            return
        # The instrument stopped answering while the run was joining (its group hands
        # its other runs over just now): nothing of this run is committed, so it
        # starts afresh once the instrument answers, as they resume.
        reason = f"instrument lost while the run was starting: {type(exc).__name__}: {exc}"
        log.warning("run %s: %s", run.id, reason)
        self.recorder.event(RunEvent(
            run.id, "interruption", "warning", reason,
            {"cause": "instrument_lost", "instrument": self.instruments[
                channel.instrument_id].name, "channel": channel.index, "from_t_s": None,
             "last_seq": 0, "to_t_s": None, "error": str(exc)}))
        self._wait_for(channel.instrument_id, [run.id], reason)
