"""The live stream (SSE) of a run over real HTTP: samples, a step, a cycle summary and
state changes as they are committed; a reconnect with Last-Event-ID resumes with no gap
and nothing twice; decimation to a requested rate."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from typing import Any

import httpx
from sqlalchemy.engine import make_url

from labdaq import live
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker, snapshot_scope
from tests.dataout_fixtures import api_server, insert_samples, make_lab


def read_stream(base: str, run_id: int | None, token: str, out: list[dict[str, Any]],
                last_id: str | None = None, params: dict[str, Any] | None = None,
                until: Any = None) -> None:
    """Collect a stream's messages until it ends (or ``until(out)`` holds)."""
    headers = {"Authorization": f"Bearer {token}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    path = "/api/v1/stream" if run_id is None else f"/api/v1/runs/{run_id}/stream"
    with httpx.stream("GET", f"{base}{path}", headers=headers,
                      params={"poll_s": 0.1, **(params or {})}, timeout=120) as r:
        assert r.status_code == 200
        msg: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                if "event" in msg:
                    out.append(msg)
                    if until is not None and until(out):
                        return
                msg = {}
            elif line.startswith("id: "):
                msg["id"] = line[4:]
            elif line.startswith("event: "):
                msg["event"] = line[7:]
            elif line.startswith("data: "):
                msg["data"] = json.loads(line[6:])


def wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def seqs(msgs: list[dict[str, Any]]) -> list[int]:
    return [s for m in msgs if m["event"] == "samples" for s in m["data"]["seq"]]


def test_stream_follows_a_run_and_resumes_without_gap(sqlite_url: str) -> None:
    lab = asyncio.run(make_lab(sqlite_url))
    run_id, token = lab["run_ids"][0], lab["tokens"]["engineer"]
    db = sqlite3.connect(make_url(sqlite_url).database or "")
    db.execute("UPDATE runs SET state = 'running' WHERE id = ?", (run_id,))
    db.commit()
    insert_samples(sqlite_url, run_id, 3_000)
    with api_server(sqlite_url) as (base, _):
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=read_stream, args=(base, run_id, token, got))
        reader.start()
        wait_for(lambda: 3_000 in seqs(got))
        # The run goes on: more samples, a step and a cycle summary, then it completes.
        insert_samples(sqlite_url, run_id, 2_000, first_seq=3_001, missing_temperature=0)
        db.execute(
            "INSERT INTO steps (run_id, step_number, step_index, cycle_index, kind, start_t_s,"
            " end_t_s, end_reason, capacity_ah, energy_wh) VALUES (?, 1, 0, 0, 'cc', 0, 300,"
            " 'voltage', 1.2, 4.4)", (run_id,))
        db.execute(
            "INSERT INTO cycles (run_id, cycle_index, start_t_s, end_t_s, charge_capacity_ah,"
            " discharge_capacity_ah, charge_energy_wh, discharge_energy_wh) VALUES"
            " (?, 0, 0, 500, 1.2, 1.1, 4.4, 4.0)", (run_id,))
        db.execute("UPDATE runs SET state = 'completed' WHERE id = ?", (run_id,))
        db.commit()
        reader.join(timeout=120)
        assert not reader.is_alive(), "the stream did not end with the run"
        assert seqs(got) == list(range(1, 5_001))
        kinds = [m["event"] for m in got]
        assert kinds.index("step") < kinds.index("cycle")
        assert [m["data"]["state"] for m in got if m["event"] == "state"] == [
            "running", "completed"]
        assert got[-1]["event"] == "state"
        assert next(m for m in got if m["event"] == "cycle")["data"]["discharge_capacity_ah"] \
            == 1.1
        # Reconnect after the first samples message: everything after it, once.
        first = next(m for m in got if m["event"] == "samples")
        again: list[dict[str, Any]] = []
        read_stream(base, run_id, token, again, last_id=first["id"])
        assert seqs(again) == list(range(first["data"]["seq"][-1] + 1, 5_001))
        assert [m["event"] for m in again].count("cycle") == 1
        # Decimated: at most one sample per second of run time (samples are 0.1 s apart).
        slow: list[dict[str, Any]] = []
        read_stream(base, run_id, token, slow, params={"rate_hz": 1.0})
        t = [x for m in slow if m["event"] == "samples" for x in m["data"]["t_s"]]
        assert 450 <= len(t) <= 501
        assert all(b - a >= 1.0 for a, b in zip(t, t[1:], strict=False))
        bad = httpx.get(f"{base}/api/v1/runs/{run_id}/stream",
                        headers={"Authorization": f"Bearer {token}", "Last-Event-ID": "x"},
                        timeout=60)
        assert bad.status_code == 422
    db.close()


def test_lab_stream_follows_every_run_from_now_and_resumes(sqlite_url: str) -> None:
    lab = asyncio.run(make_lab(sqlite_url, runs=2))
    a, b = lab["run_ids"]
    token = lab["tokens"]["engineer"]
    db = sqlite3.connect(make_url(sqlite_url).database or "")
    db.execute("INSERT INTO events (run_id, ts, kind, severity, message, data) VALUES"
               " (?, '2026-12-01 00:00:00', 'state', 'info', 'old news', '{}')", (a,))
    db.commit()

    def news(run_id: int, what: str) -> None:
        db.execute("INSERT INTO events (run_id, ts, kind, severity, message, data) VALUES"
                   " (?, '2026-12-06 00:00:00', 'safety', 'error', ?, '{}')", (run_id, what))
        db.commit()

    with api_server(sqlite_url) as (base, _):
        got: list[dict[str, Any]] = []
        # Until both events and the cycle are in: one poll reads cycles before events, so
        # a cycle committed between those two reads comes after the event committed after it.
        reader = threading.Thread(target=read_stream, args=(base, None, token, got), kwargs={
            "until": lambda out: sum(m["event"] == "event" for m in out) >= 2
            and any(m["event"] == "cycle" for m in out)})
        reader.start()
        wait_for(lambda: bool(got))  # the hello: the stream starts from now
        news(a, "limit breached on run a")
        db.execute(
            "INSERT INTO cycles (run_id, cycle_index, start_t_s, end_t_s, charge_capacity_ah,"
            " discharge_capacity_ah, charge_energy_wh, discharge_energy_wh) VALUES"
            " (?, 0, 0, 500, 1.2, 1.1, 4.4, 4.0)", (b,))
        db.commit()
        news(b, "limit breached on run b")
        reader.join(timeout=120)
        assert not reader.is_alive()
        events = [m for m in got if m["event"] == "event"]
        assert [e["data"]["message"] for e in events] == [
            "limit breached on run a", "limit breached on run b"]
        assert [e["data"]["run_id"] for e in events] == [a, b]
        assert [m["data"]["run_id"] for m in got if m["event"] == "cycle"] == [b]
        # Resume after the first event: exactly what the stream sent after it.
        again: list[dict[str, Any]] = []
        after = got[got.index(events[0]) + 1:]
        read_stream(base, None, token, again, last_id=events[0]["id"],
                    until=lambda out: len(out) > len(after))  # its hello, then as many
        # The same messages; within one poll cycles come before events, so a resumed
        # stream may send in one poll what the first one sent across two.
        def key(m: dict[str, Any]) -> str:
            return json.dumps([m["event"], m["data"]], sort_keys=True)

        assert sorted(map(key, again[1:])) == sorted(map(key, after))
        assert [m["data"].get("message") for m in again if m["event"] == "event"] == [
            "limit breached on run b"]
    db.close()


async def test_a_poll_reads_one_snapshot_of_the_database(db_url: str) -> None:
    """A step and its cycle summary committed together after the poll has read the steps
    and before it reads the cycles: the poll (a snapshot, as the stream's) sees neither,
    the next one both, the step first. Reading each table as it is at that moment would
    have sent the cycle without its step, and the step after it."""
    lab = await make_lab(db_url)
    run_id = lab["run_ids"][0]
    engine = create_engine(db_url)
    maker = sessionmaker(engine)
    try:
        async with snapshot_scope(maker) as s:
            read = s.scalars
            committed = False

            async def scalars(statement: Any, *args: Any, **kwargs: Any) -> Any:
                nonlocal committed
                if not committed and "FROM cycles" in str(statement):
                    committed = True
                    async with session_scope(maker) as w:
                        w.add(m.Step(run_id=run_id, step_number=1, step_index=0,
                                     cycle_index=0, kind="cc", start_t_s=0.0, end_t_s=300.0,
                                     end_reason="voltage", capacity_ah=1.2, energy_wh=4.4))
                        w.add(m.Cycle(run_id=run_id, cycle_index=0, start_t_s=0.0,
                                      end_t_s=500.0, charge_capacity_ah=1.2,
                                      discharge_capacity_ah=1.1, charge_energy_wh=4.4,
                                      discharge_energy_wh=4.0))
                return await read(statement, *args, **kwargs)

            s.scalars = scalars  # type: ignore[method-assign]
            run = await s.get(m.Run, run_id)
            assert run is not None
            first = await live.poll(s, run, live.Cursor())
        assert committed
        assert [x.event for x in first] == ["state"]
        async with snapshot_scope(maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            second = await live.poll(s, run, first[-1].cursor)
        assert [x.event for x in second] == ["step", "cycle"]
    finally:
        await engine.dispose()
