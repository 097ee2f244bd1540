"""The run queue through the API (no engine: queued runs stay queued): queueing on a busy
channel, positions, moving, cancelling, confirming a cell, roles and audit events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.test_api import CELL, PROTOCOL, auth

Client = tuple[httpx.AsyncClient, dict[str, str], str]


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[Client]:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        await upsert_instrument(
            s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
            [{"index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 105.0}],
        )
        s.add(m.Cell(**CELL))
        tokens = {role: await create_token(s, f"t-{role}", role)
                  for role in ("technician", "engineer", "admin")}
    await engine.dispose()
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, tokens, db_url


BODY: dict[str, Any] = {"channel": "smu1/1", "cell_serial": CELL["serial"],
                        "protocol": PROTOCOL}


async def post(c: httpx.AsyncClient, token: str, **extra: Any) -> httpx.Response:
    return await c.post("/api/v1/runs", json={**BODY, **extra}, headers=auth(token))


async def queue_of(c: httpx.AsyncClient, token: str) -> list[tuple[int, int]]:
    """(run id, position) of the channel's queue, as the API lists it."""
    r = await c.get("/api/v1/channels/1/queue", headers=auth(token))
    assert r.status_code == 200, r.text
    return [(x["id"], x["queue_position"]) for x in r.json()]


async def audit(url: str, run_id: int) -> list[m.Event]:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return list((await s.scalars(
                select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == "audit")
                .order_by(m.Event.id))).all())
    finally:
        await engine.dispose()


async def test_busy_channel_queues_with_positions(client: Client) -> None:
    c, tokens, url = client
    tech = tokens["technician"]
    runs = [(await post(c, tech)).json() for _ in range(3)]
    assert [r["queue_position"] for r in runs] == [1, 2, 3]
    assert all(r["state"] == "queued" for r in runs)
    ids = [r["id"] for r in runs]
    # Engineers read the queue, in order.
    assert await queue_of(c, tokens["engineer"]) == [(ids[0], 1), (ids[1], 2), (ids[2], 3)]
    one = (await c.get(f"/api/v1/runs/{ids[2]}", headers=auth(tech))).json()
    assert one["queue_position"] == 3
    listed = (await c.get("/api/v1/runs?state=queued", headers=auth(tech))).json()
    assert {r["id"]: r["queue_position"] for r in listed} == dict(zip(ids, [1, 2, 3],
                                                                      strict=True))
    # The channel is busy, with the queue's head.
    (ch,) = (await c.get("/api/v1/channels", headers=auth(tech))).json()
    assert ch["state"] == "busy" and ch["active_run_id"] == ids[0]
    # "queue": false keeps the 409 of a busy channel.
    refused = await post(c, tech, queue=False)
    assert refused.status_code == 409 and f"run {ids[0]}" in refused.json()["detail"]
    (created,) = await audit(url, ids[2])
    assert created.data["queue_position"] == 3 and "queue position 3" in created.message
    # An unknown channel has no queue.
    assert (await c.get("/api/v1/channels/99/queue", headers=auth(tech))).status_code == 404


async def test_move_and_cancel_are_for_technicians_and_audited(client: Client) -> None:
    c, tokens, url = client
    tech = tokens["technician"]
    a, b, d = [(await post(c, tech)).json()["id"] for _ in range(3)]
    # An engineer may not change the queue.
    r = await c.patch(f"/api/v1/runs/{d}", json={"queue_position": 1},
                      headers=auth(tokens["engineer"]))
    assert r.status_code == 403
    r = await c.patch(f"/api/v1/runs/{d}", json={"queue_position": 1}, headers=auth(tech))
    assert r.status_code == 200, r.text
    assert r.json()["queue_position"] == 1
    assert await queue_of(c, tech) == [(d, 1), (a, 2), (b, 3)]
    # Past the end: last.
    r = await c.patch(f"/api/v1/runs/{d}", json={"queue_position": 1000}, headers=auth(tech))
    assert r.json()["queue_position"] == 3
    assert await queue_of(c, tech) == [(a, 1), (b, 2), (d, 3)]
    moves = [e for e in await audit(url, d) if "moved" in e.message]
    assert [(e.data["from_position"], e.data["to_position"]) for e in moves] == [(3, 1), (1, 3)]
    assert all(e.actor == "t-technician" for e in moves)
    # Cancel the middle one: the others close up.
    r = await c.post(f"/api/v1/runs/{b}/stop", headers=auth(tech))
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    assert r.json()["queue_position"] is None
    assert await queue_of(c, tech) == [(a, 1), (d, 2)]
    (cancelled,) = [e for e in await audit(url, b) if "cancelled" in e.message]
    assert cancelled.data == {"position": 2} and cancelled.actor == "t-technician"
    # A run out of the queue cannot be moved; bad positions are 422.
    r = await c.patch(f"/api/v1/runs/{b}", json={"queue_position": 1}, headers=auth(tech))
    assert r.status_code == 409
    for bad in (0, -1, "1", 2**31, None):
        r = await c.patch(f"/api/v1/runs/{a}", json={"queue_position": bad}, headers=auth(tech))
        assert r.status_code == 422, bad
    r = await c.patch("/api/v1/runs/999", json={"queue_position": 1}, headers=auth(tech))
    assert r.status_code == 404


async def test_confirm_cell_is_for_an_awaiting_run_only(client: Client) -> None:
    c, tokens, url = client
    tech = tokens["technician"]
    run_id = (await post(c, tech)).json()["id"]
    r = await c.post(f"/api/v1/runs/{run_id}/confirm-cell", headers=auth(tech))
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    # As the engine leaves it when the cell on the channel is another one.
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        await s.execute(update(m.Run).where(m.Run.id == run_id).values(
            state="awaiting_cell", waiting_reason="cell X is on the channel",
            cell_confirmed_at=None))
    await engine.dispose()
    got = (await c.get(f"/api/v1/runs/{run_id}", headers=auth(tech))).json()
    assert got["state"] == "awaiting_cell" and got["waiting_reason"].startswith("cell X")
    assert got["queue_position"] == 1
    r = await c.post(f"/api/v1/runs/{run_id}/confirm-cell", headers=auth(tokens["engineer"]))
    assert r.status_code == 403
    r = await c.post(f"/api/v1/runs/{run_id}/confirm-cell", headers=auth(tech))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued" and r.json()["waiting_reason"] is None
    (confirmed,) = [e for e in await audit(url, run_id) if "confirmed" in e.message]
    assert CELL["serial"] in confirmed.message
    assert confirmed.data["waited_because"] == "cell X is on the channel"
    assert (await c.post("/api/v1/runs/999/confirm-cell", headers=auth(tech))).status_code == 404


async def test_not_before_is_a_utc_time(client: Client) -> None:
    c, tokens, _ = client
    tech = tokens["technician"]
    r = await post(c, tech, not_before="2030-01-02T03:04:05+05:30")
    assert r.status_code == 201, r.text
    assert r.json()["not_before"] in ("2030-01-01T21:34:05Z", "2030-01-01T21:34:05+00:00")
    # Without its offset the time is ambiguous; far outside a lab's plans it is a typo.
    for bad in ("2030-01-02T03:04:05", "9999-12-31T23:59:59-14:00", "1999-12-31T00:00:00Z",
                "tomorrow", 5):
        r = await post(c, tech, not_before=bad)
        assert r.status_code == 422, (bad, r.text)
        assert "not_before" in r.text
    assert (await post(c, tech, queue="no")).status_code == 422


async def test_concurrent_requests_each_get_their_own_place(client: Client) -> None:
    c, tokens, _ = client
    tech = tokens["technician"]
    # Two at once on an idle channel with "queue": false: one wins, the other is a 409.
    both = await asyncio.gather(post(c, tech, queue=False), post(c, tech, queue=False))
    assert sorted(r.status_code for r in both) == [201, 409], [r.text for r in both]
    # Five at once that may queue: every one is queued, each with its own place.
    five = await asyncio.gather(*(post(c, tech) for _ in range(5)))
    assert [r.status_code for r in five] == [201] * 5, [r.text for r in five]
    assert sorted(r.json()["queue_position"] for r in five) == [2, 3, 4, 5, 6]
    assert [p for _, p in await queue_of(c, tech)] == [1, 2, 3, 4, 5, 6]


async def test_when_the_next_run_may_start(db_url: str) -> None:
    """The engine's decision for the head of a free channel (run_queue.decide), and a claim
    ending the confirmations given for the cell before it (RunRecorder.claim)."""
    from datetime import UTC, datetime, timedelta

    from labdaq import run_queue
    from labdaq.engine.recorder import RunRecorder

    engine = create_engine(db_url)
    maker = sessionmaker(engine)
    now = datetime.now(UTC)
    async with session_scope(maker) as s:
        inst = await upsert_instrument(
            s, "cab1", "cabinet", "TCPIP::127.0.0.1::2::SOCKET",
            [{"index": i, "name": f"cab1/{i}"} for i in (1, 2)])
        a, b = m.Cell(**CELL), m.Cell(**{**CELL, "serial": "T-002"})
        proto = m.Protocol(name="p", content_hash="sha256:" + "cd" * 32, document={})
        s.add_all([a, b, proto])
        await s.flush()
        ch1, ch2 = (await s.scalars(select(m.Channel).where(
            m.Channel.instrument_id == inst.id).order_by(m.Channel.index))).all()
        ch2.default_cell_id = b.id
        ids = {"ch1": ch1.id, "a": a.id, "proto": proto.id}

        def run(ch: int, cell: int, state: str, order: int | None = None,
                **kw: Any) -> m.Run:
            r = m.Run(channel_id=ch, cell_id=cell, protocol_id=proto.id, state=state,
                      sample_period_s=1, queue_order=order, **kw)
            s.add(r)
            return r

        # Channel 1: a run on cell A ended by a safety abort; the next, on A too, waits.
        run(ch1.id, a.id, "aborted_safety", started_at=now - timedelta(hours=2))
        after_abort = run(ch1.id, a.id, "queued", 1)
        # Channel 2: no run before; its default cell is B, the head is for A.
        other_cell = run(ch2.id, a.id, "queued", 1)
        behind = run(ch2.id, b.id, "queued", 2, cell_confirmed_at=now)
        await s.flush()
        first, second = after_abort.id, other_cell.id
        assert behind.id not in (first, second)

    async def decisions() -> dict[int, str | None]:
        async with session_scope(maker) as s:
            return {d.run.id: d.reason for d in await run_queue.decide(s, now)}

    got = await decisions()
    assert set(got) == {first, second}  # only heads; the one behind waits its turn
    assert "ended aborted_safety" in (got[first] or "")
    assert "cell is T-002" in (got[second] or "") and CELL["serial"] in (got[second] or "")
    # A technician confirms both: they may start; one not before tomorrow is left out.
    async with session_scope(maker) as s:
        for run_id in (first, second):
            await s.execute(update(m.Run).where(m.Run.id == run_id).values(
                cell_confirmed_at=now))
        await s.execute(update(m.Run).where(m.Run.id == second).values(
            not_before=now + timedelta(days=1)))
    assert await decisions() == {first: None}
    # Claiming it holds channel 1 (a second claim there is refused by the database) and
    # ends what was confirmed for the cell before it.
    recorder = RunRecorder(maker, "node1")
    async with session_scope(maker) as s:
        extra = m.Run(channel_id=ids["ch1"], cell_id=ids["a"], protocol_id=ids["proto"],
                      state="queued", sample_period_s=1, queue_order=2, cell_confirmed_at=now)
        s.add(extra)
        await s.flush()
        extra_id = extra.id
    assert await recorder.claim(first, ids["ch1"])
    async with session_scope(maker) as s:
        assert (await s.get(m.Run, extra_id)).cell_confirmed_at is None  # type: ignore[union-attr]
        await s.execute(update(m.Run).where(m.Run.id == extra_id).values(
            cell_confirmed_at=now))
    assert not await recorder.claim(extra_id, ids["ch1"])
    assert await decisions() == {}  # channel 1 is held; channel 2's head waits for tomorrow
    # Previous run completed on the same cell: the next goes on by itself.
    async with session_scope(maker) as s:
        await s.execute(update(m.Run).where(m.Run.id == first).values(state="completed"))
        await s.execute(update(m.Run).where(m.Run.id == extra_id).values(
            cell_confirmed_at=None))
    assert await decisions() == {extra_id: None}
    await engine.dispose()
