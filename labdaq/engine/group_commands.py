"""An instrument group's commands: its inbox, pause, resume, stop, and losing everything.

One job of :class:`~labdaq.engine.group.InstrumentGroup` (which inherits it): commands
for its runs (:class:`~labdaq.engine.events.Command`) wait in an inbox and are acted on
at the start of the next tick, at a safe point of the loop; an instrument that stopped
answering hands every run to the node; a failure ends them; ``halt`` and ``close`` end
the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from labdaq.engine.channel import ChannelRun, Phase
from labdaq.engine.events import Command, InstrumentLost, RunEnded, RunEvent
from labdaq.engine.group_edges import FLAG_EDGE, GroupEdges
from labdaq.engine.ledger import Ledger


class GroupCommands(GroupEdges):
    """The inbox and what ends or suspends runs (the state is the group's, see group.py)."""

    _inbox: dict[int, list[tuple[Command, str | None]]]
    _requests: bool
    _wake: asyncio.Event
    _phases: list[Phase]
    _closing: bool
    _task: asyncio.Task[None] | None
    _apply: Callable[[ChannelRun, Phase], Awaitable[None]]
    _load_phases: Callable[[], None]
    _full_position: Callable[[int], dict[str, Any]]
    _remove: Callable[[int], None]

    def command(self, run_id: int, cmd: Command, detail: str | None = None) -> None:
        """Queue a command for a run (``detail``: why an auxiliary step failed); the
        group acts on it at its next tick, at a safe point of its loop."""
        self._inbox.setdefault(run_id, []).append((cmd, detail))
        self._requests = True
        self._wake.set()


    def _take_commands(self) -> None:
        """Commands in the inbox → the runs' request flags."""
        for r in self.runs:
            for cmd, detail in self._inbox.pop(r.run_id, ()):
                if cmd is Command.STOP:
                    r.stop_requested = True
                elif cmd is Command.SAFETY_STOP:
                    r.stop_requested = True
                    r.safety_stop = detail or "safety stop requested"
                elif cmd is Command.PAUSE:
                    r.pause_requested = True
                elif cmd is Command.RESUME:
                    r.pause_requested = False
                elif cmd is Command.AUX_DONE:
                    r.aux_done = True
                elif cmd is Command.AUX_FAILED:
                    r.aux_error = detail or "auxiliary step failed"

    async def _handle_requests(self) -> None:
        if not self._requests:
            return
        self._requests = False
        self._take_commands()
        done: list[int] = []
        resumed: list[int] = []
        for k, r in enumerate(self.runs):
            if r.stop_requested:
                await self._outputs_off([r.channel])
                r.outcome = (("aborted_safety", r.safety_stop) if r.safety_stop
                             else ("stopped", "stop requested"))
                done.append(k)
            elif r.pause_requested and not r.paused:
                await self._outputs_off([r.channel])
                r.paused = True
                self.state.paused[k] = True
                r.pause_t_s = self.clock.now() - float(self.state.t0_clock_s[k])
            elif r.paused and not r.pause_requested:
                # Resume: the paused time, up to the set point being back in place, does
                # not count toward the phase's deadline.
                p = self._phases[k]
                await self._apply(r, p)
                paused_for = self.clock.now() - float(self.state.t0_clock_s[k]) - r.pause_t_s
                p.deadline_t_s += paused_for
                r.step_t0_s += paused_for
                r.phase_t0_s += paused_for
                r.paused = False
                self.state.paused[k] = False
                resumed.append(k)
        if resumed:
            self._load_phases()
            # A reading right after the set point is back, stored and made the integration
            # anchor: integrating from the last paused reading instead would count the
            # output as on for up to a tick before it was.
            done += await self._edge(
                resumed, {}, FLAG_EDGE, integrate=False,
                ledger=Ledger(positions=[self._full_position(k) for k in resumed]))
        for k in sorted(set(done), reverse=True):
            r = self.runs[k]
            self._remove(k)
            await self.emit(RunEnded(r))

    async def _interrupt_all(self, exc: Exception) -> None:
        """The instrument stopped answering: try to turn its outputs off (its own watchdog
        does if the link is gone for good), record an open-ended interruption event from
        each run's last stored sample, and hand the runs to the node, which resumes them
        when the instrument answers again (or ends them ``interrupted``)."""
        await self._outputs_off(list(self.chans))
        reason = f"instrument {self.name} lost: {type(exc).__name__}: {exc}"
        lost: list[ChannelRun] = []
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            self._pull(k)
            await self.emit(RunEvent(
                r.run_id, "interruption", "warning", reason,
                {"cause": "instrument_lost", "instrument": self.name, "channel": r.channel,
                 "from_t_s": float(self.state.t_s[k]), "last_seq": int(self.state.seq[k]),
                 "to_t_s": None, "error": str(exc)},
            ))
            self._remove(k)
            lost.append(r)
        if lost:
            await self.emit(InstrumentLost(lost, reason))

    async def _fail_all(self, reason: str) -> None:
        await self._outputs_off(list(self.chans))
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            r.outcome = ("failed", reason)
            self._remove(k)
            await self.emit(RunEnded(r))

    async def halt(self) -> None:
        """End the loop after its current tick, leaving the runs where they are (the
        engine is stopping; a restart resumes them)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)

    async def close(self) -> None:
        self._closing = True
        for r in self.runs:
            self.command(r.run_id, Command.STOP)
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)
