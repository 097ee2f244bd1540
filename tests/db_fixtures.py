"""Database fixtures: a migrated SQLite file per test, and PostgreSQL when configured.

With LABDAQ_TEST_PG_URL set (CI sets it), the PostgreSQL variants must run: a missing or
unreachable server is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.storage.db import create_engine, upgrade

PG_URL = os.environ.get("LABDAQ_TEST_PG_URL")


def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        u = make_url(url)
        conn = await asyncpg.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            database=u.database,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A freshly migrated database URL: SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'labdaq.db'}"
        upgrade(url)
        yield url
        return
    if not PG_URL:
        pytest.skip("LABDAQ_TEST_PG_URL not set (CI sets it; there this test runs)")
    name = f"labdaq_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(PG_URL, f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        _pg_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'labdaq.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()
