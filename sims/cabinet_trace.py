"""The cabinet simulator's logging commands over its ring of readings.

One job: answer ``TRAC:POIN``, ``TRIG:TIM``, ``INIT``, ``ABOR``, ``TRAC:CLE``,
``TRAC:ACT[:STAR|:END]?`` and ``TRAC:DATA?`` (docs/instruments/cabinet.md, "Buffered
logging") for :class:`labdaq.sims.cabinet.CabinetSim`, which mixes this in: the ring is
:class:`labdaq.sims.cabinet_log.ReadingLog`, and the cabinet decides when readings are
taken and what they are (its ``_step_to``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .cabinet_log import PERIOD_MAX_S, PERIOD_MIN_S, POINTS_MAX, POINTS_MIN, ReadingLog
from .clock import Clock
from .scpi import ScpiError, expect_args, format_nr1, format_nr3, parse_number


class LoggingCommands:
    """The ``TRAC``/``TRIG``/``INIT``/``ABOR`` handlers of a cabinet simulator."""

    # Provided by CabinetSim (declared here for the type checker).
    log: ReadingLog
    clock: Clock
    data_format: str
    byte_order: str
    _all: NDArray[np.int64]

    def _step_to(self, now: float) -> None:
        raise NotImplementedError

    def _channels_arg(self, text: str) -> NDArray[np.int64]:
        raise NotImplementedError

    def _set_points(self, args: list[str]) -> None:
        expect_args(args, 1)
        points = parse_number(args[0], minimum=POINTS_MIN, maximum=POINTS_MAX)
        if points != int(points):
            raise ScpiError(-224, "Illegal parameter value; TRAC:POIN takes a whole number")
        self.log.set_points(int(points))

    def _q_points(self, args: list[str]) -> str:
        expect_args(args, 0)
        return format_nr1(self.log.points)

    def _set_timer(self, args: list[str]) -> None:
        expect_args(args, 1)
        self.log.set_period(parse_number(args[0], minimum=PERIOD_MIN_S, maximum=PERIOD_MAX_S))

    def _q_timer(self, args: list[str]) -> str:
        expect_args(args, 0)
        return format_nr3(self.log.period_s)

    def _set_init(self, args: list[str]) -> None:
        expect_args(args, 0)
        now = self.clock.now()
        self._step_to(now)  # the cells are at now: the first reading is taken now
        self.log.start(now)
        self._step_to(now)

    def _set_abort(self, args: list[str]) -> None:
        expect_args(args, 0)
        self._step_to(self.clock.now())  # the readings due until now are taken
        self.log.running = False

    def _set_trace_clear(self, args: list[str]) -> None:
        expect_args(args, 0)
        if self.log.running:
            raise ScpiError(-221, "Settings conflict; ABOR logging before TRAC:CLE")
        self.log.clear()

    def _logged_now(self) -> None:
        """Take the readings due by now before a logging query answers. Only when one is
        due: the line's ``advance`` has just moved the cells (to within ``refresh_s``), and
        stepping them again by the microseconds since would cost a step and a regulation
        per query and change no reading."""
        now = self.clock.now()
        if self.log.running and self.log.next_t_s <= now:
            self._step_to(now)

    def _q_actual(self, args: list[str]) -> str:
        expect_args(args, 0)
        self._logged_now()
        first = self.log.first_held
        return format_nr1(self.log.count - first + 1 if first else 0)

    def _q_actual_start(self, args: list[str]) -> str:
        expect_args(args, 0)
        self._logged_now()
        return format_nr1(self.log.first_held)

    def _q_actual_end(self, args: list[str]) -> str:
        expect_args(args, 0)
        self._logged_now()
        return format_nr1(self.log.count)

    def _q_trace_data(self, args: list[str]) -> str:
        """``TRAC:DATA? <from>[,(@list)]``: the readings held from index ``from`` on (a
        binary block, FORM:DATA REAL,32 only)."""
        if not 1 <= len(args) <= 2:
            raise ScpiError(-109 if not args else -108)
        start = parse_number(args[0], minimum=1, maximum=2.0**53)
        if start != int(start):
            raise ScpiError(-224, "Illegal parameter value; the start index is a whole number")
        idx = self._all if len(args) == 1 else self._channels_arg(args[1])
        if self.data_format != "REAL":
            raise ScpiError(-221, "Settings conflict; TRAC:DATA? needs FORM:DATA REAL,32")
        self._logged_now()
        return self.log.fetch(int(start), idx, self.byte_order)
