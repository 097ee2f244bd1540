"""The run state machine, written once: which state may follow which, and which commands
a state accepts. The API side (labdaq/runs.py) and the engine's RunRecorder both use it.

::

    awaiting_cell ◀──cell differs / previous run ended abnormally── queued
      │   └──────────────────confirm-cell (technician)────────────────▲ │
      │                                                                 │ claim
      │ stop              running ◀──resume── paused  ◀────────────────┘ (as running)
      │                     │  └────pause────▶  │
      ▼                     ▼                   ▼
    stopped    completed | stopped | aborted_safety | failed | interrupted

A run waits in its channel's queue (queued, awaiting_cell: labdaq/run_queue.py) until the
engine claims it. A command (stop, pause, resume) is written by the API as
``requested_action``; the engine acts on it at the run's next tick and records the state
it leads to. A waiting run that is stopped (cancelled) never touched an instrument, so
the API ends it itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from labdaq.storage.models import RunState

#: Every state a state may move to.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.queued: frozenset({RunState.running, RunState.stopped, RunState.awaiting_cell}),
    RunState.awaiting_cell: frozenset({RunState.queued, RunState.stopped}),
    RunState.running: frozenset({
        RunState.paused, RunState.completed, RunState.stopped, RunState.aborted_safety,
        RunState.failed, RunState.interrupted,
    }),
    RunState.paused: frozenset({
        RunState.running, RunState.stopped, RunState.aborted_safety, RunState.failed,
        RunState.interrupted,
    }),
}
TERMINAL: frozenset[RunState] = frozenset(
    s for s in RunState if s not in TRANSITIONS
)
#: States in which the engine acquires (or resumes) the run.
ACQUIRING: tuple[RunState, ...] = (RunState.running, RunState.paused)

#: The states each command is accepted in.
COMMANDS: dict[str, frozenset[RunState]] = {
    "stop": frozenset({RunState.queued, RunState.awaiting_cell, RunState.running,
                       RunState.paused}),
    # A hazard observed on an acquiring run (labdaq.benchmarks.service): the engine turns
    # the output off and ends it aborted_safety.
    "safety_stop": frozenset({RunState.running, RunState.paused}),
    "pause": frozenset({RunState.running}),
    "resume": frozenset({RunState.paused}),
    "confirm-cell": frozenset({RunState.awaiting_cell}),
    "move": frozenset({RunState.queued, RunState.awaiting_cell}),
}


def can_move(current: str, to: RunState) -> bool:
    return to in TRANSITIONS.get(RunState(current), frozenset())


def sources(to: RunState) -> list[str]:
    """States a run may be in to move to ``to`` (an UPDATE's WHERE clause)."""
    return [s.value for s, targets in TRANSITIONS.items() if to in targets]


def command_refusal(current: str, command: str) -> str | None:
    """Why ``command`` cannot be applied to a run in ``current`` (None: it can)."""
    allowed = COMMANDS[command]
    if RunState(current) in allowed:
        return None
    names = " or ".join(sorted(s.value for s in allowed))
    article = "an" if names[0] in "aeiou" else "a"
    return f"is {current}; only {article} {names} run can be {_past[command]}"


#: The end reason of a run stopped on a ``safety_stop`` request.
SAFETY_STOP_REASON = "stopped for safety: a hazard was observed (see its safety event)"

_past = {"stop": "stopped", "safety_stop": "stopped for safety", "pause": "paused",
         "resume": "resumed", "confirm-cell": "confirmed", "move": "moved in its queue"}


def ending(to: RunState, reason: str) -> dict[str, Any]:
    """Column values for a terminal state (UPDATE/ORM)."""
    assert to in TERMINAL, to
    return {"state": to.value, "end_reason": reason, "ended_at": datetime.now(UTC),
            "requested_action": None}
