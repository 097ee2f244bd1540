"""An instrument group's buffered acquisition: the instrument logs on its own clock, the
loop fetches the new readings every fetch period and feeds them through the tick's logic.

One job of :class:`~labdaq.engine.group.InstrumentGroup` (which inherits it), for a
cycler whose ``acquisition`` option is ``"buffered"`` (docs/architecture.md, "Buffered
acquisition"). The per-tick loop has to be scheduled within every sample period, or that
period is lost; here the instrument takes every reading on its hardware timer into a ring
(``TRAC:DATA?``, drivers/cabinet_log.py), and the loop wakes every fetch period (tens of
ms), so a scheduling hiccup shorter than the ring delays readings instead of losing them.

Each reading of a block goes through the same steps as a tick (group.py), in order:
integrate → safety (outputs off first) → end conditions → store → transitions, with the
reading's time the instrument's, mapped to the engine clock with an offset fixed when
logging starts (reading 1 is taken while ``INIT`` is exchanged, and the first block's
newest reading within a period before the fetch is answered: the middle of those bounds,
:meth:`GroupBuffered._clock_offset`). The rows of one fetch go to
the writer as one batch (unless a run ends inside it: its rows go first, then its end).

Rules that differ from a tick:

* A run uses only readings newer than its last one: readings taken before it joined, or
  before its resume or join edge sample (a direct ``MEAS:ALL?``), are skipped.
* A phase that ends at reading ``k`` of a block gets its next set point at once, while the
  block is processed; the channel's readings taken until that command was acknowledged
  (the rest of the block, often the start of the next) were taken under the *old* set
  point. They are stored as samples of the new phase (they are the cell's readings of
  those periods, so no period is lost), integrated (the charge flowed), checked by safety,
  but not judged by the new phase's end conditions; the first reading after the
  acknowledgement is the new phase's first under its own set point (and gives a pulse
  step's DCIR). No extra edge reading is taken at a phase change. The new step's clock
  starts at the reading that ended the old one, as in a tick, so the set point's latency
  (up to a fetch period plus the exchange) counts in the new step's time.
* A breaching reading turns the output off as soon as its block is in: the cut-off
  latency is up to the fetch period plus the exchange, against a tick's sample period.
  ``breach_to_ack_s`` is measured from the block's arrival, as a tick's from its reply.
* Readings the ring overwrote before they were fetched (the loop stalled longer than the
  ring holds) are missed periods: a gap record of cause ``overflow`` on the next stored
  sample, covering exactly the lost storage times (gaps.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from labdaq.drivers.roles import Cycler
from labdaq.engine.block_pass import quiet_pass
from labdaq.engine.channel import ChannelRun, Phase, Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.end_conditions import EndConditions
from labdaq.engine.events import Emit, RunEnded
from labdaq.engine.group_commands import GroupCommands
from labdaq.engine.group_edges import _STATS_MAX, _add_records
from labdaq.engine.ledger import Ledger
from labdaq.engine.run_arrays import FloatArray, IntArray, RunArrays
from labdaq.engine.safety import Limits
from labdaq.engine.sample_batch import SampleBatch, concat
from labdaq.engine.sink import SampleSink

log = logging.getLogger(__name__)

#: No new reading for this many fetch periods, and at least ``_STALL_WALL_S`` of wall
#: time: the instrument's logging stopped behind the engine's back (reset, power cycle):
#: it is started again. Counted on the wall clock: an accelerated clock on a busy machine
#: makes a short scheduling stall many simulated seconds long, and a needless restart
#: empties the ring (its readings would be lost).
_STALL_FETCHES = 20
_STALL_WALL_S = 5.0


def is_buffered(driver: Any) -> bool:
    """True for a cycler configured for buffered acquisition (its ``acquisition``
    option) that can log (``start_logging``/``fetch_logged``)."""
    return (getattr(driver, "acquisition", "tick") == "buffered"
            and hasattr(driver, "fetch_logged") and hasattr(driver, "start_logging"))


class _Pending:
    """Rows and ledger of one fetch, handed to the writer as one put."""

    def __init__(self) -> None:
        self.batches: list[SampleBatch] = []
        self.ledger = Ledger()

    def add(self, rows: SampleBatch, fast: FloatArray, ledger: Ledger | None) -> None:
        self.batches.append(rows)
        if ledger is not None:
            self.ledger.extend(ledger)
        self.ledger.fast.append(fast)

    def take(self) -> tuple[SampleBatch | None, Ledger]:
        rows = concat(self.batches) if self.batches else None
        ledger = self.ledger
        self.batches, self.ledger = [], Ledger()
        return rows, ledger


class GroupBuffered(GroupCommands):
    """The buffered loop (the state is the group's, see group.py)."""

    #: Quiet readings of a block in one vectorised pass (block_pass.py); False feeds
    #: every reading through _reading (the reference the pass is tested against).
    block_pass = True

    name: str
    driver: Cycler
    call: Callable[..., Awaitable[Any]]
    clock: EngineClock
    writer: SampleSink
    emit: Emit
    control_period_s: float
    phase: float
    buffered: bool
    runs: list[ChannelRun]
    _phases: list[Phase]
    state: RunArrays
    limits: Limits
    ends: EndConditions
    chans: list[int]
    ticks: int
    lateness_s: list[float]
    _closing: bool
    _busy: asyncio.Lock
    _apply_many: Callable[..., Awaitable[None]]
    _load_phases: Callable[[], None]
    _full_position: Callable[[int], dict[str, Any]]
    _push: Callable[[int], None]
    _pull: Callable[[int], None]
    _remove: Callable[[int], None]
    _guarded: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]

    def _buffered_init(self) -> None:
        self.log_period_s = math.nan  # the instrument's logging period (engine seconds)
        self._log_next = 1  # the next reading index to fetch
        self._log_offset_s: float | None = None  # engine clock - instrument time
        self._log_t_init = 0.0  # engine clock just before INIT was sent ...
        self._log_t_acked = 0.0  # ... and once it was acknowledged
        self._log_last_new = 0.0  # wall clock (monotonic) when a fetch last brought readings
        # run id -> (V, I) of the reading that ended its phase: a pulse step's DCIR is
        # taken at the first reading under the new set point.
        self._dcir_before: dict[int, tuple[float, float]] = {}
        self.overflow_lost = 0  # reading indices the ring overwrote before a fetch
        self.logging = False  # the instrument is logging for this group

    # -- logging on the instrument -------------------------------------------------------
    def _wanted_log_period(self) -> float:
        return min(float(self.state.period_s.min()), self.control_period_s)

    async def _logging_for(self, periods: Sequence[float]) -> None:
        """Runs with these storage periods are about to join: the instrument logs before
        their set points go out, so their first storage periods have readings."""
        if self.buffered and not self.logging and periods:
            await self._start_logging(min(min(periods), self.control_period_s))

    async def _start_logging(self, period: float | None = None) -> None:
        if period is None:
            period = self._wanted_log_period()
        self._log_t_init = self.clock.now()
        await self.call(self.driver.start_logging, period)  # type: ignore[attr-defined]
        self._log_t_acked = self.clock.now()
        self.logging = True
        self.log_period_s = period
        self._log_next = 1
        self._log_offset_s = None
        self._log_last_new = time.monotonic()

    async def _stop_logging(self) -> None:
        self.logging = False
        try:
            await self.call(self.driver.stop_logging)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - the loop is ending anyway
            log.warning("instrument %s: could not stop logging: %s", self.name, exc)

    async def _fetch(self, start: int, chans: list[int]) -> Any:
        got = await self.driver.afetch_logged(start, chans)  # type: ignore[attr-defined]
        if got is None:
            got = await self.call(self.driver.fetch_logged, start,  # type: ignore[attr-defined]
                                  chans)
        return got

    # -- the loop ------------------------------------------------------------------------
    async def _loop_buffered(self) -> None:
        fetch_s = float(getattr(self.driver, "fetch_period_s", 0.05))
        started = False
        try:
            if not self.logging:  # (it normally started before the first run joined)
                async with self._busy:
                    await self._guarded(self._start_logging)
            started = True
            deadline = self.clock.now() + self.phase * fetch_s
            while self.runs and not self._closing:
                deadline += fetch_s
                await self.clock.sleep_until(deadline)
                late = self.clock.wall_lateness_s(deadline)
                self.lateness_s.append(late)
                if len(self.lateness_s) > _STATS_MAX:
                    del self.lateness_s[: _STATS_MAX // 2]
                if late * self.clock.speed > fetch_s:
                    deadline = self.clock.now()  # behind by a fetch: no burst of fetches
                async with self._busy:
                    await self._guarded(self._block)
        finally:
            if started:
                await self._stop_logging()

    async def _block(self) -> None:
        """One fetch: every new reading, through the tick's logic in order."""
        await self._handle_requests()
        if not self.runs:
            return
        if self._wanted_log_period() < self.log_period_s - 1e-12:
            # A run joined that samples faster than the instrument logs: log faster.
            await self._start_logging()
        chans = list(self.chans)
        start = self._log_next
        t_send = self.clock.now()
        got = await self._fetch(start, chans)
        t_meas = time.perf_counter()
        clock_now, wall_now = self.clock.now(), time.time()
        count = len(got.indices)
        if not count:
            fetch_wall_s = float(getattr(self.driver, "fetch_period_s", 0.05)) / self.clock.speed
            stalled = time.monotonic() - self._log_last_new > max(
                _STALL_WALL_S, _STALL_FETCHES * fetch_wall_s)
            if (got.first_held == 0 and start > 1) or stalled:
                log.warning("instrument %s: its logging stopped (reset?); starting it again",
                            self.name)
                await self._start_logging()
            return
        self._log_last_new = time.monotonic()
        lost = got.lost_before(start)
        self.overflow_lost += lost
        if self._log_offset_s is None:
            self._log_offset_s = self._clock_offset(got, t_send, clock_now)
        self._log_next = int(got.indices[-1]) + 1
        t_clock = got.t_s + self._log_offset_s
        ts_utc = wall_now - (clock_now - t_clock) / self.clock.speed
        self.ticks += count
        pending = _Pending()
        cols = np.arange(len(chans))
        run_ids = [r.run_id for r in self.runs]
        j = 0
        while j < count and self.runs:
            if self.block_pass:
                # The quiet readings from j on at once; the first where something
                # happens goes through _reading (block_pass.py).
                j += quiet_pass(self, t_clock[j:], got.voltage_v[j:, cols],
                                got.current_a[j:, cols], got.temperature_c[j:, cols],
                                ts_utc[j:], pending)
                if j >= count:
                    break
            gone = await self._reading(
                float(t_clock[j]), got.voltage_v[j, cols], got.current_a[j, cols],
                got.temperature_c[j, cols], float(ts_utc[j]), t_meas, pending,
                "overflow" if j == 0 and lost else "late")
            j += 1
            if gone:
                keep = [k for k in range(len(run_ids)) if k not in gone]
                cols = cols[keep]
                run_ids = [run_ids[k] for k in keep]
        await self._put_pending(pending)

    def _clock_offset(self, got: Any, t_send: float, t_recv: float) -> float:
        """Engine clock minus instrument time, from the first block: reading 1 was taken
        while INIT was being exchanged (between the engine times before it was sent and
        after it was acknowledged), and the block's newest reading within one period
        before the fetch was answered (between its send and its reply). The middle of the
        narrower of those bounds: off by at most half of it (half an exchange)."""
        t1 = float(got.t_s[0]) - (int(got.indices[0]) - 1) * self.log_period_s
        elapsed = float(got.t_s[-1]) - t1
        lo = max(self._log_t_init, t_send - elapsed - self.log_period_s)
        hi = min(self._log_t_acked, t_recv - elapsed)
        if hi < lo:  # bounds that disagree (clocks at different speeds): the INIT's
            lo, hi = self._log_t_init, self._log_t_acked
        return 0.5 * (lo + hi) - t1

    async def _put_pending(self, pending: _Pending) -> None:
        rows, ledger = pending.take()
        if rows is not None:
            await self.writer.put(rows, ledger)
        elif ledger.positions or ledger.steps or ledger.cycles or ledger.gaps:
            await self.writer.put([], ledger)

    async def _reading(self, t_clock: float, v: FloatArray, i: FloatArray, temp: FloatArray,
                       ts_utc: float, t_meas: float, pending: _Pending, gap_cause: str
                       ) -> set[int]:
        """One logged reading of every run (arrays in run order) taken at engine-clock
        time ``t_clock``; returns the indices of the runs that ended (removed)."""
        runs = self.runs
        n = len(runs)
        st = self.state
        v, i, temp = v.copy(), i.copy(), temp.copy()
        t = t_clock - st.t0_clock_s
        fresh = t > st.last_t_s
        if not fresh.all():
            # Older than the run's last reading (taken before it joined, or before an
            # edge sample): the run sees its last reading again, which changes nothing.
            t = np.where(fresh, t, st.last_t_s)
            v = np.where(fresh, v, st.last_voltage_v)
            i = np.where(fresh, i, st.last_current_a)
            temp = np.where(fresh, temp, st.last_temperature_c)
        wired, temp, temp_rows, temp_flags, temp_age = self._reading_temperatures(
            t_clock, temp)

        # 1. Integrate; 2. safety, outputs off at once (as a tick).
        paused = st.paused
        prev = self._previous()
        st.integrate(slice(None), t, v, i, ~paused & fresh)
        breach = await self._check(slice(None), t, v, i, temp, t_meas,
                                   None if wired is None else wired.lost)
        breach &= fresh
        breached = np.flatnonzero(breach).tolist()

        # 3. End conditions: only readings under the phase's own set point.
        fast = np.minimum(st.period_s, self.control_period_s)
        hits = self.ends.evaluate(runs, st, t, v, i, temp, fast)
        settled = t > st.setpoint_t_s
        ended = hits.ended & ~paused & ~breach & fresh & settled
        if self._dcir_before:
            self._pulse_edges(settled & fresh, v, i)

        # 4. Store: the reading serves the storage times before it plus half a logging
        # period (readings are exactly a period apart on the instrument's clock).
        reach = t + 0.5 * self.log_period_s
        idx, miss, due_t_s = self._due(reach, breach | ended, valid=fresh)
        if idx.size:
            rows, ledger = self._due_rows(idx, t, v, i, temp_rows, temp_age, temp_flags,
                                          breach, miss, due_t_s, ts_utc, gap_cause)
            pending.add(rows, st.fast(idx), ledger)
        st.last_t_s, st.last_voltage_v, st.last_current_a, st.last_temperature_c = t, v, i, temp

        # 5. Per-channel Python only where something happened.
        if wired is not None and (wired.lost != self._sensor_lost).any():
            await self._sensor_changes(np.arange(n), wired.lost)
        aux = [k for k, r in enumerate(runs) if r.aux_error is not None]
        if not breached and not aux and not ended.any():
            return set()
        done: list[int] = []
        if breached:
            # The breaching rows are committed before the breach is reported.
            await self._put_pending(pending)
        for k in breached:
            await self._report_breach(k, float(v[k]), float(i[k]), float(temp[k]), float(t[k]))
            done.append(k)
        for k in aux:
            if k not in done:
                runs[k].outcome = ("failed", runs[k].aux_error or "")
                done.append(k)
        changed: list[int] = []
        finished: list[tuple[int, Transition]] = []
        for k in np.flatnonzero(ended).tolist():
            if k in done:
                continue
            r = runs[k]
            reason = hits.reason(k)
            self._pull(k)
            crossing = self.ends.crossing(k, reason, prev, st, t, v, i, temp)
            tr = r.phase_ended(reason, float(t[k]), float(v[k]), float(i[k]), crossing)
            self._push(k)
            if tr.done or tr.next_phase is None:
                await self._outputs_off([r.channel])
                r.outcome = r.outcome or ("completed", "all steps done")
                done.append(k)
            else:
                self._phases[k] = tr.next_phase
                st.dvdt_ref_voltage_v[k] = np.nan
                changed.append(k)
                self._dcir_before[r.run_id] = (float(v[k]), float(i[k]))
            finished.append((k, tr))
        if changed:
            await self._apply_many([(runs[k], self._phases[k]) for k in changed])
            # Readings from now on are under the new set points (acknowledged).
            ch = np.asarray(changed, np.int64)
            st.setpoint_t_s[ch] = self.clock.now() - st.t0_clock_s[ch]
            self._load_phases()
            ledger = Ledger(positions=[self._full_position(k) for k in changed])
            for k, tr in finished:
                if k in changed:
                    _add_records(ledger, runs[k].run_id, tr)
            pending.ledger.extend(ledger)
        for k, tr in finished:
            if k not in changed:
                runs[k].closing.append(tr)
        if not done:
            return set()
        # An ended run's rows are committed before its end is reported.
        await self._put_pending(pending)
        gone = set(done)
        for k in sorted(gone, reverse=True):
            r = runs[k]
            self._dcir_before.pop(r.run_id, None)
            self._remove(k)
            await self.emit(RunEnded(r))
        return gone

    def _pulse_edges(self, settled: Any, v: FloatArray, i: FloatArray) -> None:
        """DCIR of pulse steps: the reading that ended the phase against the first under
        the new set point."""
        for rid in list(self._dcir_before):
            ks = np.flatnonzero(self.state.run_id == rid)
            if not ks.size:
                # The run left another way (stopped, its instrument lost): its edge
                # would never be taken, and a run resumed later starts afresh.
                del self._dcir_before[rid]
                continue
            if not settled[ks[0]]:
                continue
            k = int(ks[0])
            before = self._dcir_before.pop(rid)
            r = self.runs[k]
            if r.phase_name in ("pulse.on", "pulse.rest"):
                r.pulse_edge(before[0], before[1], float(v[k]), float(i[k]))


__all__ = ["GroupBuffered", "IntArray", "is_buffered"]
