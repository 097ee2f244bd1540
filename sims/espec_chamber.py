"""ESPEC temperature chamber emulator (P-300 / SH / SU controller text protocol).

One job: answer the ESPEC ASCII command set the labdaq driver uses, with the air
temperature of a real chamber — first-order approach to the set point, limited by the
heating/cooling capability (°C/min), a linear remote-program ramp (``RUN PRGM``), door and
alarm faults — and push that air temperature into the ``ambient_c`` of the simulated cells
inside, so a cell's temperature follows the chamber the way it does in the lab.

Protocol (see docs/instruments/espec_chamber.md for what comes from ESPEC's
documentation and what is this simulator's choice): one command per line, CR+LF; queries
end in ``?`` (optionally ``?,ARG``), settings are ``HEADER, PARAMS`` and are answered
``OK:<command>``; errors are answered ``NA:<reason>`` (``CMD ERR``, ``PARA ERR``,
``DATA OUT OF RANGE``, ``CONT NOT READY-n``). There is no SCPI error queue and no
``*IDN?`` (it is an unknown command: ``NA:CMD ERR``); ``ROM?`` and ``TYPE?`` identify.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .clock import Clock, SimClock

# Alarm codes this simulator raises. The real alarm table is model-specific (see the
# chamber's manual); labdaq's driver maps codes to text through a table a lab can override.
ALARM_UPPER_LIMIT = 1
ALARM_LOWER_LIMIT = 2
ALARM_OVERHEAT_PROTECTOR = 3
ALARM_REFRIGERATOR = 6
ALARM_HEATER = 7
ALARM_FAN = 8
ALARM_DOOR_OPEN = 30

ALARM_TEXTS: dict[int, str] = {
    ALARM_UPPER_LIMIT: "air temperature above the upper limit (H)",
    ALARM_LOWER_LIMIT: "air temperature below the lower limit (L)",
    ALARM_OVERHEAT_PROTECTOR: "overheat protector tripped",
    ALARM_REFRIGERATOR: "refrigerator fault",
    ALARM_HEATER: "heater fault",
    ALARM_FAN: "circulation fan fault",
    ALARM_DOOR_OPEN: "door open",
}

# Largest integration step of the air-temperature model (simulated seconds).
MAX_STEP_S = 2.0
# Air near the set point within this band counts as settled (for MON? consumers).
SETTLED_BAND_C = 0.5
# How fast an open door pulls the air towards the room (simulated seconds).
DOOR_LEAK_TAU_S = 300.0
# Uncontrolled chamber (OFF, STANDBY, alarm) drifting back to room temperature.
PASSIVE_TAU_S = 1800.0

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_TEMP_PARAM = re.compile(rf"^\s*([SHL])\s*({_NUMBER})\s*$", re.IGNORECASE)
_ADDRESS = re.compile(r"^\s*(\d{1,2})\s*,(.*)$")


class EspecError(Exception):
    """A command the controller rejects; the reply is ``NA:<reason>``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _number(text: str) -> float:
    t = text.strip()
    if not re.fullmatch(_NUMBER, t):
        raise EspecError("PARA ERR")
    return float(t)


class EspecChamberSim:
    """Stateful ESPEC chamber; serve it with :class:`labdaq.sims.server.SimServer`
    (``read_termination="\\r\\n", write_termination="\\r\\n"``).

    ``cell_banks``: simulated cells inside the chamber; each gets ``ambient_c`` set to the
    air temperature whenever the model advances. ``room_c`` is the lab around the chamber
    (where the air drifts when the chamber is not controlling). Heating and cooling rates
    are what the hardware can do at most; a programmed ramp never goes faster.
    """

    def __init__(
        self,
        cell_banks: Iterable[Any] = (),
        clock: Clock | None = None,
        *,
        model: str = "SU-242",
        controller: str = "P300",
        rom: str = "P300 Ver.1.20",
        min_c: float = -40.0,
        max_c: float = 150.0,
        room_c: float = 25.0,
        initial_c: float | None = None,
        tau_s: float = 90.0,
        heat_rate_c_per_min: float = 3.0,
        cool_rate_c_per_min: float = 2.0,
        address: int | None = None,
        mode: str = "STANDBY",
        set_point_c: float | None = None,
    ) -> None:
        if min_c >= max_c:
            raise ValueError(f"min_c {min_c} must be below max_c {max_c}")
        if tau_s <= 0 or heat_rate_c_per_min <= 0 or cool_rate_c_per_min <= 0:
            raise ValueError("tau_s and the heating/cooling rates must be > 0")
        self.cell_banks: list[Any] = list(cell_banks)
        self.clock: Clock = clock if clock is not None else SimClock()
        self.model = model
        self.controller = controller
        self.rom = rom
        self.min_c = float(min_c)
        self.max_c = float(max_c)
        self.room_c = float(room_c)
        self.tau_s = float(tau_s)
        self.heat_rate_c_per_min = float(heat_rate_c_per_min)
        self.cool_rate_c_per_min = float(cool_rate_c_per_min)
        self.address = address
        # One lock: the server serialises lines, but tests and the lab poke faults and read
        # state from other threads.
        self._lock = threading.RLock()
        self.air_c = float(room_c if initial_c is None else initial_c)
        self.constant_sp_c = float(self.air_c if set_point_c is None else set_point_c)
        # Limits H/L: the controller's allowed range for this chamber (alarm outside it).
        self.upper_c = self.max_c
        self.lower_c = self.min_c
        mode = mode.upper()
        if mode not in ("OFF", "STANDBY", "CONSTANT"):
            raise ValueError(f"mode must be OFF, STANDBY or CONSTANT, not {mode!r}")
        self.mode = mode
        # Remote program (RUN PRGM): (t_start, temp_start, temp_end, duration_s) or None.
        self._program: tuple[float, float, float, float] | None = None
        self.door_open = False
        self._alarms: list[int] = []
        self._t_last = self.clock.now()
        self._push_ambient()

    # -- fault injection and inspection ----------------------------------------------------
    def open_door(self, is_open: bool = True) -> None:
        """Door open: warm (or cold) room air leaks in and the door alarm is active."""
        with self._lock:
            self.advance()
            self.door_open = bool(is_open)

    def inject_alarm(self, code: int) -> None:
        """Raise a (latched) alarm: the chamber stops controlling, as a real one does."""
        with self._lock:
            self.advance()
            if code not in self._alarms:
                self._alarms.append(int(code))

    def clear_alarms(self) -> None:
        """Operator reset at the panel (real controllers have no remote alarm reset)."""
        with self._lock:
            self.advance()
            self._alarms.clear()

    @property
    def alarms(self) -> list[int]:
        """Active alarm codes (latched ones plus the door while it is open)."""
        with self._lock:
            codes = list(self._alarms)
            if self.door_open and ALARM_DOOR_OPEN not in codes:
                codes.append(ALARM_DOOR_OPEN)
            return codes

    # -- model ----------------------------------------------------------------------------
    def _controlling(self) -> bool:
        """Heater/refrigerator active: running and no latched alarm (door alone is not)."""
        return self.mode in ("CONSTANT", "RUN") and not self._alarms

    def effective_set_point(self, t: float | None = None) -> float:
        """The set point the controller is driving towards at time ``t`` (ramped in RUN)."""
        if self.mode == "RUN" and self._program is not None:
            t0, start, end, duration = self._program
            now = self.clock.now() if t is None else t
            frac = 1.0 if duration <= 0 else min(1.0, max(0.0, (now - t0) / duration))
            return start + (end - start) * frac
        return self.constant_sp_c

    def _rate(self, t: float) -> float:
        """dT/dt (°C/s) of the air at time ``t``."""
        temp = self.air_c
        if self._controlling():
            rate = (self.effective_set_point(t) - temp) / self.tau_s
            rate = min(rate, self.heat_rate_c_per_min / 60.0)
            rate = max(rate, -self.cool_rate_c_per_min / 60.0)
        else:
            rate = (self.room_c - temp) / PASSIVE_TAU_S
        if self.door_open:
            rate += (self.room_c - temp) / DOOR_LEAK_TAU_S
        return rate

    def advance(self) -> None:
        """Integrate the air temperature up to the clock's now and update the cells."""
        with self._lock:
            now = self.clock.now()
            t = self._t_last
            remaining = now - t
            self._t_last = now
            for n in itertools.count():
                if remaining <= 1e-9:
                    break
                # Checked every 64 steps: it costs two more rate evaluations.
                if n % 64 == 0 and self._steady(t, remaining):
                    # Settled on a constant target: nothing left to integrate. Stepping a
                    # 30-day storage at 2 s would take ~1.3 M steps (seconds of CPU) and
                    # hold the chamber's reply to the next command past a host timeout.
                    break
                h = min(remaining, MAX_STEP_S)
                # Midpoint (RK2): the ramp set point moves during a step.
                k1 = self._rate(t)
                saved = self.air_c
                self.air_c = saved + 0.5 * h * k1
                k2 = self._rate(t + 0.5 * h)
                self.air_c = saved + h * k2
                t += h
                remaining -= h
                self._check_limits()
            self._push_ambient()

    def _steady(self, t: float, span_s: float) -> bool:
        """The air would move less than 1 µK over ``span_s`` at its present temperature,
        at both ends of the span (the set point is linear in time, so it is the same
        constant target throughout)."""
        return (abs(self._rate(t)) * span_s < 1e-6
                and abs(self._rate(t + span_s)) * span_s < 1e-6)

    def _check_limits(self) -> None:
        # Limit alarms latch like the real controller's; they only trip while running
        # (a chamber in standby at room temperature must not alarm on a narrow H/L band).
        if self.mode not in ("CONSTANT", "RUN"):
            return
        if self.air_c > self.upper_c + 0.05 and ALARM_UPPER_LIMIT not in self._alarms:
            self._alarms.append(ALARM_UPPER_LIMIT)
        if self.air_c < self.lower_c - 0.05 and ALARM_LOWER_LIMIT not in self._alarms:
            self._alarms.append(ALARM_LOWER_LIMIT)

    def _push_ambient(self) -> None:
        for bank in self.cell_banks:
            bank.ambient_c = self.air_c

    def _program_state(self) -> str:
        """``RMT RUN`` while ramping, ``RMT RUN END HOLD`` once the ramp is done."""
        if self._program is None:
            return "RUN"
        t0, _, _, duration = self._program
        return "RMT RUN END HOLD" if self.clock.now() >= t0 + duration else "RMT RUN"

    def mode_text(self, detail: bool = False) -> str:
        if self.mode == "RUN":
            return self._program_state() if detail else "RUN"
        return self.mode

    # -- protocol ---------------------------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        """One command line in, one reply line out (``None``: addressed to someone else)."""
        text = line.strip()
        if not text:
            return None
        m = _ADDRESS.match(text)
        if m is not None:
            # RS-485 multi-drop: "<address>,<command>"; others' commands get no reply.
            if self.address is not None and int(m.group(1)) != self.address:
                return None
            text = m.group(2).strip()
        with self._lock:
            self.advance()
            try:
                return self._dispatch(text)
            except EspecError as exc:
                return f"NA:{exc.reason}"

    def on_idle(self) -> None:
        self.advance()

    def _dispatch(self, text: str) -> str:
        upper = text.upper()
        if "?" in upper:
            head, _, arg = upper.partition("?")
            head = " ".join(head.split())
            arg = arg.strip()
            if arg.startswith(","):
                arg = arg[1:].strip()
            elif arg:
                raise EspecError("CMD ERR")
            handler = self._queries().get(head)
            if handler is None:
                raise EspecError("CMD ERR")
            return handler(arg)
        head, sep, params = upper.partition(",")
        head = " ".join(head.split())
        setter = self._settings().get(head)
        if setter is None:
            raise EspecError("CMD ERR")
        if not sep or not params.strip():
            raise EspecError("PARA ERR")
        setter(params.strip())
        return f"OK:{text}"

    def _queries(self) -> dict[str, Callable[[str], str]]:
        return {
            "ROM": self._q_rom,
            "TYPE": self._no_arg(lambda: f"T,{self.controller},{self.max_c:.1f}"),
            "TEMP": self._no_arg(self._q_temp),
            "HUMI": self._no_arg(self._q_humi),
            "MODE": self._q_mode,
            "MON": self._q_mon,
            "ALARM": self._no_arg(self._q_alarm),
            "CONSTANT SET": self._q_constant_set,
            "RUN PRGM MON": self._no_arg(self._q_run_prgm_mon),
            "RUN PRGM": self._no_arg(self._q_run_prgm),
        }

    def _settings(self) -> dict[str, Callable[[str], None]]:
        return {
            "TEMP": self._s_temp,
            "MODE": self._s_mode,
            "POWER": self._s_power,
            "RUN PRGM": self._s_run_prgm,
            "PRGM": self._s_prgm,
        }

    @staticmethod
    def _no_arg(fn: Callable[[], str]) -> Callable[[str], str]:
        def query(arg: str) -> str:
            if arg:
                raise EspecError("PARA ERR")
            return fn()

        return query

    # -- queries ------------------------------------------------------------------------------
    def _q_rom(self, arg: str) -> str:
        if arg not in ("", "DISP"):
            raise EspecError("PARA ERR")
        return self.rom

    def _q_temp(self) -> str:
        # present, set point (the moving one while a ramp runs), upper, lower
        return (f"{self.air_c:.1f},{self.effective_set_point():.1f},"
                f"{self.upper_c:.1f},{self.lower_c:.1f}")

    def _q_humi(self) -> str:
        raise EspecError("CONT NOT READY-1")  # temperature-only chamber

    def _q_mode(self, arg: str) -> str:
        if arg not in ("", "DETAIL"):
            raise EspecError("PARA ERR")
        return self.mode_text(detail=arg == "DETAIL")

    def _q_mon(self, arg: str) -> str:
        if arg not in ("", "DETAIL"):
            raise EspecError("PARA ERR")
        # temperature, humidity (empty: no humidity loop), mode, number of alarms
        return f"{self.air_c:.1f},,{self.mode_text(arg == 'DETAIL')},{len(self.alarms)}"

    def _q_alarm(self) -> str:
        codes = self.alarms
        return ",".join([str(len(codes)), *(str(c) for c in codes)])

    def _q_constant_set(self, arg: str) -> str:
        if arg != "TEMP":
            raise EspecError("PARA ERR" if not arg else "CONT NOT READY-1")
        return f"{self.constant_sp_c:.1f},ON"

    def _q_run_prgm_mon(self) -> str:
        if self.mode != "RUN" or self._program is None:
            raise EspecError("CONT NOT READY-2")
        t0, _, _, duration = self._program
        left_min = max(0, math.ceil((t0 + duration - self.clock.now()) / 60.0))
        # step, temperature set point now, time left h:mm, counter
        return f"1,{self.effective_set_point():.1f},{left_min // 60}:{left_min % 60:02d},0"

    def _q_run_prgm(self) -> str:
        if self._program is None:
            raise EspecError("CONT NOT READY-2")
        _, start, end, duration = self._program
        minutes = int(round(duration / 60.0))
        return (f"TEMP{start:.1f} GOTEMP{end:.1f} TIME{minutes // 60}:{minutes % 60:02d} "
                "REF9")

    # -- settings ------------------------------------------------------------------------------
    def _check_range(self, value: float) -> float:
        if not self.min_c <= value <= self.max_c:
            raise EspecError("DATA OUT OF RANGE")
        return value

    def _s_temp(self, params: str) -> None:
        # "S25.0", "H80.0", "L-40.0" or several: "S25.0 H80.0 L-40.0"
        tokens = re.findall(rf"[A-Za-z]\s*{_NUMBER}", params)
        if not tokens or re.sub(rf"[A-Za-z]\s*{_NUMBER}", "", params).strip(" ,"):
            raise EspecError("PARA ERR")
        new = {"S": self.constant_sp_c, "H": self.upper_c, "L": self.lower_c}
        for token in tokens:
            m = _TEMP_PARAM.match(token)
            if m is None:
                raise EspecError("PARA ERR")
            new[m.group(1).upper()] = self._check_range(float(m.group(2)))
        if not new["L"] < new["H"] or not new["L"] <= new["S"] <= new["H"]:
            raise EspecError("DATA OUT OF RANGE")
        self.constant_sp_c, self.upper_c, self.lower_c = new["S"], new["H"], new["L"]

    def _s_mode(self, params: str) -> None:
        mode = params.strip()
        if mode not in ("OFF", "STANDBY", "CONSTANT"):
            raise EspecError("PARA ERR")
        self.mode = mode
        self._program = None

    def _s_power(self, params: str) -> None:
        value = params.strip()
        if value == "ON":
            # Power on starts constant operation (ESPEC: "start constant 1").
            self.mode = "CONSTANT"
        elif value == "OFF":
            self.mode = "OFF"
        else:
            raise EspecError("PARA ERR")
        self._program = None

    def _s_run_prgm(self, params: str) -> None:
        # "TEMP25.0 GOTEMP45.0 TIME0:10" (GOTEMP optional: constant for TIME)
        fields: dict[str, str] = {}
        for token in params.replace(",", " ").split():
            m = re.fullmatch(rf"(GOTEMP|TEMP)({_NUMBER})|TIME(\d+):(\d+)", token)
            if m is None:
                raise EspecError("PARA ERR")
            if m.group(1):
                fields[m.group(1)] = m.group(2)
            else:
                fields["TIME"] = f"{m.group(3)}:{m.group(4)}"
        if "TEMP" not in fields or "TIME" not in fields:
            raise EspecError("PARA ERR")
        start = self._check_range(_number(fields["TEMP"]))
        end = self._check_range(_number(fields.get("GOTEMP", fields["TEMP"])))
        hours, minutes = (int(x) for x in fields["TIME"].split(":"))
        if minutes > 59 or hours > 99 or hours * 60 + minutes == 0:
            raise EspecError("DATA OUT OF RANGE")
        if not (self.lower_c <= start <= self.upper_c and self.lower_c <= end <= self.upper_c):
            raise EspecError("DATA OUT OF RANGE")
        self._program = (self.clock.now(), start, end, (hours * 60 + minutes) * 60.0)
        self.mode = "RUN"

    def _s_prgm(self, params: str) -> None:
        parts = [p.strip() for p in params.split(",")]
        if parts[0] != "END":
            raise EspecError("PARA ERR")
        if self.mode != "RUN":
            raise EspecError("CONT NOT READY-2")
        end_mode = parts[1] if len(parts) > 1 else "STANDBY"
        if end_mode == "HOLD":
            # Keep the present set point as the constant one.
            self.constant_sp_c = self.effective_set_point()
            self.mode = "CONSTANT"
        elif end_mode in ("CONST", "CONSTANT"):
            self.mode = "CONSTANT"
        elif end_mode in ("OFF", "STANDBY"):
            self.mode = end_mode
        else:
            raise EspecError("PARA ERR")
        self._program = None
