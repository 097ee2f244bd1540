"""What an instrument group tells the node: typed events, one outlet.

A group never calls back into the node; it emits these through the one callable it was
given (``InstrumentGroup.emit``), and the node hands them on (records to the RunRecorder,
auxiliary steps to AuxSteps, lost runs to recovery). Steps and cycles that a phase end
completes, and run positions, are not events: they travel with the samples through the
sample sink (:mod:`labdaq.engine.ledger`), so they are committed with the rows they count.
Commands go the other way, through the group's inbox (:class:`Command`).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from labdaq.engine.channel import ChannelRun, Phase


@dataclass(frozen=True)
class RunEvent:
    """An entry for the run's events table (safety trip, interruption...)."""

    run_id: int
    kind: str
    severity: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SafetyTrip(RunEvent):
    """A limit was crossed; the output is already off and the reading stored."""


@dataclass(frozen=True)
class RunEnded:
    """The run left its group for good (``run.outcome`` says how); its last steps and
    cycles are in ``run.closing``, to be recorded once its samples are committed."""

    run: ChannelRun


@dataclass(frozen=True)
class AuxRequested:
    """The run entered a phase another instrument carries out (EIS sweep, chamber set
    point); the group waits for ``Command.AUX_DONE``/``AUX_FAILED`` in its inbox."""

    run: ChannelRun
    phase: Phase


@dataclass(frozen=True)
class InstrumentLost:
    """The instrument stopped answering: these runs left the group (outputs off where
    possible) and wait for it to come back."""

    runs: list[ChannelRun]
    reason: str


EngineEvent = RunEvent | RunEnded | AuxRequested | InstrumentLost
Emit = Callable[[EngineEvent], Awaitable[None]]


class Command(enum.StrEnum):
    """What reaches a run through its group's inbox, acted on at the next tick."""

    STOP = "stop"
    # A stop for safety the engine did not measure (a hazard a technician observed): the
    # run ends aborted_safety; ``detail`` says why.
    SAFETY_STOP = "safety_stop"
    PAUSE = "pause"
    RESUME = "resume"
    AUX_DONE = "aux_done"
    AUX_FAILED = "aux_failed"
