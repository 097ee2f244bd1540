"""Delegated runs whose instrument's server did not answer when the engine started.

One job: keep trying to reach a program runner's server (a Neware BTS server) that was
unreachable at engine start, with exponential backoff, and hand its runs back to
:class:`labdaq.engine.delegated.DelegatedRuns` once it answers. The cycler runs their
programs on meanwhile, so nothing is lost: when the server answers, the follower
harvests every record made in between, and the interruption event covers the time
labdaq could not watch, with ``samples_missing: 0`` — as after a link lost mid-run.

Each run gets one open-ended ``interruption`` event (cause ``instrument_lost``, no
``to_t_s``: the alerting raises an ``instrument_lost`` alert from it) when the waiting
begins, naming the backoff; the closing one, when the run is followed again, says how
many attempts it took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labdaq.engine.events import RunEvent
from labdaq.storage import models as m

if TYPE_CHECKING:
    from labdaq.engine.delegated import DelegatedRuns

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    """The runs of one instrument waiting for its server, and the attempts so far."""

    channels: dict[int, m.Channel] = field(default_factory=dict)  # run id -> its channel
    attempts: int = 0
    since_wall_s: float = field(default_factory=time.monotonic)
    first_error: str = ""


class ServerWait:
    """Retry an unreachable server per instrument; follow its runs when it answers."""

    def __init__(self, runs: DelegatedRuns, *, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 10.0) -> None:
        self.runs = runs
        # Wall seconds: a server that comes back is noticed within backoff_max_s.
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.waiting: dict[int, _Waiting] = {}  # instrument id -> its waiting runs
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def add(self, run: m.Run, channel: m.Channel, exc: BaseException) -> None:
        """``run`` cannot be followed now: its server did not answer (``exc``)."""
        node = self.runs.node
        w = self.waiting.setdefault(channel.instrument_id, _Waiting())
        w.channels[run.id] = channel
        w.first_error = w.first_error or f"{type(exc).__name__}: {exc}"
        if (inst := node.instruments.get(channel.instrument_id)) is not None:
            # Opened (its socket accepted) but not answering: /ready says so.
            node.heartbeat.instruments[inst.name] = f"lost: {exc}"
        pos = dict(run.position or {})
        node.recorder.event(RunEvent(
            run.id, "interruption", "warning",
            f"the server of its cycler does not answer ({type(exc).__name__}: {exc}); "
            "the program runs on on the cycler; retrying every "
            f"{self.backoff_initial_s:g} s up to every {self.backoff_max_s:g} s",
            {"cause": "instrument_lost", "channel": channel.index,
             "instrument_id": channel.instrument_id, "from_t_s": pos.get("t_s"),
             "last_seq": pos.get("seq", 0), "to_t_s": None, "error": str(exc),
             "retry": {"backoff_initial_s": self.backoff_initial_s,
                       "backoff_max_s": self.backoff_max_s}}))
        task = self.tasks.get(channel.instrument_id)
        if task is None or task.done():
            self.tasks[channel.instrument_id] = asyncio.create_task(
                self._retry(channel.instrument_id),
                name=f"await-server-{channel.instrument_id}")

    async def _retry(self, instrument_id: int) -> None:
        node = self.runs.node
        delay = self.backoff_initial_s
        while True:
            await asyncio.sleep(delay)
            w = self.waiting[instrument_id]
            w.attempts += 1
            channel = next(iter(w.channels.values()))
            try:
                inst = await self.runs.instrument_of(channel)
            except Exception as exc:  # noqa: BLE001 - still not there: try again later
                log.info("instrument %s: server still not answering (attempt %d): %s",
                         instrument_id, w.attempts, exc)
                if (opened := node.instruments.get(instrument_id)) is not None:
                    node.heartbeat.instruments[opened.name] = f"lost: {exc}"
                delay = min(delay * 2, self.backoff_max_s)
                continue
            break
        del self.waiting[instrument_id]
        self.tasks.pop(instrument_id, None)
        if inst is None:  # no longer a program runner (reconfigured): nothing to follow
            return
        note: dict[str, Any] = {
            "server_unreachable": {"attempts": w.attempts, "first_error": w.first_error,
                                   "wall_s": round(time.monotonic() - w.since_wall_s, 3)}}
        log.warning("instrument %s answers again after %d attempts: following runs %s",
                    inst.name, w.attempts, sorted(w.channels))
        for run, channel in await node.recorder.acquiring(list(w.channels)):
            await self.runs.resume(run, channel, inst, "engine_restart", note=note)

    async def close(self) -> None:
        """Engine shutdown: stop trying (the runs stay active; the next engine retries)."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.waiting.clear()
