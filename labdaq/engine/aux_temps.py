"""Wired temperature sensors: each channel's thermocouple (``channels.aux``), read from its
logger and laid over the cycler's own temperature reading in every sample.

One scan task per logger asks for all the channels its active runs are wired to in ONE
query per period (``MEAS:TEMP? TC,K,(@101:104)`` on a DAQ970A), as a cabinet reads all
its channels at once; the period is the shortest tick period of those runs. Each reading
is kept with the engine-clock time its query went out, in arrays indexed by *slot* (one
per logger channel), so an instrument group looks up all its runs' temperatures with a
few numpy operations per tick (:meth:`WiredTemperatures.overlay`).

What a run's sample gets from its wired sensor:

* a current reading (younger than ``stale_s``, or than two scan periods when those are
  longer): its temperature, checked against the run's limits like any reading;
* a stale one (older, or none yet): the last value with ``SampleFlag.TEMP_STALE``,
  checked against no limit and no end condition (a stale reading satisfies no limit);
* a lost sensor — an open thermocouple (the logger's overload value, +9.9E+37, which the
  driver turns into NaN), a logger that stopped answering (its transport gave up) or
  cannot be opened, or a reading that stayed stale past ``lost_s`` (a logger that
  answers too late, or a scan that hangs, is no more use than one that is silent): no
  temperature, ``SampleFlag.TEMP_LOST``; a run with a temperature limit is stopped safely
  on it (:mod:`.safety`).

Every sample with a wired sensor also stores the age of its reading
(``samples.temperature_age_s``: engine seconds from the logger's query to the sample's
measurement; NULL when there is no reading to age).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from labdaq.engine.clock import EngineClock
from labdaq.engine.instruments import OpenInstrument
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray
from labdaq.storage.models import SampleFlag

log = logging.getLogger(__name__)

FLAG_TEMP_STALE = int(SampleFlag.TEMP_STALE)
FLAG_TEMP_LOST = int(SampleFlag.TEMP_LOST)

# Slot states
_NONE, _OK, _OPEN, _NO_ANSWER = 0, 1, 2, 3
#: After a failed scan (the transport has already retried and reconnected), the next
#: attempt waits this long (engine seconds), doubling up to the maximum.
RETRY_S = 1.0
RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class Overlay:
    """A tick's temperatures for a group's runs (aligned with them)."""

    check_c: FloatArray  # what limits and end conditions see (NaN: nothing to check)
    stored_c: FloatArray  # what the sample stores (NaN -> NULL)
    age_s: FloatArray  # the stored reading's age (NaN -> NULL: unwired, or no reading)
    flags: IntArray  # TEMP_STALE / TEMP_LOST bits for the rows
    lost: BoolArray  # the wired sensor is lost


def sensor_of(wiring: dict[str, Any] | None) -> tuple[str, int] | None:
    """(logger name, channel) of a channel's wired thermocouple, or None."""
    tc = (wiring or {}).get("thermocouple")
    if not isinstance(tc, dict) or not tc.get("logger") or tc.get("channel") is None:
        return None
    return str(tc["logger"]), int(tc["channel"])


class WiredTemperatures:
    """The node's wired temperature sensors: scans loggers, answers groups' look-ups.

    ``wiring`` is the node's run id -> wiring map (``AuxSteps.wiring``, set when a run
    starts or resumes); ``stale_s`` (engine seconds) is the age past which a reading
    satisfies no limit; ``lost_s`` the time without a current reading (since the last
    one, or since the scan began) past which the sensor counts as lost.
    """

    def __init__(self, instruments: dict[int, OpenInstrument],
                 wiring: dict[int, dict[str, Any]], clock: EngineClock,
                 stale_s: float = 3.0, lost_s: float = 15.0,
                 open_logger: Callable[[str], Awaitable[OpenInstrument]] | None = None,
                 ) -> None:
        self.instruments = instruments
        # Opens a logger the node could not open at start (it was off, or unplugged).
        self.open_logger = open_logger
        self.wiring = wiring
        self.clock = clock
        self.stale_s = stale_s
        self.lost_s = lost_s
        self._slots: dict[tuple[str, int], int] = {}
        self.value_c: FloatArray = np.zeros(0)
        self.t_clock_s: FloatArray = np.zeros(0)
        # Per slot: the age past which its reading is stale (two scan periods, at least
        # stale_s: the group and the scan tick at their own phases of the same period).
        self.stale_after_s: FloatArray = np.zeros(0)
        # Per slot: when its scan began wanting it (a reading older than that is from an
        # earlier run and does not count towards lost_s before the first scan answers).
        self.since_clock_s: FloatArray = np.zeros(0)
        self.state: IntArray = np.zeros(0, np.int64)
        self.error: dict[int, str] = {}  # slot -> why it is lost
        # group name -> {run id: (slot, scan period)}: who needs which sensor how often
        self._wanted: dict[str, dict[int, tuple[int, float]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self.scans = 0  # queries sent (benchmarks and tests count them)

    # -- what groups call ------------------------------------------------------------------
    def slot(self, key: tuple[str, int]) -> int:
        k = self._slots.get(key)
        if k is None:
            k = self._slots[key] = len(self._slots)
            self.value_c = np.append(self.value_c, np.nan)
            self.t_clock_s = np.append(self.t_clock_s, -np.inf)
            self.stale_after_s = np.append(self.stale_after_s, self.stale_s)
            self.since_clock_s = np.append(self.since_clock_s, self.clock.now())
            self.state = np.append(self.state, _NONE)
        return k

    def update_group(self, group: str, runs: Sequence[tuple[int, float]]) -> IntArray:
        """The group's runs now ((run id, tick period) in its order); returns each run's
        slot (-1: no wired sensor) and starts or re-plans the loggers' scans."""
        wanted: dict[int, tuple[int, float]] = {}
        slots = np.full(len(runs), -1, np.int64)
        for j, (run_id, period_s) in enumerate(runs):
            key = sensor_of(self.wiring.get(run_id))
            if key is None:
                continue
            slots[j] = self.slot(key)
            wanted[run_id] = (int(slots[j]), period_s)
        if wanted:
            self._wanted[group] = wanted
        else:
            self._wanted.pop(group, None)
        for logger in {name for name, _ in self._slots} | set(self._tasks):
            self._plan(logger)
        return slots

    def overlay(self, slots: IntArray, now_clock_s: float, temp_c: FloatArray) -> Overlay:
        """The temperatures of runs with ``slots`` (aligned with ``temp_c``, the cycler's
        own readings, which runs without a wired sensor keep)."""
        wired = slots >= 0
        s = np.where(wired, slots, 0)
        if not len(self.state):
            s_state = np.zeros(len(slots), np.int64)
            s_value = s_age = s_stale = s_silent = np.full(len(slots), np.nan)
        else:
            s_state = self.state[s]
            s_value = self.value_c[s]
            s_age = now_clock_s - self.t_clock_s[s]
            s_stale = self.stale_after_s[s]
            s_silent = now_clock_s - np.maximum(self.t_clock_s[s], self.since_clock_s[s])
        fresh = wired & (s_state == _OK) & (s_age <= s_stale)
        # Stale for longer than lost_s (never shorter than the staleness bound): lost.
        too_old = wired & ~fresh & (s_silent > np.maximum(self.lost_s, s_stale))
        lost = wired & ((s_state == _OPEN) | (s_state == _NO_ANSWER) | too_old)
        stale = wired & ~lost & ~fresh
        stored = np.where(wired, np.where(lost, np.nan, s_value), temp_c)
        check = np.where(wired, np.where(fresh, s_value, np.nan), temp_c)
        # A scan that answered while the cycler was being measured is younger than the
        # sample's time (taken before that query): as current as the sample, age 0.
        age = np.where(wired & ~lost & np.isfinite(s_age), np.maximum(s_age, 0.0), np.nan)
        flags = np.where(stale, FLAG_TEMP_STALE, 0) | np.where(lost, FLAG_TEMP_LOST, 0)
        return Overlay(check, stored, age, flags.astype(np.int64), lost)

    def describe(self, slot: int) -> dict[str, Any]:
        """What a slot is and why it is lost (for events)."""
        key = next(k for k, v in self._slots.items() if v == slot)
        state = int(self.state[slot]) if slot < len(self.state) else _NONE
        cause = {_OPEN: "open", _NO_ANSWER: "no_answer"}.get(state, "stale")
        error = self.error.get(slot, "")
        if cause == "stale":
            silent_s = self.clock.now() - max(float(self.t_clock_s[slot]),
                                              float(self.since_clock_s[slot]))
            error = (f"no current reading for {silent_s:.1f} s (lost after "
                     f"{max(self.lost_s, float(self.stale_after_s[slot])):g} s)")
        return {"logger": key[0], "channel": key[1], "cause": cause, "error": error}

    # -- scanning --------------------------------------------------------------------------
    def _plan(self, logger: str) -> None:
        if logger in self._tasks:
            self._wake[logger].set()  # it re-reads what is wanted (and ends if nothing)
        elif any(key[0] == logger for key in self._channels_wanted()):
            self._wake[logger] = asyncio.Event()
            self._tasks[logger] = asyncio.create_task(self._scan(logger),
                                                      name=f"temperatures-{logger}")

    def _channels_wanted(self) -> dict[tuple[str, int], float]:
        """(logger, channel) -> shortest tick period of the runs wired to it."""
        keys = {v: k for k, v in self._slots.items()}
        out: dict[tuple[str, int], float] = {}
        for wanted in self._wanted.values():
            for slot, period_s in wanted.values():
                key = keys[slot]
                out[key] = min(out.get(key, math.inf), period_s)
        return out

    def _instrument(self, logger: str) -> OpenInstrument | None:
        for inst in self.instruments.values():
            if inst.name == logger:
                return inst
        return None

    def _mark(self, slots: list[int], state: int, error: str) -> None:
        for k in slots:
            self.state[k] = state
            self.value_c[k] = np.nan
            self.error[k] = error

    async def _scan(self, logger: str) -> None:
        retry_s, failures = RETRY_S, 0
        scanning: set[int] = set()  # the slots this scan already wanted
        deadline = self.clock.now()
        try:
            while True:
                self._wake[logger].clear()
                wanted = {ch: p for (name, ch), p in self._channels_wanted().items()
                          if name == logger}
                if not wanted:
                    return
                channels = sorted(wanted)
                slots = [self._slots[(logger, ch)] for ch in channels]
                new = [k for k in slots if k not in scanning]
                self.since_clock_s[new] = self.clock.now()
                scanning = set(slots)
                period_s = min(wanted.values())
                self.stale_after_s[slots] = max(self.stale_s, 2.0 * period_s)
                inst = self._instrument(logger)
                if inst is None and self.open_logger is not None:
                    try:
                        inst = await self.open_logger(logger)
                    except Exception as exc:  # noqa: BLE001 - tried again after a while
                        log.warning("logger %s: cannot open: %s", logger, exc)
                if inst is None:
                    self._mark(slots, _NO_ANSWER, f"logger {logger} is not connected")
                    await self._sleep(logger, self.clock.now() + retry_s)
                    retry_s = min(2 * retry_s, RETRY_MAX_S)
                    continue
                t_query = self.clock.now()
                try:
                    temps, open_mask = await inst.worker.call(_read, inst.driver, channels)
                except Exception as exc:  # noqa: BLE001 - a lost sensor, not a lost node
                    failures += 1
                    log.warning("logger %s: no reading of %s: %s", logger, channels, exc)
                    if failures == 1:
                        # One more try at once: a reply the driver could not decode (a
                        # garbled line) is not yet a sensor that stopped answering.
                        continue
                    # The transport has already retried and reconnected: the logger does
                    # not answer. Its channels are lost until a scan succeeds again.
                    self._mark(slots, _NO_ANSWER, f"{type(exc).__name__}: {exc}")
                    await self._sleep(logger, self.clock.now() + retry_s)
                    retry_s = min(2 * retry_s, RETRY_MAX_S)
                    continue
                retry_s, failures = RETRY_S, 0
                self.scans += 1
                for k, value, is_open in zip(slots, temps, open_mask, strict=True):
                    if is_open:
                        self._mark([k], _OPEN, "open thermocouple (overload reading "
                                               "+9.9E+37)")
                    else:
                        self.state[k] = _OK
                        self.value_c[k] = value
                        self.t_clock_s[k] = t_query
                        self.error.pop(k, None)
                deadline += period_s
                if deadline < self.clock.now():
                    deadline = self.clock.now()  # fell behind: re-anchor, do not burst
                await self._sleep(logger, deadline)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - its runs' readings go stale, then lost
            log.exception("logger %s: temperature scan failed", logger)
            for (name, _), k in self._slots.items():
                if name == logger:
                    self._mark([k], _NO_ANSWER, "temperature scan failed")
        finally:
            self._tasks.pop(logger, None)

    async def _sleep(self, logger: str, until_s: float) -> None:
        """Until ``until_s`` on the engine clock, or until the wanted channels change."""
        wake = self._wake[logger]
        sleep = asyncio.ensure_future(self.clock.sleep_until(until_s))
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            woken.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)


def _read(driver: Any, channels: list[int]) -> tuple[list[float], list[bool]]:
    """One query for all ``channels``: (temperatures, open) in their order. A driver with
    ``read_with_status`` (DAQ970A) says which are open; otherwise NaN means open."""
    with_status = getattr(driver, "read_with_status", None)
    if with_status is not None:
        readout = with_status(channels)
        temps = [float(x) for x in readout.temperatures_c]
        return temps, [bool(x) for x in readout.open_mask]
    temps = [float(x) for x in driver.read_temperatures_c(channels)]
    return temps, [math.isnan(x) for x in temps]
