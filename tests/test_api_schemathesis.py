"""schemathesis over every operation of a running service with a simulated lab.

`labdaq serve --sim` runs as a separate process (API, engine, simulated lab) on SQLite or
PostgreSQL; schemathesis runs every check (no 5xx, responses match their schema and
content type, only documented status codes, negative data refused, links followed)
against it with a bearer token. The quick form is part of the normal suite; the deep form
(100 examples per operation, every phase, each role's token, on SQLite and PostgreSQL:
six test cases) is marked ``slow`` and ``deep``: `make test-deep` runs it (`make test-slow` leaves
it out).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from labdaq.auth import create_token
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade
from tests.db_fixtures import PG_URL, _pg_admin

CONFIG = Path(__file__).with_name("schemathesis.toml")
ROLES = ("technician", "engineer", "admin")
START_TIMEOUT_S = 180.0  # generous: the machine may be busy; only a hang fails


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tokens(url: str) -> dict[str, str]:
    async def make() -> dict[str, str]:
        engine = create_engine(url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return {role: await create_token(s, f"st-{role}", role) for role in ROLES}
        finally:
            await engine.dispose()

    return asyncio.run(make())


# PostgreSQL runs in make test-slow (CI runs both): the quick form on both took ~6 min.
@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """A running `labdaq serve --sim`: (base URL, token per role)."""
    data_dir = tmp_path_factory.mktemp("st")
    db_args: list[str] = []
    drop = None
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'labdaq.db'}"
    else:
        if not PG_URL:
            pytest.skip("LABDAQ_TEST_PG_URL not set (CI sets it; there this test runs)")
        drop = f"labdaq_test_{uuid.uuid4().hex[:12]}"
        _pg_admin(PG_URL, f'CREATE DATABASE "{drop}"')
        url = make_url(PG_URL).set(database=drop).render_as_string(hide_password=False)
        db_args = ["--database-url", url]
    upgrade(url)
    tokens = _tokens(url)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (data_dir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labdaq.cli", "serve", "--sim", "--speed", "100",
         "--port", str(port), "--data-dir", str(data_dir), *db_args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (data_dir / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service did not answer /health"
            time.sleep(0.2)
        # One run exists from the start, so the run-id operations reach their logic.
        r = httpx.post(
            f"{base}/api/v1/runs",
            json={"channel": "smu1/1", "cell_serial": "SIM-NMC811-001",
                  "template": "basic_cycle", "sample_period_s": 1.0},
            headers={"Authorization": f"Bearer {tokens['technician']}"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        yield base, tokens
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if drop and PG_URL:
            _pg_admin(PG_URL, f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')


def _schemathesis(base: str, token: str, *args: str) -> None:
    # schemathesis keeps a cache of crashes in its working directory: not in the checkout.
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color",
        "run", f"{base}/openapi.json",
        "-H", f"Authorization: Bearer {token}",
        "--checks", "all",
        "--workers", "1",
        "--request-timeout", "60",
        # The two SSE streams (/api/v1/stream, /api/v1/runs/{id}/stream) never end by
        # design: a client reads them until it leaves, and schemathesis reads a body to its
        # end, so each 200 would wait out the request timeout. tests/test_live_stream.py and
        # tests/test_client.py (follow) test them through a real SSE client.
        "--exclude-path-regex", "/stream$",
        *args,
    ]
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]


# Limits only stop a hang: starting the service and the run take ~1 min on a busy machine.
@pytest.mark.timeout(900)
def test_schemathesis_quick(service: tuple[str, dict[str, str]]) -> None:
    base, tokens = service
    _schemathesis(
        base, tokens["technician"],
        "--phases", "examples,fuzzing,stateful",
        "--max-examples", "5",
        "--seed", "0",
    )


@pytest.mark.slow
@pytest.mark.deep  # also alone: `make test-deep`
@pytest.mark.timeout(3600)  # only stops a hang: a run is minutes, more on a loaded machine
@pytest.mark.parametrize("role", ROLES)
def test_schemathesis_deep(service: tuple[str, dict[str, str]], role: str) -> None:
    base, tokens = service
    _schemathesis(
        base, tokens[role],
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "100",
    )
