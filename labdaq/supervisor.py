"""Supervision of `labdaq serve`'s children: restart with backoff, give up, make safe.

A child that exits without being asked to is started again after a delay that doubles with
each death in a row (``RestartPolicy``); a child that stayed up ``stable_s`` has recovered
and its next death counts from one again. After ``max_restarts`` restarts that all died
within ``stable_s`` the supervisor gives up on that child and tells its owner, who makes
the lab safe (``all_outputs_off``) and records why. A child may depend on others (the
engine on the simulated lab whose instruments it opens): it is restarted only while they
run, or its runs would be judged against instruments that are not there yet.

Every exit, restart and give-up is reported to an async handler in a task of its own, so
that writing the events (a locked database waits up to its busy timeout) never delays the
supervision of the other children. Process mechanics are labdaq.processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labdaq import processes

log = logging.getLogger(__name__)

ACTOR = "supervisor"


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child that died, and when to stop trying."""

    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    stable_s: float = 30.0

    def delay_s(self, streak: int) -> float:
        """Wait before restart number ``streak`` of a run of quick deaths (1, 2, ...)."""
        return float(min(self.backoff_s * 2 ** max(0, streak - 1), self.backoff_max_s))


@dataclass
class Child:
    """One supervised process: how to start it (``restart_argv`` the second time on, if
    given) and what happened to it."""

    name: str
    argv: list[str]
    restart_argv: list[str] | None = None
    depends_on: tuple[str, ...] = ()
    log_path: Path | None = None
    proc: processes.Proc | None = None
    started_at: float = 0.0
    streak: int = 0  # deaths in a row, each within stable_s of its start
    restarts: int = 0
    restart_at: float | None = None
    gave_up: bool = False
    returncode: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass(frozen=True)
class ChildEvent:
    """``kind``: "exited" (restart_in_s says when it is started again), "restarted",
    "gave_up" (after ``streak`` quick deaths)."""

    kind: str
    child: str
    returncode: int | None = None
    streak: int = 0
    restart_in_s: float | None = None
    pid: int | None = None


Handler = Callable[[ChildEvent], Awaitable[None]]


@dataclass
class Supervisor:
    children: list[Child]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    handler: Handler | None = None
    clock: Callable[[], float] = time.monotonic
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    def start(self, child: Child) -> None:
        argv = child.restart_argv if child.restarts and child.restart_argv else child.argv
        child.proc = processes.spawn(argv, log_path=child.log_path, new_session=True)
        child.started_at = self.clock()
        child.restart_at = None
        child.returncode = None

    def step(self) -> list[ChildEvent]:
        """One look at every child: notice exits, schedule and perform restarts."""
        now = self.clock()
        events: list[ChildEvent] = []
        for c in self.children:
            if c.gave_up or c.proc is None:
                continue
            code = c.proc.poll()
            if code is not None and c.restart_at is None and c.returncode is None:
                c.returncode = code
                c.streak = c.streak + 1 if now - c.started_at < self.policy.stable_s else 1
                if c.streak > self.policy.max_restarts:
                    c.gave_up = True
                    events.append(ChildEvent("gave_up", c.name, code, c.streak, pid=c.pid))
                    continue
                delay = self.policy.delay_s(c.streak)
                c.restart_at = now + delay
                events.append(ChildEvent("exited", c.name, code, c.streak, delay, pid=c.pid))
            if c.restart_at is not None and now >= c.restart_at:
                if not all(self.child(d).running for d in c.depends_on):
                    continue  # still waiting for what it needs
                c.restarts += 1
                self.start(c)
                events.append(ChildEvent("restarted", c.name, streak=c.streak, pid=c.pid))
        return events

    def dispatch(self, events: Sequence[ChildEvent]) -> None:
        for ev in events:
            if ev.kind == "exited":
                log.error("%s process (pid %s) exited with %s; restarting it in %.1f s "
                          "(death %d in a row)", ev.child, ev.pid, ev.returncode,
                          ev.restart_in_s, ev.streak)
            elif ev.kind == "restarted":
                log.warning("%s process restarted (pid %s)", ev.child, ev.pid)
            else:
                log.critical("%s process died %d times in a row (last exit %s): not "
                             "restarting it", ev.child, ev.streak, ev.returncode)
            if self.handler is not None:
                task = asyncio.create_task(self._handle(ev), name=f"supervision-{ev.kind}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, ev: ChildEvent) -> None:
        assert self.handler is not None
        try:
            await self.handler(ev)
        except Exception:  # noqa: BLE001 - supervision goes on; the log says what failed
            log.exception("handling %s of %s failed", ev.kind, ev.child)

    async def watch(self, stop: asyncio.Event, poll_s: float = 0.2) -> None:
        """Supervise until ``stop`` is set."""
        while not stop.is_set():
            self.dispatch(self.step())
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the handlers still running (events being recorded)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def stop_all(self, order: Sequence[str], timeout_s: float = 20.0) -> dict[str, bool]:
        """Stop the children in ``order`` (others after), each SIGTERM then SIGKILL.
        Returns, per child that was running, whether it stopped by itself."""
        rank = {name: k for k, name in enumerate(order)}
        result: dict[str, bool] = {}
        for c in sorted(self.children, key=lambda c: rank.get(c.name, len(rank))):
            c.restart_at = None
            c.gave_up = True  # no restart from here on
            if c.proc is not None and c.proc.poll() is None:
                result[c.name] = await asyncio.to_thread(processes.stop, c.proc, timeout_s)
        return result


# -- what the supervisor records and does in the database and on the instruments --------


async def record_event(url: str, message: str, severity: str = "warning",
                       data: dict[str, Any] | None = None, on_runs: bool = True,
                       give_up_s: float = 120.0, node: str | None = None) -> list[int]:
    """One ``supervision`` event on every affected run (of ``node`` if given: a node of a
    multi-node lab speaks for its own runs only), one without a run if there is none, so
    that the record exists; returns the runs it went on. A database that is locked or away
    is retried with backoff for ``give_up_s``: the record matters."""
    delay_s, deadline = 0.5, time.monotonic() + give_up_s
    while True:
        try:
            return await _record_event(url, message, severity, data, on_runs, node)
        except Exception as exc:  # noqa: BLE001 - retried, then raised to the handler's log
            if time.monotonic() + delay_s > deadline:
                raise
            log.warning("supervision event not recorded yet (%s: %s); retrying in %.1f s",
                        type(exc).__name__, exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)


async def _record_event(url: str, message: str, severity: str,
                        data: dict[str, Any] | None, on_runs: bool,
                        node: str | None = None) -> list[int]:
    from sqlalchemy import select

    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            ids: list[int | None] = []
            if on_runs:
                q = select(m.Run.id).where(
                    m.Run.state.in_([m.RunState.running.value, m.RunState.paused.value]))
                if node is not None:
                    q = q.where(m.Run.node == node)
                ids = list((await s.scalars(q.order_by(m.Run.id))).all())
            for run_id in ids or [None]:
                s.add(m.Event(run_id=run_id, kind="supervision", severity=severity,
                              message=message, data=dict(data or {}), actor=ACTOR,
                              ts=datetime.now(UTC)))
        return [i for i in ids if i is not None]
    finally:
        await engine.dispose()


async def instrument_rows(url: str, owner: tuple[str, bool] | None = None
                          ) -> list[dict[str, Any]]:
    """Every configured instrument, or (``owner``: node name, drives unassigned ones)
    those of one node (labdaq.nodes.owned_by)."""
    from sqlalchemy import select

    from labdaq.nodes import owned_by
    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            q = select(m.Instrument).order_by(m.Instrument.id)
            if owner is not None:
                q = q.where(owned_by(*owner))
            rows = (await s.scalars(q)).all()
            return [{"name": r.name, "driver": r.driver, "resource": r.resource,
                     "options": dict(r.options or {})} for r in rows]
    finally:
        await engine.dispose()


def _off(row: dict[str, Any]) -> str:
    """Open one instrument through the one opener (as the engine does), turn every output
    off, close it."""
    from labdaq.drivers.opener import open_driver

    driver: Any = open_driver(row["driver"], row["resource"], name=row["name"],
                              options=row["options"])
    try:
        if not hasattr(driver, "all_off"):
            return "no outputs"
        driver.all_off()
        return "outputs off"
    finally:
        driver.transport.close()


async def all_outputs_off(url: str, timeout_s: float = 30.0,
                          owner: tuple[str, bool] | None = None) -> dict[str, str]:
    """Turn every output of every configured instrument (of one node: ``owner``, as in
    instrument_rows; another node's instruments are that node's) off, talking to the
    instruments directly (no engine is there to do it). Per instrument: what was done,
    or the error."""
    rows = await instrument_rows(url, owner)

    async def one(row: dict[str, Any]) -> str:
        try:
            return await asyncio.wait_for(asyncio.to_thread(_off, row), timeout_s)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the others
            return f"failed: {type(exc).__name__}: {exc}"

    results = await asyncio.gather(*(one(r) for r in rows))
    return {r["name"]: res for r, res in zip(rows, results, strict=True)}
