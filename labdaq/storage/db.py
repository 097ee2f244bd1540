"""Database engines and sessions: URL handling, SQLite pragmas, session scopes, migrations."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)
# A database that neither answers nor refuses does not hold a service's start-up longer.
WARM_POOL_TIMEOUT_S = 10.0


def async_url(url: str | URL) -> URL:
    """Map a plain URL to its asyncio driver (sqlite → aiosqlite, postgresql → asyncpg)."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite" and u.drivername != "sqlite+aiosqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql" and u.drivername != "postgresql+asyncpg":
        u = u.set(drivername="postgresql+asyncpg")
    return u


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the engine writes; NORMAL is durable across process
    # crashes (only an OS crash can lose the last commits); foreign keys are off by
    # default in SQLite and must be turned on per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    # 32 MiB page cache (default 2 MiB): the samples primary key of hundreds of runs
    # growing at once does not fit the default, and inserts then re-read pages.
    cur.execute("PRAGMA cache_size=-32768")
    # Checkpoint every ~40 MiB of WAL instead of 4 MiB: with hundreds of runs interleaved a
    # samples commit dirties hundreds of pages, so the default checkpointed (copy + fsync)
    # after nearly every commit; a page rewritten by several commits is now copied once.
    cur.execute("PRAGMA wal_autocheckpoint=10000")
    cur.close()


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    u = async_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    # pre_ping: after a PostgreSQL restart the pool would otherwise hand out dead
    # connections once each before recovering. Not for a SQLite file, which has no server
    # to lose: there it was one more round trip to aiosqlite's thread per checkout.
    kwargs.setdefault("pool_pre_ping", u.get_backend_name() != "sqlite")
    engine = create_async_engine(u, **kwargs)
    if u.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


async def warm_pool(engine: AsyncEngine) -> int:
    """Open the pool's kept connections now (each one a query, so a SQLite connection has
    read its schema); returns how many. A service does this before its first request:
    opening one (aiosqlite's thread, the file, its pragmas; a PostgreSQL login) while a
    burst of requests waits for it adds that time to each of them. A database that does
    not answer is logged, not raised: the service still starts (and reports it, /ready)."""
    size = int(getattr(engine.pool, "size", lambda: 0)())
    conns = []
    try:
        async with asyncio.timeout(WARM_POOL_TIMEOUT_S):
            for _ in range(size):
                conn = await engine.connect()
                conns.append(conn)
                await conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - a service starts, and says 503, without it
        log.warning("database not available at start-up (%s: %s); connections are opened "
                    "as requests need them", type(exc).__name__, exc)
    finally:
        for conn in conns:
            await conn.close()
    return len(conns)


def sessionmaker(
    engine: AsyncEngine, audit_head_file: Path | None = None, origin: str = "cli"
) -> async_sessionmaker[AsyncSession]:
    """Sessions whose audit events are chained (labdaq.audit); with ``audit_head_file``
    each commit that appended to the chain also advances that anchor file. ``origin``
    "api": changes without an authenticated principal are not attributed to the CLI."""
    from labdaq import audit  # registers the audit chain's flush hooks

    info: dict[str, Any] = {audit.ORIGIN_KEY: origin}
    if audit_head_file is not None:
        info[audit.HEAD_FILE_KEY] = str(audit_head_file)
    return async_sessionmaker(engine, expire_on_commit=False, info=info)


@asynccontextmanager
async def session_scope(
    maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on error."""
    async with maker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


@asynccontextmanager
async def snapshot_scope(
    maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A unit of work whose reads all see one snapshot of the database. In SQLite's
    default mode and PostgreSQL's READ COMMITTED each SELECT sees what is committed when it
    runs, so reading steps, then cycles, could show a cycle committed with a step the
    first read missed: an explicit BEGIN on SQLite (its snapshot is taken at the first
    read) and REPEATABLE READ on PostgreSQL."""
    async with session_scope(maker) as session:
        if session.get_bind().dialect.name == "sqlite":
            # The driver begins a transaction only before a write; a read-only unit of
            # work would otherwise run each SELECT in its own.
            await (await session.connection()).exec_driver_sql("BEGIN")
        else:
            await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


def alembic_config(url: str | URL) -> Any:
    from alembic.config import Config

    pkg = resources.files("labdaq.storage")
    cfg = Config(str(pkg / "alembic.ini"))
    cfg.set_main_option("script_location", str(pkg / "migrations"))
    # Alembic's env.py reads this; keep the password out of logs by rendering it once here.
    cfg.set_main_option(
        "sqlalchemy.url", async_url(url).render_as_string(hide_password=False).replace("%", "%%")
    )
    return cfg


def upgrade(url: str | URL, revision: str = "head", samples_partitions: int | None = None
            ) -> None:
    """Apply migrations (blocking; runs its own event loop inside Alembic's env.py).
    ``samples_partitions``: the samples layout a migration that sets it up gives
    PostgreSQL (labdaq.storage.partitions; None: ``LABDAQ_SAMPLES_PARTITIONS``, else 0)."""
    from alembic import command

    from labdaq.storage import partitions

    cfg = alembic_config(url)
    if samples_partitions is not None:
        cfg.attributes[partitions.ATTRIBUTE] = samples_partitions
    command.upgrade(cfg, revision)
