"""Per-run alert subscriptions (labdaq.run_alerts, /api/v1/runs/{id}/subscriptions): an
e-mail address and a webhook subscribed to a run through the API (role-checked, audited)
are told when that run stops for safety — the local SMTP sink and HTTP receiver of
tests/test_alerts.py receive the alert naming the run and the limit — while an
unsubscribed webhook, and a subscriber of another run or of other kinds, are not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from labdaq.alerts import Notifier
from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dataout_fixtures import make_lab
from tests.test_alerts import _Receiver, _safety_stop, _Sink, receiver, smtp_sink  # noqa: F401

Api = tuple[httpx.AsyncClient, dict[str, Any], str]


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    lab = await make_lab(db_url, runs=2)
    # The test drives the notifier itself (Notifier.run_once), so none runs in the app.
    app = create_app(Settings(database_url=db_url, run_alerts=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            yield c, lab, db_url


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_subscribers_of_a_run_are_told_of_its_safety_stop(
    api: Api, smtp_sink: tuple[int, _Sink], receiver: _Receiver,  # noqa: F811
) -> None:
    c, lab, url = api
    port, sink = smtp_sink
    hook = f"http://127.0.0.1:{receiver.server_address[1]}"
    run_a, run_b = lab["run_ids"]
    eng, tech = _h(lab["tokens"]["engineer"]), _h(lab["tokens"]["technician"])
    subs = f"/api/v1/runs/{run_a}/subscriptions"

    r = await c.post(subs, json={"email": "cell-owner@lab.example", "kinds": ["aborted_safety"]},
                     headers=eng)
    assert r.status_code == 201, r.text
    assert r.json()["email"] == "cell-owner@lab.example" and r.json()["created_by"] == "t-engineer"
    assert (await c.post(subs, json={"webhook": f"{hook}/a"}, headers=tech)).status_code == 201
    gone = (await c.post(subs, json={"webhook": f"{hook}/gone"}, headers=tech)).json()
    assert (await c.post(f"/api/v1/runs/{run_b}/subscriptions",
                         json={"webhook": f"{hook}/b", "kinds": ["completed"]},
                         headers=tech)).status_code == 201
    # Refusals: the same target twice, no token, no such run, two targets or none.
    assert (await c.post(subs, json={"webhook": f"{hook}/a"}, headers=eng)).status_code == 409
    assert (await c.post(subs, json={"webhook": f"{hook}/x"})).status_code == 401
    assert (await c.post("/api/v1/runs/9999/subscriptions", json={"webhook": f"{hook}/x"},
                         headers=eng)).status_code == 404
    both = {"webhook": f"{hook}/x", "email": "x@lab.example"}
    assert (await c.post(subs, json=both, headers=eng)).status_code == 422
    assert (await c.post(subs, json={"kinds": ["completed"]}, headers=eng)).status_code == 422
    r = await c.delete(f"{subs}/{gone['id']}", headers=eng)
    assert r.status_code == 200 and r.json()["webhook"] == f"{hook}/gone"
    assert (await c.delete(f"{subs}/{gone['id']}", headers=eng)).status_code == 404
    listed = (await c.get(subs, headers=eng)).json()
    assert [s["email"] or s["webhook"] for s in listed] == [
        "cell-owner@lab.example", f"{hook}/a"]

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            audit = (await s.scalars(select(m.AuditRecord).where(
                m.AuditRecord.run_id == run_a).order_by(m.AuditRecord.seq))).all()
        assert [(a.actor, a.action.split(" ", 2)[2]) for a in audit] == [
            ("t-engineer", f"subscribed to run {run_a} (aborted_safety)"),
            ("t-technician", f"subscribed to run {run_a} ({', '.join(_ALL)})"),
            ("t-technician", f"subscribed to run {run_a} ({', '.join(_ALL)})"),
            ("t-engineer", f"unsubscribed from run {run_a}"),
        ]
        assert audit[-1].before is not None and audit[-1].after is None

        settings = Settings(database_url=url, public_url="https://lab.example",
                            smtp_host="127.0.0.1", smtp_port=port, alerts_backoff_s=0)
        maker = sessionmaker(engine)
        assert await Notifier(maker, settings).run_once() == 0  # follows from now
        await _safety_stop(url, run_a)
        await _safety_stop(url, run_b)
        assert await Notifier(maker, settings).run_once() == 2
    finally:
        await engine.dispose()

    assert len(sink.messages) == 1
    mail = sink.messages[0]
    assert mail["To"] == "cell-owner@lab.example"
    assert f"run {run_a}" in mail["Subject"] and "max_voltage_v" in mail["Subject"]
    assert set(receiver.posts) == {"/a"}
    (post,) = receiver.posts["/a"]
    assert post["run_id"] == run_a and post["kind"] == "aborted_safety"
    assert post["limit"]["limit"] == "max_voltage_v" and post["limit"]["bound"] == 4.3


_ALL = ("completed", "paused_fault", "aborted_safety", "node_down", "node_up")


def test_addresses_with_c1_controls_are_refused_the_same_way_the_schema_says() -> None:
    # schemathesis's deep run sent "]\u0085…@S": schema-valid by the OpenAPI (ECMA-262's
    # \s does not match U+0085) but refused by pydantic (whose \s does). The pattern now
    # names the C1 controls and U+FEFF, so both read it alike.
    import re

    import pydantic

    from labdaq.api.schemas_alerts import SubscribeEmail

    pattern = SubscribeEmail.model_json_schema()["properties"]["email"]["pattern"]
    for bad in ("]\u0085x@S", "a\ufeff@c", "a\x9f@c"):
        with pytest.raises(pydantic.ValidationError):
            SubscribeEmail(email=bad)
        assert not re.match(pattern.replace("\\s", " \\t\\n\\r\\f\\v"), bad)
    assert SubscribeEmail(email="ingé@lab.example").email == "ingé@lab.example"
