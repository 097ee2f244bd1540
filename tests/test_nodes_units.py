"""Nodes, piece by piece (labdaq.nodes, labdaq/engine/node_link.py): roles refused on
SQLite, instruments assigned to nodes by the instruments file, instrument fences held by
one node at a time, and the run state the API shows for a node that is down. The
processes together are tests/test_nodes.py (slow)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from labdaq.cli import app
from labdaq.cli_instruments import apply_file
from labdaq.config import Settings
from labdaq.engine.node_link import NodeLink
from labdaq.instruments_config import dump_instruments_toml
from labdaq.nodes import NODE_DOWN, owned_by, shown_states, wake_node_of_run
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker


@pytest.mark.parametrize("role", ["node", "api"])
def test_multi_node_roles_are_refused_on_sqlite(tmp_path: Path, role: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--role", role, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs PostgreSQL" in result.output
    assert not (tmp_path / "labdaq.db").exists()  # refused before anything was started


def _lab(node_a: str | None) -> str:
    return dump_instruments_toml([
        {"name": "smu1", "driver": "keithley2450", "node": node_a,
         "resource": "TCPIP::127.0.0.1::5025::SOCKET", "channels": [1]},
        {"name": "smu2", "driver": "keithley2450",
         "resource": "TCPIP::127.0.0.1::5026::SOCKET", "channels": [1]},
    ])


def _owned(url: str, node: str, unassigned: bool) -> list[str]:
    async def go() -> list[str]:
        engine = create_engine(url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return list((await s.scalars(select(m.Instrument.name).where(
                    owned_by(node, unassigned)).order_by(m.Instrument.name))).all())
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_the_instruments_file_assigns_instruments_to_nodes(tmp_path: Path,
                                                           sqlite_url: str) -> None:
    path = tmp_path / "instruments.toml"
    path.write_text(_lab("bench-a"))
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path)
    apply_file(settings, path)
    # A --role node drives its own; the single-machine node the unassigned ones too.
    assert _owned(sqlite_url, "bench-a", unassigned=False) == ["smu1"]
    assert _owned(sqlite_url, "bench-b", unassigned=False) == []
    assert _owned(sqlite_url, "bench-a", unassigned=True) == ["smu1", "smu2"]
    path.write_text(_lab("bench-b"))
    result = apply_file(settings, path)
    assert "node 'bench-a' -> 'bench-b'" in str(result.changes)
    assert _owned(sqlite_url, "bench-b", unassigned=False) == ["smu1"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_an_instrument_fence_is_held_by_one_node_at_a_time(db_url: str) -> None:
    a, b = NodeLink(db_url, "a", False), NodeLink(db_url, "b", False)
    try:
        assert await a.acquire(7)
        assert await a.acquire(7)  # held already
        assert not await b.acquire(7)  # the other node must leave it alone
        assert await b.acquire(8)
        assert await b.acquire_waiting([7, 8], wait_s=0) == {7}
        # A restarted node waits for the fences its dead predecessor's connection held.
        waiting = asyncio.create_task(b.acquire_waiting([7], wait_s=60))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await a.close()  # a node that stops (or dies: its connection goes) releases it
        assert await asyncio.wait_for(waiting, 30) == set()
        assert 7 in b.held
    finally:
        await a.close()
        await b.close()


async def test_a_node_down_shows_its_acquiring_runs_as_node_down(db_engine: AsyncEngine
                                                                 ) -> None:
    maker = sessionmaker(db_engine)
    async with session_scope(maker) as s:
        now = datetime.now(UTC)
        for node, beat_at, state in (("up", now, "running"),
                                     ("stale", now - timedelta(seconds=60), "running"),
                                     ("stopped", now, "stopped")):
            s.add(m.NodeHeartbeat(node=node, pid=1, started_at=now, beat_at=beat_at,
                                  state=state, active_runs=1, instruments={}))
    runs = [m.Run(id=i, node=node, state=state) for i, (node, state) in enumerate([
        ("up", "running"), ("stale", "running"), ("stale", "paused"), ("stale", "completed"),
        ("stopped", "running"), (None, "queued"), ("never-beat", "running")], start=1)]
    async with session_scope(maker) as s:
        shown = await shown_states(s, runs, down_after_s=15)
    assert shown == {1: "running", 2: NODE_DOWN, 3: NODE_DOWN, 4: "completed",
                     5: NODE_DOWN, 6: "queued", 7: "running"}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_new_run_or_command_wakes_only_the_node_that_must_read_it(
        db_engine: AsyncEngine, db_url: str) -> None:
    maker = sessionmaker(db_engine)
    async with session_scope(maker) as s:
        inst = m.Instrument(name="smu1", driver="keithley2450", node="a",
                            resource="TCPIP::127.0.0.1::5025::SOCKET")
        s.add(inst)
        await s.flush()
        ch = m.Channel(instrument_id=inst.id, index=1, name="smu1/1")
        s.add(ch)
        await s.flush()
        channel_id = ch.id
    links = {n: NodeLink(db_url, n, unassigned=n == "all") for n in ("a", "b", "all")}
    try:
        for link in links.values():
            await link.connect()
            link.wake.clear()  # (connecting sets it: a reconnect looks at the tables once)
        # A queued run goes to the node of its channel's instrument; a command on a run
        # another node acquires (the instrument moved since) goes to that node.
        for run, woken in ((m.Run(id=1, channel_id=channel_id, state="queued"), "a"),
                           (m.Run(id=2, channel_id=channel_id, state="running", node="b"),
                            "b")):
            async with session_scope(maker) as s:
                await wake_node_of_run(s, run, "test")
                await asyncio.sleep(0.3)
                assert not links[woken].wake.is_set()  # sent on commit, not before
            await asyncio.wait_for(links[woken].wake.wait(), 10)
            await asyncio.sleep(0.3)  # what others would get has arrived by now
            assert [n for n, link in links.items() if link.wake.is_set()] == [woken]
            links[woken].wake.clear()
    finally:
        for link in links.values():
            await link.close()
