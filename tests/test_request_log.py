"""Request ids and JSON logs: X-Request-ID in and out, one JSON record per request
carrying it, in-process and from the `labdaq api` process itself."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from labdaq.api.app import create_app
from labdaq.api.request_log import REQUEST_LOGGER, JsonFormatter
from labdaq.config import Settings
from tests.dataout_fixtures import api_server, make_lab


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(REQUEST_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
async def lab(sqlite_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict]]:
    info = await make_lab(sqlite_url)
    app = create_app(Settings(database_url=sqlite_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, info


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_request_id_in_and_out_and_in_the_log(lab, json_log: io.StringIO) -> None:
    client, info = lab
    auth = {"Authorization": f"Bearer {info['tokens']['engineer']}"}
    r = await client.get("/health", headers={"X-Request-ID": "notebook-42"})
    assert r.status_code == 200
    assert r.headers["X-Request-ID"] == "notebook-42"
    # No id sent, or an unusable one (too long, control characters): the API makes one.
    r2 = await client.get("/api/v1/runs/999999", headers=auth)
    assert r2.status_code == 404
    made = r2.headers["X-Request-ID"]
    assert len(made) == 32 and int(made, 16) >= 0
    r3 = await client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert r3.headers["X-Request-ID"] not in ("x" * 500, made)
    # Each id unique per request.
    r4 = await client.get("/health")
    assert r4.headers["X-Request-ID"] not in (made, r3.headers["X-Request-ID"])

    recs = {rec["request_id"]: rec for rec in _records(json_log)}
    assert recs["notebook-42"]["route"] == "/health"
    assert recs["notebook-42"]["status"] == 200
    assert recs["notebook-42"]["method"] == "GET"
    assert recs["notebook-42"]["logger"] == REQUEST_LOGGER
    # The route template, not the raw path, and the problem's status.
    assert recs[made]["route"] == "/api/v1/runs/{run_id}"
    assert recs[made]["path"] == "/api/v1/runs/999999"
    assert recs[made]["status"] == 404
    assert recs[made]["duration_ms"] >= 0
    # The token never reaches the log.
    assert info["tokens"]["engineer"] not in json_log.getvalue()


def test_json_formatter_carries_the_request_id_of_the_context() -> None:
    from labdaq.api.request_log import request_id

    rec = logging.LogRecord("labdaq.x", logging.ERROR, __file__, 1, "boom %s", ("now",), None)
    token = request_id.set("abc")
    try:
        out = json.loads(JsonFormatter().format(rec))
    finally:
        request_id.reset(token)
    assert out["request_id"] == "abc" and out["message"] == "boom now"
    assert out["level"] == "ERROR" and out["ts"].endswith("+00:00")
    assert "request_id" not in json.loads(JsonFormatter().format(rec))


@pytest.mark.slow  # starts `labdaq api` in its own process
def test_labdaq_api_process_logs_json_lines_with_request_ids(sqlite_url: str) -> None:
    info = asyncio.run(make_lab(sqlite_url))
    run_id = info["run_ids"][0]
    auth = {
        "Authorization": f"Bearer {info['tokens']['engineer']}",
        "X-Request-ID": "from-the-client-1",
    }
    log_path = Path(f"{make_url(sqlite_url).database}-api.log")
    with api_server(sqlite_url) as (base, _proc):
        r = httpx.get(f"{base}/api/v1/runs/{run_id}", headers=auth, timeout=30)
        assert r.status_code == 200
        assert r.headers["X-Request-ID"] == "from-the-client-1"
        # The record is written (and flushed) before the response starts.
        lines = [ln for ln in log_path.read_text().splitlines() if "from-the-client-1" in ln]
    assert lines
    rec = json.loads(lines[0])
    assert rec["route"] == "/api/v1/runs/{run_id}" and rec["status"] == 200
    # Every line the process wrote is JSON (uvicorn's start-up lines too).
    for line in log_path.read_text().splitlines():
        if line.strip():
            json.loads(line)
