"""Alerts (labdaq.alerts): a safety stop reaches a local SMTP sink (aiosmtpd) and a local
HTTP receiver, each naming the run and the limit; a failing receiver is retried and the
failure recorded; a restarted notifier neither repeats nor skips."""

from __future__ import annotations

import email
import json
import threading
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from labdaq.alerts import Notifier
from labdaq.config import AlertSubscription, Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dataout_fixtures import make_lab
from tests.ports import free_port


class _Sink:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_sink() -> Iterator[tuple[int, _Sink]]:
    sink = _Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield port, sink
    finally:
        ctl.stop()


class _Receiver(ThreadingHTTPServer):
    posts: dict[str, list[dict[str, Any]]]
    flaky_left: int
    posted: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.setdefault(self.path, []).append(body)
        self.server.posted.set()
        fail = self.path == "/down" or (self.path == "/flaky" and self.server.flaky_left > 0)
        if self.path == "/flaky" and fail:
            self.server.flaky_left -= 1
        self.send_response(500 if fail else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    srv = _Receiver(("127.0.0.1", 0), _Handler)
    srv.posts, srv.flaky_left, srv.posted = {}, 1, threading.Event()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


async def _safety_stop(url: str, run_id: int) -> None:
    """The rows the engine commits when a limit trips: the safety event (labdaq.engine.
    safety.breach_event's data), then the run's final state and its state event."""
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            why = "max_voltage_v: measured 4.31, limit 4.3 (limit from cell)"
            s.add(m.Event(run_id=run_id, kind="safety", severity="critical",
                          message=f"safety limit crossed, output turned off: {why}",
                          data={"limit": "max_voltage_v", "value": 4.31, "bound": 4.3,
                                "seq": 120, "t_s": 12.0, "source": "cell"}))
            await s.flush()
            await s.execute(update(m.Run).where(m.Run.id == run_id)
                            .values(state="aborted_safety", end_reason=why))
            s.add(m.Event(run_id=run_id, kind="state", severity="warning",
                          message=f"run aborted_safety: {why}",
                          data={"state": "aborted_safety"}))
    finally:
        await engine.dispose()


async def test_safety_stop_alerts_by_email_and_webhook_retried_and_recorded(
    db_url: str, smtp_sink: tuple[int, _Sink], receiver: _Receiver
) -> None:
    port, sink = smtp_sink
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    lab = await make_lab(db_url)
    run_id = lab["run_ids"][0]
    settings = Settings(
        public_url="https://lab.example", smtp_host="127.0.0.1", smtp_port=port,
        alerts_attempts=3, alerts_backoff_s=0,
        alerts=[
            AlertSubscription(email="oncall@lab.example", kinds=["aborted_safety"]),
            AlertSubscription(webhook=f"{base}/ok"),
            AlertSubscription(webhook=f"{base}/flaky"),
            AlertSubscription(webhook=f"{base}/down"),
            AlertSubscription(webhook=f"{base}/completed-only", kinds=["completed"]),
        ],
    )
    engine = create_engine(db_url)
    try:
        maker = sessionmaker(engine)
        # The first start follows from now: the lab's history raises no alert.
        assert await Notifier(maker, settings).run_once() == 0
        await _safety_stop(db_url, run_id)
        assert await Notifier(maker, settings).run_once() == 4

        assert len(sink.messages) == 1
        mail = sink.messages[0]
        assert mail["To"] == "oncall@lab.example"
        assert f"run {run_id}" in mail["Subject"] and "max_voltage_v" in mail["Subject"]
        body = mail.get_payload()
        assert isinstance(body, str)
        assert "max_voltage_v" in body and f"https://lab.example/runs/{run_id}" in body

        [hook] = receiver.posts["/ok"]
        assert hook["run_id"] == run_id and hook["kind"] == "aborted_safety"
        assert hook["limit"]["limit"] == "max_voltage_v" and hook["limit"]["bound"] == 4.3
        assert hook["channel"] == "smu1/1"
        assert hook["link"] == f"https://lab.example/runs/{run_id}"
        assert len(receiver.posts["/flaky"]) == 2  # failed once, retried, delivered
        assert len(receiver.posts["/down"]) == 3  # every attempt refused
        assert "/completed-only" not in receiver.posts

        async with maker() as s:
            rows = {d.target: d for d in (await s.scalars(select(m.AlertDelivery))).all()}
        assert {t: (d.outcome, d.attempts) for t, d in rows.items()} == {
            "oncall@lab.example": ("sent", 1),
            f"{base}/ok": ("sent", 1),
            f"{base}/flaky": ("sent", 2),
            f"{base}/down": ("failed", 3),
        }
        assert "500" in (rows[f"{base}/down"].error or "")
        assert all(d.run_id == run_id and d.kind == "aborted_safety" for d in rows.values())

        # A restart neither repeats what was delivered nor skips what comes next.
        assert await Notifier(maker, settings).run_once() == 0
        assert len(sink.messages) == 1 and len(receiver.posts["/ok"]) == 1
        async with session_scope(maker) as s:
            s.add(m.Event(run_id=run_id, kind="state", message="run completed: end of protocol",
                          data={"state": "completed"}))
        assert await Notifier(maker, settings).run_once() == 4  # 3 webhooks + completed-only
        assert len(sink.messages) == 1  # the e-mail subscriber asked for safety stops only
        [done] = receiver.posts["/completed-only"]
        assert done["kind"] == "completed" and done["limit"] is None

        # A lost instrument (the open-ended interruption the engine records, outputs off
        # and the run waiting) is a paused_fault alert; its resumption is none.
        async with session_scope(maker) as s:
            s.add(m.Event(run_id=run_id, kind="interruption", severity="warning",
                          message="instrument smu1 lost: TimeoutError: no reply",
                          data={"cause": "instrument_lost", "instrument": "smu1",
                                "from_t_s": 20.0, "to_t_s": None}))
            s.add(m.Event(run_id=run_id, kind="interruption", severity="warning",
                          message="run resumed after a 3.0 s gap",
                          data={"cause": "instrument_lost", "to_t_s": 23.0}))
        assert await Notifier(maker, settings).run_once() == 3  # the 3 webhooks of all kinds
        assert len(sink.messages) == 1 and len(receiver.posts["/completed-only"]) == 1
        fault = receiver.posts["/ok"][-1]
        assert fault["kind"] == "paused_fault" and "smu1 lost" in fault["reason"]

        # The instrument stayed away too long: the engine ends the run interrupted.
        async with session_scope(maker) as s:
            await s.execute(update(m.Run).where(m.Run.id == run_id)
                            .values(state="interrupted"))
            s.add(m.Event(run_id=run_id, kind="interruption", severity="warning",
                          message="interrupted for 900 s, more than the 600 s a run may "
                                  "be resumed after",
                          data={"last_seq": 120, "samples_committed": 120,
                                "from_t_s": 20.0, "gap_s": 900.0, "gap_wall_s": 900.0}))
        assert await Notifier(maker, settings).run_once() == 3
        ended = receiver.posts["/ok"][-1]
        assert ended["kind"] == "paused_fault" and ended["state"] == "interrupted"

        # A chamber that missed its set point in time pauses the run for a technician
        # (labdaq.engine.aux_steps): a paused_fault alert saying why.
        async with session_scope(maker) as s:
            s.add(m.Event(run_id=run_id, kind="chamber", severity="warning",
                          message="run paused: chamber chamber1 at 31.20 °C did not hold "
                                  "45.00 ± 1.0 °C for 60 s within 600 s; resume to wait "
                                  "again, or stop the run",
                          data={"cause": "set_point_timeout", "chamber": "chamber1",
                                "state": "paused"}))
        assert await Notifier(maker, settings).run_once() == 3
        paused = receiver.posts["/ok"][-1]
        assert paused["kind"] == "paused_fault" and paused["state"] == "chamber_paused"
        assert "chamber chamber1" in paused["reason"] and paused["channel"] == "smu1/1"
    finally:
        await engine.dispose()


def test_api_process_runs_the_notifier(sqlite_url: str, receiver: _Receiver) -> None:
    """The API's lifespan starts the notifier when alerts are configured; it follows the
    events the engine writes while the API serves."""
    import asyncio

    from fastapi.testclient import TestClient

    from labdaq.api.app import create_app

    lab = asyncio.run(make_lab(sqlite_url))
    run_id = lab["run_ids"][0]

    async def follow_from_start() -> None:
        # The cursor at the start of the events table, so the first poll cannot take the
        # safety stop below for history.
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                s.add(m.AlertCursor(id=1, event_id=0))
        finally:
            await engine.dispose()

    asyncio.run(follow_from_start())
    url = f"http://127.0.0.1:{receiver.server_address[1]}/ok"
    settings = Settings(database_url=sqlite_url, alerts_poll_s=0.05,
                        alerts=[AlertSubscription(webhook=url)])
    with TestClient(create_app(settings)):
        asyncio.run(_safety_stop(sqlite_url, run_id))
        assert receiver.posted.wait(timeout=30), "no webhook from the API's notifier"
    [hook] = receiver.posts["/ok"]
    assert hook["run_id"] == run_id and hook["limit"]["limit"] == "max_voltage_v"


def test_api_process_on_sqlite_records_and_alerts_a_silent_engine(
    sqlite_url: str, receiver: _Receiver
) -> None:
    """On SQLite (one machine, ``--role all``) the API process watches the engine's
    heartbeat as it watches nodes on PostgreSQL: a beat older than ``node_down_after_s``
    becomes a ``node`` event and a ``node_down`` alert naming the engine's run."""
    import asyncio

    from fastapi.testclient import TestClient

    from labdaq.api.app import create_app

    lab = asyncio.run(make_lab(sqlite_url))
    run_id = lab["run_ids"][0]

    async def silent_engine() -> None:
        engine = create_engine(sqlite_url)
        try:
            maker = sessionmaker(engine)
            await _acquiring_on(maker, run_id, "bench-pc")
            async with session_scope(maker) as s:
                s.add(m.AlertCursor(id=1, event_id=0))
            await _beat(maker, "bench-pc", 60)
        finally:
            await engine.dispose()

    asyncio.run(silent_engine())
    url = f"http://127.0.0.1:{receiver.server_address[1]}/ok"
    settings = Settings(database_url=sqlite_url, alerts_poll_s=0.05, node_down_after_s=15,
                        alerts=[AlertSubscription(webhook=url, kinds=["node_down"])])
    with TestClient(create_app(settings)):
        assert receiver.posted.wait(timeout=30), "no node_down alert from the API process"
    [hook] = receiver.posts["/ok"]
    assert hook["kind"] == "node_down" and hook["node"] == "bench-pc"
    assert hook["runs"] == [run_id]


def test_subscription_names_exactly_one_target_and_known_kinds() -> None:
    with pytest.raises(ValueError):
        AlertSubscription()
    with pytest.raises(ValueError):
        AlertSubscription(email="a@b", webhook="http://x")
    with pytest.raises(ValueError):
        AlertSubscription(email="a@b", kinds=["exploded"])


async def _acquiring_on(maker: Any, run_id: int, node: str) -> None:
    """The run is running, acquired by ``node``."""
    async with session_scope(maker) as s:
        await s.execute(update(m.Run).where(m.Run.id == run_id)
                        .values(state="running", node=node))


async def _beat(maker: Any, node: str, age_s: float) -> None:
    """Node ``node``'s heartbeat row, last written ``age_s`` seconds ago by the database's
    clock (the node itself writes it; here the test plays the node)."""
    from datetime import timedelta

    from sqlalchemy import func

    from labdaq.nodes import db_now

    async with session_scope(maker) as s:
        beat_at = await db_now(s) - timedelta(seconds=age_s)
        row = await s.get(m.NodeHeartbeat, node)
        if row is None:
            s.add(m.NodeHeartbeat(node=node, pid=1, started_at=func.now(), beat_at=beat_at,
                                  state="running", active_runs=1))
        else:
            row.beat_at = beat_at


async def test_node_down_and_back_are_one_event_each_and_alert(
    db_url: str, smtp_sink: tuple[int, _Sink], receiver: _Receiver
) -> None:
    """Two API processes' watchers (labdaq.node_watch) see a node's heartbeat go stale at
    the same time: one ``node`` event is written, and its alert names the node and its
    run; the node coming back is one more event and alert."""
    import asyncio

    from labdaq.node_watch import NodeWatch

    port, sink = smtp_sink
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    lab = await make_lab(db_url)
    run_id = lab["run_ids"][0]
    settings = Settings(
        public_url="https://lab.example", smtp_host="127.0.0.1", smtp_port=port,
        alerts_attempts=1, alerts_backoff_s=0,
        alerts=[AlertSubscription(email="oncall@lab.example", kinds=["node_down"]),
                AlertSubscription(webhook=f"{base}/ok"),
                AlertSubscription(webhook=f"{base}/runs-only", kinds=["completed"])])
    engine = create_engine(db_url)
    try:
        maker = sessionmaker(engine)
        await _acquiring_on(maker, run_id, "a")
        await _beat(maker, "a", 0)
        await _beat(maker, "b", 0)
        assert await Notifier(maker, settings).run_once() == 0
        watchers = [NodeWatch(maker, down_after_s=15, poll_s=1) for _ in range(2)]
        # Up and never down: nothing to say.
        assert [await w.run_once() for w in watchers] == [[], []]

        await _beat(maker, "a", 60)
        written = await asyncio.gather(*(w.run_once() for w in watchers))
        assert sorted(len(ids) for ids in written) == [0, 1]
        # A restarted watcher (a new API process) does not write it again.
        assert await NodeWatch(maker, 15, 1).run_once() == []
        assert await Notifier(maker, settings).run_once() == 2

        [hook] = receiver.posts["/ok"]
        assert hook["kind"] == "node_down" and hook["node"] == "a"
        assert hook["runs"] == [run_id] and hook["run_id"] is None
        assert "no heartbeat" in hook["reason"]
        [mail] = sink.messages
        assert "node a down" in mail["Subject"]
        assert "/runs-only" not in receiver.posts

        await _beat(maker, "a", 0)
        written = await asyncio.gather(*(w.run_once() for w in watchers))
        assert sorted(len(ids) for ids in written) == [0, 1]
        assert await Notifier(maker, settings).run_once() == 1  # the e-mail is for downs
        back = receiver.posts["/ok"][-1]
        assert back["kind"] == "node_up" and back["node"] == "a"
        async with maker() as s:
            events = (await s.scalars(select(m.Event).where(m.Event.kind == "node")
                                      .order_by(m.Event.id))).all()
        assert [(e.data["node"], e.data["state"]) for e in events] == [("a", "down"),
                                                                       ("a", "up")]
    finally:
        await engine.dispose()
