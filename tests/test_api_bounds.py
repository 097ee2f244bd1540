"""Bounded input through HTTP: every absurd request gets 4xx naming the field, as problem+json.

The requests are the ones the hardening issue found reaching the database (500) or being
accepted (201). Both database backends run them (PostgreSQL when LABDAQ_TEST_PG_URL is set).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from labdaq import runs as run_service
from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.protocol import ProtocolError, parse_protocol
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade
from tests.db_fixtures import PG_URL, _pg_admin
from tests.test_api import CELL, PROTOCOL, auth

BIG = 9223372036854775808  # 2**63: beyond SQLite's int64 and PostgreSQL's int8
INT4 = 2147483648  # 2**31: beyond PostgreSQL's int4 (the id columns)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """One migrated, seeded database per backend for the whole module: refused requests
    write nothing, so the cases can share it (and PostgreSQL is set up once, not 40 times)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bounds') / 'labdaq.db'}"
        drop = None
    else:
        if not PG_URL:
            pytest.skip("LABDAQ_TEST_PG_URL not set (CI sets it; there this test runs)")
        name = f"labdaq_test_{uuid.uuid4().hex[:12]}"
        _pg_admin(PG_URL, f'CREATE DATABASE "{name}"')
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        drop = name
    try:
        upgrade(url)

        async def seed() -> dict[str, str]:
            engine = create_engine(url)
            async with session_scope(sessionmaker(engine)) as s:
                await upsert_instrument(
                    s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
                    [{"index": 1, "name": "smu1/1", "max_current_a": 7.35,
                      "max_voltage_v": 105.0}],
                )
                tokens = {
                    role: await create_token(s, f"t-{role}", role)
                    for role in ("technician", "engineer", "admin")
                }
            await engine.dispose()
            return tokens

        yield url, asyncio.run(seed())
    finally:
        if drop and PG_URL:
            _pg_admin(PG_URL, f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')


@pytest.fixture
async def client(
    seeded: tuple[str, dict[str, str]],
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    url, tokens = seeded
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, tokens


async def _run_count(c: httpx.AsyncClient, token: str) -> int:
    r = await c.get("/api/v1/runs", params={"limit": 1000}, headers=auth(token))
    assert r.status_code == 200
    return len(r.json())


def _nested_loops(depth: int) -> dict[str, Any]:
    step: dict[str, Any] = {"step": "rest", "until": {"duration_s": 1}}
    for _ in range(depth):
        step = {"step": "loop", "count": 2, "body": [step]}
    return {"schema_version": 1, "name": "deep", "steps": [step]}


def _alias_bomb() -> str:
    """367 bytes of YAML whose anchors expand to 10^5 steps (the issue's was 1.7 KB)."""
    lines = ["x0: &a0 {step: rest, until: {duration_s: 1}}"]
    for level in range(1, 5):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"x{level}: &a{level} [{refs}]")
    lines += ["schema_version: 1", "name: bomb", "steps: [" + ", ".join(["*a4"] * 10) + "]"]
    return "\n".join(lines)


def _doc(**step: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": "d", "steps": [step]}


def _run(**change: Any) -> dict[str, Any]:
    return {"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL, **change}


# (id, method, path, JSON text of the body or None, the field the problem must name)
CASES: list[tuple[str, str, str, str | None, str]] = [
    ("run id int64+1", "GET", f"/api/v1/runs/{BIG}", None, "run_id"),
    ("run id int4+1", "GET", f"/api/v1/runs/{INT4}", None, "run_id"),
    ("pause id int64+1", "POST", f"/api/v1/runs/{BIG}/pause", None, "run_id"),
    ("after_seq int64+1", "GET", f"/api/v1/runs/1/samples?after_seq={BIG}", None, "after_seq"),
    ("offset int64+1", "GET", f"/api/v1/runs?offset={BIG}", None, "offset"),
    ("offset int4+1", "GET", f"/api/v1/runs?offset={INT4}", None, "offset"),
    ("state with NUL", "GET", "/api/v1/runs?state=run%00ning", None, "state"),
    # Found by schemathesis's stateful phase on PostgreSQL (a DataError, 422 without the
    # field, for a request the schema allowed): the pattern is in the OpenAPI now.
    ("NUL in ?serial", "GET", "/api/v1/cells?serial=%00%21", None, "serial"),
    ("NUL in ?chemistry", "GET", "/api/v1/cells?chemistry=NMC%00", None, "chemistry"),
    ("NUL in a template name", "GET", "/api/v1/protocols/templates/cc%00cv", None, "name"),
    ("channel int64+1", "POST", "/api/v1/runs", json.dumps(_run(channel=BIG)), "channel"),
    ("cell_id int64+1", "POST", "/api/v1/runs",
     json.dumps(_run(cell=None, cell_id=BIG)), "cell_id"),
    ("NUL in cell_serial", "POST", "/api/v1/runs",
     json.dumps(_run(cell=None, cell_serial="T-\u0000")), "cell_serial"),
    ("NUL in cell.serial", "POST", "/api/v1/runs",
     json.dumps(_run(cell={**CELL, "serial": "T\u00001"})), "cell.serial"),
    ("Infinity rest_s", "POST", "/api/v1/runs",
     json.dumps(_run()).replace('"charge_current_a"', '"rest_s": Infinity, "charge_current_a"'),
     "protocol.rest_s"),
    ("Infinity max_step_s", "POST", "/api/v1/runs",
     json.dumps(_run()).replace('"charge_current_a"', '"max_step_s": Infinity, "charge_current_a"'),
     "protocol.max_step_s"),
    ("Infinity charge_cutoff_v", "POST", "/api/v1/runs",
     json.dumps(_run()).replace('"charge_cutoff_v": 4.2', '"charge_cutoff_v": Infinity'),
     "cell.charge_cutoff_v"),
    ("NaN capacity", "POST", "/api/v1/runs",
     json.dumps(_run()).replace('"capacity_ah": 4.9', '"capacity_ah": NaN'), "cell.capacity_ah"),
    ("sample period 1e-9", "POST", "/api/v1/runs", json.dumps(_run(sample_period_s=1e-9)),
     "sample_period_s"),
    ("sample period true", "POST", "/api/v1/runs", json.dumps(_run(sample_period_s=True)),
     "sample_period_s"),
    ("max_step_s 1e-9", "POST", "/api/v1/runs",
     json.dumps(_run(protocol={**PROTOCOL, "max_step_s": 1e-9})), "protocol.max_step_s"),
    ("rest_s 1e308", "POST", "/api/v1/runs",
     json.dumps(_run(protocol={**PROTOCOL, "rest_s": 1e308})), "protocol.rest_s"),
    ("duration_s 1e308", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_doc(
         step="rest", until={"duration_s": 1e308}))),
     "protocol_document.steps[0].until.duration_s"),
    ("no upper voltage limit", "POST", "/api/v1/runs",
     json.dumps(_run(cell={k: v for k, v in CELL.items() if k != "charge_cutoff_v"})),
     "cell.charge_cutoff_v"),
    ("upper voltage limit 1e308", "POST", "/api/v1/runs",
     json.dumps(_run(cell={**CELL, "charge_cutoff_v": 1e308})), "cell.charge_cutoff_v"),
    ("cycles 1e9", "POST", "/api/v1/runs",
     json.dumps(_run(protocol={**PROTOCOL, "cycles": 10**9})), "protocol.cycles"),
    ("loop count 1e9", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document={
         "schema_version": 1, "name": "n", "steps": [{"step": "loop", "count": 10**9, "body": [
             {"step": "rest", "until": {"duration_s": 1}}]}]})),
     "protocol_document.steps[0].count"),
    ("loop count 1e30", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document={
         "schema_version": 1, "name": "n", "steps": [{"step": "loop", "count": 10**30, "body": [
             {"step": "rest", "until": {"duration_s": 1}}]}]})),
     "protocol_document.steps[0].count"),
    ("100 nested loops", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_nested_loops(100))),
     "protocol_document.steps[0]" + ".body[0]" * 8),
    ("YAML alias bomb", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_alias_bomb())), "protocol_document"),
    ("boolean current", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_doc(
         step="cc", current_a=True, until={"duration_s": 10}))),
     "protocol_document.steps[0].current_a"),
    ("temperature 1e6", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_doc(
         step="set_temperature", temperature_c=1e6))),
     "protocol_document.steps[0].temperature_c"),
    ("voltage Infinity in document", "POST", "/api/v1/runs",
     json.dumps(_run(protocol=None, protocol_document=_doc(
         step="cc", current_a=1.0, until={"voltage_v": 1e308}))),
     "protocol_document.steps[0].until.voltage_v"),
]


def _assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert set(body) >= {"type", "title", "status", "detail", "instance", "errors"}
    assert body["status"] == status
    assert body["instance"] == r.request.url.path
    return body


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_absurd_input_is_422_naming_the_field(
    client, method: str, path: str, body: str | None, field: str
) -> None:
    c, tokens = client
    before = await _run_count(c, tokens["engineer"])
    r = await c.request(
        method,
        path,
        content=body,
        headers={**auth(tokens["technician"]), "Content-Type": "application/json"},
    )
    problem = _assert_problem(r, 422)
    locs = [e["loc"] for e in problem["errors"]]
    assert field in locs, locs
    # Nothing of the refused request reached the database.
    assert await _run_count(c, tokens["engineer"]) == before


async def test_alias_bomb_is_refused_at_the_first_alias() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_protocol(_alias_bomb())
    assert "aliases" in str(err.value)
    # A merge key is an alias too.
    with pytest.raises(ProtocolError, match="aliases"):
        parse_protocol("base: &b {duration_s: 1}\nx: {<<: *b}\n")


async def test_huge_body_is_413_before_it_is_read_while_health_answers(client) -> None:
    """A 14 MB chunked body: refused once the limit is passed, the rest never read; /health
    answers while the upload is in progress (the upload waits for it)."""
    c, tokens = client
    chunk = b" " * (1024 * 1024)
    total_chunks = 14
    sent = 0
    health_answered = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        sent += 1
        yield b'{"channel": "smu1/1",' + chunk
        await asyncio.wait_for(health_answered.wait(), timeout=60)
        for _ in range(total_chunks - 1):
            sent += 1
            yield chunk

    async def health() -> None:
        r = await c.get("/health")
        assert r.status_code == 200
        health_answered.set()

    upload = asyncio.create_task(
        c.post("/api/v1/runs", content=body(), headers=auth(tokens["technician"]))
    )
    await health()
    r = await upload
    problem = _assert_problem(r, 413)
    assert "larger than" in problem["detail"]
    assert sent < total_chunks  # refused at the limit, not after reading 14 MB


async def test_declared_length_over_the_limit_is_413_without_reading(client) -> None:
    c, tokens = client
    r = await c.post(
        "/api/v1/runs",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers=auth(tokens["technician"]),
    )
    _assert_problem(r, 413)


async def test_validation_runs_off_the_event_loop(client, monkeypatch) -> None:
    """While a run request is being validated, /health answers: the validation waits for
    /health to have answered, which could never happen if it held the event loop."""
    c, tokens = client
    health_answered = threading.Event()
    waited: list[bool] = []
    original = run_service.resolve_request

    def slow_resolve(*args: Any, **kwargs: Any) -> Any:
        waited.append(health_answered.wait(timeout=60))
        return original(*args, **kwargs)

    monkeypatch.setattr(run_service, "resolve_request", slow_resolve)
    create = asyncio.create_task(
        c.post("/api/v1/runs", json=_run(), headers=auth(tokens["technician"]))
    )
    r = await c.get("/health")
    assert r.status_code == 200
    health_answered.set()
    created = await create
    assert created.status_code == 201, created.text
    assert waited == [True]
    stopped = await c.post(
        f"/api/v1/runs/{created.json()['id']}/stop", headers=auth(tokens["technician"])
    )
    assert stopped.status_code == 200  # frees the channel for the other tests


@pytest.mark.parametrize(
    ("method", "path", "status", "headers"),
    [
        ("GET", "/api/v1/runs", 401, {}),
        ("GET", "/api/v1/runs", 401, {"Authorization": "Bearer ldq_nope"}),
        ("POST", "/api/v1/runs/1/pause", 403, "engineer"),
        ("GET", "/api/v1/runs/12345", 404, "engineer"),
        ("GET", "/api/v1/nope", 404, "engineer"),
        ("DELETE", "/api/v1/runs", 405, "engineer"),
        ("POST", "/api/v1/runs", 400, "technician"),
    ],
)
async def test_every_error_is_problem_json(
    client, method: str, path: str, status: int, headers: Any
) -> None:
    c, tokens = client
    h = auth(tokens[headers]) if isinstance(headers, str) else headers
    content = b"[" * 100_000 if status == 400 else None
    r = await c.request(method, path, headers={**h, "Content-Type": "application/json"},
                        content=content)
    _assert_problem(r, status)


async def test_openapi_declares_problem_json_and_the_one_of_rules(client) -> None:
    c, _ = client
    spec = (await c.get("/openapi.json")).json()
    pause = spec["paths"]["/api/v1/runs/{run_id}/pause"]["post"]["responses"]
    assert {"401", "403", "404", "409", "413", "422", "503"} <= set(pause)
    for code in ("404", "422", "503"):
        assert list(pause[code]["content"]) == ["application/problem+json"]
    assert "Retry-After" in pause["503"]["headers"]
    run_id = spec["paths"]["/api/v1/runs/{run_id}"]["get"]["parameters"][0]["schema"]
    assert run_id["maximum"] == 2**31 - 1
    create = spec["components"]["schemas"]["RunCreate"]
    one_ofs = [x["oneOf"] for x in create["allOf"]]
    assert [[b["required"][0] for b in o] for o in one_ofs] == [
        ["cell_id", "cell_serial", "cell"],
        ["protocol", "protocol_document", "template"],
    ]
    period = create["properties"]["sample_period_s"]
    assert period["minimum"] == 0.001 and period["maximum"] == 3600


@pytest.fixture
async def strict_lab(
    seeded: tuple[str, dict[str, str]],
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The same database behind an app whose lab allows at most 1 h per duration and
    samples no faster than every 0.5 s."""
    url, tokens = seeded
    app = create_app(Settings(database_url=url, max_duration_s=3600, min_sample_period_s=0.5))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, tokens


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sample_period_s": 0.1}, "sample_period_s"),
        ({"protocol": {**PROTOCOL, "max_step_s": 7200}}, "protocol.max_step_s"),
        ({"protocol": None, "template": "capacity_check_c3"},
         "template.steps[1].until.duration_s"),
    ],
)
async def test_configured_bounds_name_the_field(
    strict_lab, change: dict[str, Any], field: str
) -> None:
    c, tokens = strict_lab
    r = await c.post("/api/v1/runs", json=_run(**change), headers=auth(tokens["technician"]))
    problem = _assert_problem(r, 422)
    assert field in [e["loc"] for e in problem["errors"]], problem


async def test_driver_fastest_period_is_a_floor(client, monkeypatch) -> None:
    c, tokens = client
    monkeypatch.setattr(
        run_service, "driver_min_sample_period_s",
        lambda driver: 0.25 if driver == "keithley2450" else None,
    )
    r = await c.post("/api/v1/runs", json=_run(sample_period_s=0.1),
                     headers=auth(tokens["technician"]))
    problem = _assert_problem(r, 422)
    assert [e["loc"] for e in problem["errors"]] == ["sample_period_s"]
    assert "keithley2450" in problem["detail"]


async def test_a_bug_is_500_problem_json(seeded, monkeypatch) -> None:
    url, tokens = seeded

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(run_service, "list_runs", broken)
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        # As a server would: the error is answered, not raised into the client.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/api/v1/runs", headers=auth(tokens["engineer"]))
    problem = _assert_problem(r, 500)
    assert "a bug" not in problem["detail"]  # internals stay in the log


INSTRUMENT = {"name": "smu9", "driver": "keithley2450", "resource": "TCPIP::127.0.0.1::1::SOCKET"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        # Found by schemathesis on PostgreSQL: an index beyond int4 gave 503 (was 500).
        ({**INSTRUMENT, "channels": [{"index": 2134045704097}]}, "channels[0].index"),
        ({**INSTRUMENT, "channels": [{"index": 1, "name": "a\u0000b"}]}, "channels[0].name"),
        ({**INSTRUMENT, "channels": [{"index": 1, "max_voltage_v": 1e308}]},
         "channels[0].max_voltage_v"),
        ({**INSTRUMENT, "driver": "keithley2450\u0000"}, "driver"),
    ],
    ids=["index int4+1", "NUL in channel name", "max_voltage_v 1e308", "NUL in driver"],
)
async def test_instrument_config_is_bounded(client, body: dict[str, Any], field: str) -> None:
    c, tokens = client
    r = await c.put("/api/v1/instruments", json=body, headers=auth(tokens["admin"]))
    problem = _assert_problem(r, 422)
    assert field in [e["loc"] for e in problem["errors"]], problem


async def test_a_value_the_database_refuses_is_422_not_5xx(seeded, monkeypatch) -> None:
    """The backstop behind the schema: should a value out of a column's range ever get past
    validation, the database's refusal is the client's error (422), not 500 or 503."""
    url, tokens = seeded

    async def unbounded(session: Any, *args: Any) -> Any:
        from sqlalchemy import select

        from labdaq.storage import models as m

        return (await session.scalars(select(m.Run).where(m.Run.id == 2**70))).all()

    monkeypatch.setattr(run_service, "list_runs", unbounded)
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/api/v1/runs", headers=auth(tokens["engineer"]))
    _assert_problem(r, 422)
