"""The cabinet simulator's logging steps its cells a block of readings at a time; these
readings must be the ones a reading-by-reading loop takes (same seed, same commands at
the same simulated times): set points mid-block, protection trips, sensor dropout, a
frozen measurement loop, a VOLT-function channel and ring overflow included.

The reference is the loop the simulator used before blocks (kept here, not in sims/):
step the bank to each reading's time, regulate (tripping protection), record the reading.
Tolerance: none — the block path does the same floating-point operations in the same
order, so the ring's bytes and the float64 voltages are compared for exact equality.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from labdaq.sims.cabinet import CabinetSim
from labdaq.sims.clock import ManualClock


class OneByOne(CabinetSim):
    """The reading-by-reading loop: each due reading stepped, regulated and recorded
    alone."""

    def _step_to(self, now: float) -> None:
        log = self.log
        if log.running and log.next_t_s <= now:
            due = int((now - log.next_t_s) / log.period_s) + 1
            if due > log.points:
                skip = due - log.points
                self._step_bank(log.next_t_s + (skip - 1) * log.period_s)
                log.skip(skip)
            current = None
            while log.next_t_s <= now:
                t_r = log.next_t_s
                self._step_bank(t_r, current)
                if self.frozen and self._last_snapshot is not None:
                    v, i, temp, _, _ = self._last_snapshot
                    current = None
                else:
                    i, v, _, _ = self._drive()
                    temp, current = self.bank.temperature_c, i
                log.record_block([t_r], [v], [i], [temp])
                self.readings.append((t_r, v))
            self._step_bank(now, current)
            return
        self._step_bank(now)


Script = list[tuple[float, Callable[[CabinetSim], object]]]


def _h(line: str) -> Callable[[CabinetSim], object]:
    return lambda s: s.handle_line(line)


def _script(channels: int) -> Script:
    """(simulated time, action): charge CC-CV, discharge, a VOLT channel, an OVP that
    trips mid-block, a set point between readings, a sensor dropout and a frozen spell."""
    half = channels // 2
    return [
        (0.0, _h(f"CURR 4.9,(@1:{half})")),
        (0.0, _h(f"CURR -4.9,(@{half + 1}:{channels})")),
        (0.0, _h(f"CURR:VLIM 3.72,(@1:{half})")),  # clamps within readings: CV
        (0.0, _h(f"FUNC VOLT,(@{channels})")),
        (0.0, _h(f"VOLT 3.8,(@{channels})")),
        (0.0, _h(f"VOLT:ILIM 2,(@{channels})")),
        (0.0, _h("VOLT:PROT 3.705,(@2)")),  # channel 2 trips once it charges past it
        (0.0, _h(f"OUTP 1,(@1:{channels})")),
        (0.0, _h("INIT")),
        (0.1234, _h(f"CURR 2.5,(@{half + 1}:{half + 2})")),  # between readings 13 and 14
        (0.2501, lambda s: s.set_sensor_dropout(3)),
        (0.3333, lambda s: s.handle_line("MEAS:ALL?")),  # the snapshot a frozen loop keeps
        (0.3333, lambda s: setattr(s, "frozen", True)),
        (0.4111, lambda s: setattr(s, "frozen", False)),
        (0.6, _h(f"OUTP 0,(@{half + 3})")),
        (1.0, _h("TRAC:ACT?")),
    ]


def _run(cls: type[CabinetSim], asks_s: list[float], channels: int = 16,
         points: int = 1000) -> CabinetSim:
    """A cabinet of ``cls`` driven by the script, asked (TRAC:ACT?) at ``asks_s`` too."""
    clock = ManualClock(50.0)
    sim = cls(channels, "nmc811", clock=clock, seed=11)
    for line in ("FORM:DATA REAL,32", f"TRAC:POIN {points}", "TRIG:TIM 0.01"):
        sim.handle_line(line)
    events = sorted([(t, 0, a) for t, a in _script(channels)]
                    + [(t, 1, _h("TRAC:ACT?")) for t in asks_s], key=lambda e: e[:2])
    for t, _, action in events:
        clock.advance(50.0 + t - clock.now())
        action(sim)
    return sim


def _same(a: CabinetSim, b: CabinetSim) -> None:
    assert a.handle_line("SYST:ERR?") == b.handle_line("SYST:ERR?") == '0,"No error"'
    assert a.log.count == b.log.count and a.log.first_held == b.log.first_held
    assert a.handle_line("TRAC:DATA? 1") == b.handle_line("TRAC:DATA? 1")
    ra, rb = list(a.readings), list(b.readings)
    assert [t for t, _ in ra] == [t for t, _ in rb]
    assert all(np.array_equal(va, vb, equal_nan=True) for (_, va), (_, vb) in zip(ra, rb,
                                                                                  strict=True))
    assert np.array_equal(a.latched, b.latched) and np.array_equal(a.output_on, b.output_on)
    assert a.bank.time_s == b.bank.time_s
    assert np.array_equal(a.bank.soc, b.bank.soc)


@pytest.mark.parametrize("ask_every_s", [0.01, 0.05, 0.137, 0.5])
def test_block_readings_equal_reading_by_reading(ask_every_s: float) -> None:
    asks = list(np.arange(ask_every_s, 1.0, ask_every_s))
    block, single = _run(CabinetSim, asks), _run(OneByOne, asks)
    assert block.log.count == 101
    latched = block.handle_line("OUTP:PROT:TRIP? (@2)")
    assert latched == "1"  # the trip happened inside the run
    _same(block, single)


def test_block_readings_through_overflow_equal_reading_by_reading() -> None:
    # Asked rarely with a small ring: most readings are overwritten, skipped unrecorded.
    block, single = _run(CabinetSim, [0.7], points=20), _run(OneByOne, [0.7], points=20)
    assert block.log.first_held == 82
    _same(block, single)
