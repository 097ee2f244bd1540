"""Role interfaces the engine programs against: Cycler, ImpedanceAnalyser, TemperatureLogger,
Chamber, ProgramRunner.

One job: say what a kind of instrument can do, independent of model, so the engine drives
a Keithley SMU and a multi-channel cycler the same way. Sign convention everywhere:
positive current flows into the cell (charge).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from labdaq.protocol import ResolvedProtocol


class Cycler(ABC):
    """Source/measure channels that charge and discharge cells.

    ``measure`` returns one row per requested channel: ``[voltage_v, current_a,
    temperature_c]`` (temperature NaN when the instrument has no sensor) as a float64
    array of shape ``(n, 3)`` — one numpy operation per tick, not an object per sample.
    """

    channels: list[int]
    #: ``output`` takes a list of channels and switches them in one command.
    switches_channel_lists: bool = False
    #: ``set_current``, ``set_voltage``, ``set_low_voltage_clamp`` and ``output`` take a
    #: list of channels too, and program them all to the same value in one command.
    sets_channel_lists: bool = False
    #: The instrument has a lower compliance voltage in current mode
    #: (:meth:`set_low_voltage_clamp`), as cycler cabinets do; SMUs do not.
    has_low_voltage_clamp: bool = False
    #: Each channel has a temperature sensor on its cell (cabinets): a NaN temperature
    #: is then a sensor that is open or dropped out, not "no sensor" (an SMU).
    has_temperature_sensor: bool = False

    @abstractmethod
    def configure_protection(self, channel: int, voltage_max_v: float,
                             current_max_a: float) -> None:
        """Program the instrument's own limits so it trips by itself (hardware layer)."""

    @abstractmethod
    def set_current(self, channel: int, current_a: float, voltage_limit_v: float) -> None:
        """Constant current (positive = charge) with voltage compliance (CV clamp)."""

    @abstractmethod
    def set_voltage(self, channel: int, voltage_v: float, current_limit_a: float) -> None:
        """Constant voltage with a current limit."""

    @abstractmethod
    def output(self, channel: int, on: bool) -> None:
        """Switch a channel's output."""

    @abstractmethod
    def all_off(self) -> None:
        """Switch every output off."""

    @abstractmethod
    def measure(self, channels: Sequence[int] | None = None) -> np.ndarray:
        """``(n, 3)`` array of ``[voltage_v, current_a, temperature_c]``; None = all."""

    @abstractmethod
    def safe_shutdown(self) -> None:
        """Best-effort: outputs off and into a state that cannot drain or push the cell;
        raises if the output could not be confirmed off."""

    async def ameasure(self, channels: Sequence[int] | None = None) -> np.ndarray | None:
        """:meth:`measure` without leaving the event loop's thread, where the link allows
        it; None: call :meth:`measure` (in the instrument's worker thread) instead."""
        return None

    def set_low_voltage_clamp(self, channel: int, voltage_v: float) -> None:
        """Lower compliance voltage in current mode (0 = none); see
        ``has_low_voltage_clamp``."""
        raise NotImplementedError(f"{type(self).__name__} has no lower voltage clamp")

    def mark_next_send(self) -> None:
        """Note when the next command goes out on the wire (:meth:`marked_send_s`);
        by default nothing is noted."""
        return None

    def marked_send_s(self) -> float:
        """perf_counter when the command after :meth:`mark_next_send` went out; NaN if
        not known."""
        return math.nan

    async def aswitch_off(self, channels: int | list[int]) -> float | None:
        """:meth:`switch_off` without leaving the event loop's thread, where the driver
        and its link allow it; None: call :meth:`switch_off` (in the instrument's worker
        thread) instead, which may send the off command again."""
        return None

    def switch_off(self, channels: int | list[int]) -> float:
        """``output(channels, False)``; returns when (perf_counter) the off command went
        out, which the error-queue check a driver does after it would otherwise hide (the
        breach-to-off time). Without a stamp: when it returned."""
        self.mark_next_send()
        self.output(channels, False)  # type: ignore[arg-type]  # a list where supported
        sent_s = self.marked_send_s()
        return sent_s if math.isfinite(sent_s) else time.perf_counter()


class ImpedanceAnalyser(ABC):
    """EIS / AC-IR meters."""

    @abstractmethod
    def sweep(self, freqs_hz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Complex impedance (ohm) at each frequency, same order as ``freqs_hz``."""

    @abstractmethod
    def dc_voltage_v(self) -> float:
        """Open-circuit DC voltage of the cell under test."""


class TemperatureLogger(ABC):
    """Thermocouple / RTD scanners."""

    channels: list[int]

    @abstractmethod
    def read_temperatures_c(self, channels: Sequence[int] | None = None) -> np.ndarray:
        """Temperatures in °C, one per channel; an open thermocouple is NaN (or raises
        InstrumentError if the driver is configured to be strict)."""


class Chamber(ABC):
    """Climatic chambers."""

    @abstractmethod
    def set_point_c(self, temperature_c: float) -> None:
        """Hold ``temperature_c``."""

    @abstractmethod
    def ramp(self, temperature_c: float, rate_c_per_min: float) -> None:
        """Ramp to ``temperature_c`` at ``rate_c_per_min``."""

    @abstractmethod
    def actual_c(self) -> float:
        """Measured chamber air temperature."""

    @abstractmethod
    def status(self) -> str:
        """Free-text state, e.g. ``"stable"``, ``"ramping"``, ``"alarm: ..."``."""


class ProgramRunner(ABC):
    """A cycler that runs its own step program (delegated mode, e.g. Neware BTS): labdaq
    translates the protocol once, starts it, follows it and harvests its records."""

    owned_test_ids: set[int]

    @classmethod
    @abstractmethod
    def unrunnable_step(cls, resolved: ResolvedProtocol) -> tuple[str, str] | None:
        """``(step path, why)`` of the first step or end condition this cycler's program
        cannot express, or None: checked when a run is created, before it is stored."""

    @abstractmethod
    def start(self, name: str, step_file_name: str, barcode: str) -> int:
        """Start a program on channel ``name``; the instrument's test id, pinned."""

    @abstractmethod
    def stop(self, names: Sequence[str]) -> None:
        """Stop the programs (only tests in ``owned_test_ids``)."""

    @abstractmethod
    def pause(self, names: Sequence[str]) -> None:
        """Pause the programs."""

    @abstractmethod
    def resume(self, names: Sequence[str]) -> None:
        """Continue paused programs."""

    @abstractmethod
    def download(self, name: str, test_id: int, start_seq: int,
                 count: int = 1000) -> list[dict[str, float]]:
        """Records of test ``test_id`` from ``start_seq`` (1-based), at most ``count``."""
