"""What the parts of an AcquisitionNode kept in their own modules (scheduling.py,
recovery.py) may use of it: the node's state and the methods they call on each other.
Declarations only; node.py defines them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq.engine.aux_steps import AuxSteps
from labdaq.engine.channel import ChannelRun
from labdaq.engine.clock import EngineClock
from labdaq.engine.delegated import DelegatedRuns
from labdaq.engine.events import EngineEvent
from labdaq.engine.group import InstrumentGroup
from labdaq.engine.instruments import OpenInstrument
from labdaq.engine.recorder import RunRecorder
from labdaq.engine.sink import SampleSink
from labdaq.engine.stats import EngineStats
from labdaq.heartbeat import Heartbeat
from labdaq.storage import models as m


class NodeParts:
    maker: async_sessionmaker[AsyncSession]
    clock: EngineClock
    poll_s: float
    max_resume_gap_s: float
    writer: SampleSink
    recorder: RunRecorder
    aux: AuxSteps
    instruments: dict[int, OpenInstrument]
    groups: dict[int, InstrumentGroup]
    active: dict[int, ChannelRun]  # run id -> the run, while it acquires here
    run_groups: dict[int, InstrumentGroup]  # run id -> its group
    wall_clock: Callable[[], float]
    rounds: int
    clock_jump_threshold_s: float
    _clock_offset_s: float | None
    _clock_pending_s: float | None
    _dropped_reported: dict[int, int]
    _scheduler_error: bool
    _stopping: asyncio.Event
    _waiting: set[asyncio.Task[None]]
    heartbeat: Heartbeat
    stats: EngineStats
    delegated: DelegatedRuns  # runs whose cycler runs its own program (delegated.py)

    if TYPE_CHECKING:
        async def _group_for(self, instrument_id: int) -> InstrumentGroup: ...
        async def _open_instrument(self, row: m.Instrument) -> OpenInstrument: ...
        async def _start(self, run: m.Run, channel: m.Channel) -> None: ...
        async def _on_event(self, ev: EngineEvent, instrument_id: int | None = None) -> None:
            ...
        def _release(self, run_id: int) -> None: ...
        def _wait_for(self, instrument_id: int, run_ids: list[int], reason: str) -> None: ...
        async def _beat(self, state: str = "running") -> None: ...
