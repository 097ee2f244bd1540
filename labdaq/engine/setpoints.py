"""Set points and outputs of an instrument's channels, as a phase asks for them.

One job: turn a :class:`~labdaq.engine.channel.Phase` into role-interface commands
(labdaq.drivers.roles.Cycler), and switch outputs off fast and reliably, with the moment
the off command went out (the breach-to-off time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from labdaq.drivers.errors import ConnectionFailed, GarbledReply, InstrumentTimeout
from labdaq.drivers.roles import Cycler
from labdaq.engine.channel import Phase

log = logging.getLogger(__name__)

# Errors that mean the instrument is gone, not that a run did something wrong.
LOST_INSTRUMENT = (ConnectionFailed, InstrumentTimeout, GarbledReply)


class _ChannelLists(Protocol):
    """A Cycler's set-point commands on a list of channels (``sets_channel_lists``)."""

    def set_current(self, channel: int | Sequence[int], current_a: float,
                    voltage_limit_v: float) -> None: ...

    def set_voltage(self, channel: int | Sequence[int], voltage_v: float,
                    current_limit_a: float) -> None: ...

    def set_low_voltage_clamp(self, channel: int | Sequence[int], voltage_v: float) -> None: ...

    def output(self, channel: int | Sequence[int], on: bool) -> None: ...


class Outputs:
    def __init__(self, name: str, driver: Cycler,
                 call: Callable[..., Awaitable[Any]]) -> None:
        self.name = name
        self.driver = driver
        self.call = call  # runs a driver method in the instrument's worker thread
        # A multi-channel instrument switches a list of channels in one command.
        self._lists = driver.switches_channel_lists
        # ... and programs a list of channels to the same set points in one command.
        self._set_lists = driver.sets_channel_lists
        # Instruments with a lower compliance voltage in current mode (cycler cabinets).
        self._low_clamp = driver.has_low_voltage_clamp

    async def apply(self, ch: int, phase: Phase) -> None:
        """Program channel ``ch`` for ``phase`` (output off for rests and aux steps)."""
        await self._program(self.driver, ch, phase)

    async def apply_many(self, items: Sequence[tuple[int, Phase]]) -> None:
        """Program each channel for its phase. On an instrument that takes channel lists
        (``sets_channel_lists``), channels whose phases ask for the same set points get
        them in one command each, in the order they first appear; else one by one."""
        if not self._set_lists or len(items) < 2:
            for ch, phase in items:
                await self.apply(ch, phase)
            return
        groups: dict[tuple[Any, ...], tuple[Phase, list[int]]] = {}
        for ch, phase in items:
            groups.setdefault(self._set_points(phase), (phase, []))[1].append(ch)
        lists = cast(_ChannelLists, self.driver)
        for phase, chans in groups.values():
            await self._program(lists, chans[0] if len(chans) == 1 else chans, phase)

    def _set_points(self, phase: Phase) -> tuple[Any, ...]:
        """What :meth:`_program` sends for ``phase``: equal for phases it programs alike."""
        if phase.mode == "cc":
            low = phase.voltage_low_v if self._low_clamp else 0.0
            return ("cc", phase.current_a, phase.voltage_v, 0.0 if math.isnan(low) else low)
        if phase.mode == "cv":
            return ("cv", phase.voltage_v, phase.current_a)
        return (phase.mode,)

    async def _program(self, driver: Cycler | _ChannelLists, ch: Any, phase: Phase) -> None:
        """Set points and output for ``phase`` on channel ``ch`` (a list on a driver that
        takes lists)."""
        if phase.mode == "off":
            await self.call(driver.output, ch, False)
            return
        if phase.mode == "cc":
            if self._low_clamp:
                # A discharge that ends on voltage is held just below its end voltage by
                # the instrument's lower compliance (a cycler's VLIM:LOW clamps to CV and
                # never reverses the current). Always set: a clamp left from an earlier
                # step would stop a later one short; 0 V = none. SMUs have no lower
                # compliance in current mode (a voltage source limited to the current
                # would be one, but it charges a cell that falls below its set point, a
                # shorted one included), so there only the interlock guards the window.
                low = 0.0 if math.isnan(phase.voltage_low_v) else phase.voltage_low_v
                await self.call(driver.set_low_voltage_clamp, ch, low)
            await self.call(driver.set_current, ch, phase.current_a, phase.voltage_v)
        elif phase.mode == "cv":
            await self.call(driver.set_voltage, ch, phase.voltage_v, phase.current_a)
        await self.call(driver.output, ch, True)

    async def off(self, chans: Sequence[int]) -> float:
        """Switch channels off: one command on a multi-channel instrument, else one each.

        Returns when (perf_counter) the first off command went out to the instrument, NaN
        if none did. Never raises: a channel that cannot be switched off is logged and the
        others are still tried (the instrument's own protection is the layer below).
        """
        sent_s = math.nan
        if self._lists and len(chans) > 1:
            try:
                return float(await self._switch_off(list(chans)))
            except Exception as exc:  # noqa: BLE001 - fall back to one command per channel
                log.error("could not turn %s ch %s off at once: %s", self.name, chans, exc)
                # A command can fail only in the error-queue check after it: then it was
                # sent, and counts.
                sent_s = self.driver.marked_send_s()
        for ch in chans:
            try:
                at = await self._switch_off(ch)
            except LOST_INSTRUMENT as exc:
                # Each further try would wait out the transport's reconnect backoff again.
                log.error("could not turn %s off, instrument not answering: %s", self.name, exc)
                break
            except Exception as exc:  # noqa: BLE001
                log.error("could not turn %s ch %s off: %s", self.name, ch, exc)
                at = self.driver.marked_send_s()
            if math.isnan(sent_s):
                sent_s = at
        return sent_s

    async def _switch_off(self, channels: int | list[int]) -> float:
        """One off command, on the event loop's thread where the driver can (a safety
        cut-off waits for no worker-thread hand-off), else in the worker thread."""
        fast = await self.driver.aswitch_off(channels)
        if fast is not None:
            return fast
        return float(await self.call(self.driver.switch_off, channels))
