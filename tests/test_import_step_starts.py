"""Step starts an imported log missed (labdaq.imports.data.ImportedData.with_step_starts):
a step's current holds from its start, so where the file's step time shows the log's
readings around a step start are not that step's current, the import adds the reading
that is, flagged EDGE, and a trapezoid over the samples counts the step's charge whole.
Capacities are checked against the current times the step's duration, computed here."""

from __future__ import annotations

import numpy as np

from labdaq.analysis import summarise_cycles
from labdaq.imports.data import EDGE_FLAG, ImportedData


def _data(t: list[float], step_t: list[float], i: list[float], step: list[int]
          ) -> ImportedData:
    n = len(t)
    return ImportedData(
        format="test", reader="test", reader_licence="test", t_s=np.array(t),
        voltage_v=np.linspace(3.5, 4.0, n), current_a=np.array(i),
        cycle_index=np.ones(n, np.int64), step_index=np.array(step, np.int64),
        step_time_s=np.array(step_t))


def _charge_ah(d: ImportedData) -> tuple[float, float]:
    s = summarise_cycles(d.t_s, d.voltage_v, d.current_a, d.cycle_index,
                         charge_cutoff_v=4.2, discharge_cutoff_v=3.0)
    return float(s.charge_capacity_ah[0]), float(s.discharge_capacity_ah[0])


def test_a_first_reading_taken_before_the_switch_gets_the_steps_current() -> None:
    """Neware-like: every step's first reading is at step time 0. The charge's shows the
    rest before it (0 A); the discharge's the charge before it; the CV phase's the CC
    current it continues from (a hand-over, not a switch: nothing added there)."""
    d = _data(
        t=[0, 10, 20, 20, 30, 40, 40, 50, 60, 60, 70, 80],
        step_t=[0, 10, 20, 0, 10, 20, 0, 10, 20, 0, 10, 20],
        i=[0, 0, 0, 0, 2.0, 2.0, 2.0, 1.9, 1.8, 1.8, -1.0, -1.0],
        step=[1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    got = d.with_step_starts()
    assert got.details["step_switch_readings"] == 2
    assert "step_start_readings" not in got.details
    assert got.t_s.size == d.t_s.size + 2
    edge = np.flatnonzero(got.flags == EDGE_FLAG)
    # After the charge's first reading and after the discharge's, at the same instant.
    assert got.t_s[edge].tolist() == [20.0, 60.0]
    assert got.current_a[edge].tolist() == [2.0, -1.0]
    assert got.step_index[edge].tolist() == [2, 4]
    assert np.all(np.diff(got.t_s) >= 0)
    charge_ah, discharge_ah = _charge_ah(got)
    cv_ah = (0.5 * (2.0 + 1.9) + 0.5 * (1.9 + 1.8)) * 10 / 3600
    assert abs(charge_ah - (2.0 * 20 / 3600 + cv_ah)) < 1e-12
    assert abs(discharge_ah - 1.0 * 20 / 3600) < 1e-12
    # Without them, the trapezoid ramps over each first interval: half the charge's is
    # lost, and the discharge's (from +1.8 A to -1.0 A) counts as 0.4 A of charge.
    before_c, before_d = _charge_ah(d)
    assert abs(before_c - (charge_ah - 1.0 * 10 / 3600 + 0.4 * 10 / 3600)) < 1e-12
    assert abs(before_d - (discharge_ah - 1.0 * 10 / 3600)) < 1e-12


def test_a_step_that_began_between_readings_gets_a_reading_at_its_start() -> None:
    """Arbin-like: the discharge began 90 s before its first reading (step time 90 s),
    30 s after the charge's last reading."""
    d = _data(t=[0, 120, 240, 360, 480], step_t=[0, 120, 240, 90, 210],
              i=[1.0, 1.0, 1.0, -1.0, -1.0], step=[1, 1, 1, 2, 2])
    got = d.with_step_starts()
    assert got.details["step_start_readings"] == 1
    assert "step_switch_readings" not in got.details
    (edge,) = np.flatnonzero(got.flags == EDGE_FLAG)
    assert got.t_s[edge] == 270.0 and got.current_a[edge] == -1.0
    assert got.step_time_s is not None and got.step_time_s[edge] == 0.0
    _, discharge_ah = _charge_ah(got)
    assert abs(discharge_ah - 1.0 * 210 / 3600) < 1e-12


def test_readings_that_already_show_the_steps_current_are_left_alone() -> None:
    """A first reading at the start that already carries the step's current (Neware's
    .ndax), and a file without step time: nothing added."""
    d = _data(t=[0, 30, 30, 60, 90], step_t=[0, 30, 0, 30, 60],
              i=[0.0, 0.0, 0.12, 0.12, 0.12], step=[1, 1, 2, 2, 2])
    assert d.with_step_starts() is d
    no_clock = _data(t=[0, 30, 30, 60], step_t=[0, 0, 0, 0], i=[0, 0, 0, 1.0],
                     step=[1, 1, 2, 2])
    no_clock.step_time_s = None
    assert no_clock.with_step_starts() is no_clock
