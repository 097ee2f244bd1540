"""The samples table on PostgreSQL, plain or in hash partitions (labdaq.storage.partitions):
the layout migrates both ways keeping every row, ``(run_id, seq)`` stays unique, the
writer's COPY and replay paths work on it, ``alembic check`` stays clean, and the API's
queries on samples use the primary key (EXPLAIN) and, partitioned, read one partition."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from alembic import command
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.downsample import count_sql
from labdaq.engine.writer import SampleWriter
from labdaq.export import SampleFilter, chunk_sql
from labdaq.storage import partitions
from labdaq.storage.db import alembic_config, create_engine, upgrade
from tests.dataout_fixtures import insert_samples, make_lab
from tests.test_writer import _rows

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


async def _pg(url: str) -> asyncpg.Connection:
    u = make_url(url)
    return await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username,
                                 password=u.password, database=u.database)


async def _layout(url: str) -> tuple[int, dict[str, int]]:
    """(partitions, rows per table holding samples)."""
    conn = await _pg(url)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'samples'::regclass")
        rows = await conn.fetch("SELECT tableoid::regclass::text AS t, count(*) AS n "
                                "FROM samples GROUP BY 1")
        return int(n), {r["t"]: int(r["n"]) for r in rows}
    finally:
        await conn.close()


def _partitioned(url: str, n: int) -> None:
    """The database at 0015, then upgraded with ``n`` partitions asked for."""
    command.downgrade(alembic_config(url), "0015_nodes")
    upgrade(url, samples_partitions=n)


async def test_partitions_keep_rows_and_uniqueness_and_migrate_both_ways(db_url: str) -> None:
    lab = await make_lab(db_url, runs=3)
    runs = lab["run_ids"]
    for rid in runs:
        insert_samples(db_url, rid, 500)
    await asyncio.to_thread(_partitioned, db_url, 4)
    n, per_table = await _layout(db_url)
    assert n == 4 and sum(per_table.values()) == 1500
    assert set(per_table) <= {f"samples_p{i}" for i in range(4)}
    # The model's one samples table, whatever the layout.
    await asyncio.to_thread(command.check, alembic_config(db_url))

    # The writer: new rows by COPY straight into the partitioned table, a replay that
    # meets stored rows through the staging merge; nothing duplicated.
    engine = create_engine(db_url)
    try:
        writer = SampleWriter(engine, batch_rows=300, batch_age_s=0.05)
        await writer.put([r for rid in runs for r in _rows(rid, 501, 300)])
        await writer.flush()
        assert writer.batches_merged == 0
        await writer.put([r for rid in runs for r in _rows(rid, 700, 200)])  # overlaps
        await writer.close()
        assert writer.batches_merged > 0
        async with engine.connect() as conn:
            with pytest.raises(Exception, match="samples_p[0-9]+_pkey|duplicate key"):
                await conn.execute(text(
                    "INSERT INTO samples SELECT * FROM samples WHERE run_id = :r AND seq = 1"),
                    {"r": runs[0]})
    finally:
        await engine.dispose()
    conn = await _pg(db_url)
    try:
        counts = await conn.fetch("SELECT run_id, count(*) AS n, count(DISTINCT seq) AS d, "
                                  "max(seq) AS top FROM samples GROUP BY run_id")
    finally:
        await conn.close()
    assert sorted((r["n"], r["d"], r["top"]) for r in counts) == [(899, 899, 899)] * 3

    # Changed later (labdaq db partition-samples), and back to one table by the downgrade.
    engine = create_engine(db_url)
    try:
        async with engine.begin() as c:
            assert await c.run_sync(partitions.apply_layout, 2)
        assert (await _layout(db_url))[0] == 2
    finally:
        await engine.dispose()
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "0015_nodes")
    n, per_table = await _layout(db_url)
    assert n == 0 and per_table == {"samples": 2697}
    await asyncio.to_thread(upgrade, db_url)
    await asyncio.to_thread(command.check, alembic_config(db_url))


# -- EXPLAIN: the API's queries on samples ------------------------------------------------
RUNS, PER_RUN = 8, 20_000


@pytest.fixture(params=[0, 4], ids=["plain", "partitioned"])
def loaded(request: pytest.FixtureRequest, db_url: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """RUNS runs of PER_RUN samples each, ANALYZEd, in the layout of the param."""
    if request.param:
        _partitioned(db_url, request.param)
    lab = asyncio.run(make_lab(db_url, runs=RUNS))
    for k, rid in enumerate(lab["run_ids"]):
        insert_samples(db_url, rid, PER_RUN, seed=k)

    async def analyze() -> None:
        conn = await _pg(db_url)
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    asyncio.run(analyze())
    yield db_url, lab | {"partitions": request.param}


def _scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) of every scan in a JSON plan."""
    out: list[tuple[str, str]] = []
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            out.append((plan["Node Type"], plan["Relation Name"]))
        for v in plan.values():
            out += _scans(v)
    elif isinstance(plan, list):
        for v in plan:
            out += _scans(v)
    return out


async def _explain(url: str, sql: str, params: tuple[Any, ...]) -> list[tuple[str, str]]:
    conn = await _pg(url)
    try:
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *params)
    finally:
        await conn.close()
    return _scans(json.loads(plan) if isinstance(plan, str) else plan)


async def test_the_apis_sample_queries_use_the_key_and_one_partition(
        loaded: tuple[str, dict[str, Any]]) -> None:
    url, lab = loaded
    run_id = lab["run_ids"][3]
    headers = {"Authorization": f"Bearer {lab['tokens']['engineer']}"}
    sent: list[tuple[str, tuple[Any, ...]]] = []

    def capture(_conn: Any, _cur: Any, statement: str, params: Any, _ctx: Any,
                _many: bool) -> None:
        if "samples" in statement and statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, tuple(params or ())))

    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        event.listen(app.state.engine.sync_engine, "before_cursor_execute", capture)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for path in (f"/api/v1/runs/{run_id}/samples?limit=1000",
                         f"/api/v1/runs/{run_id}/samples?after_seq=15000&limit=1000",
                         f"/api/v1/runs/{run_id}/samples?t_from=100&t_to=200",
                         f"/api/v1/runs/{run_id}/samples?cycle=2&limit=1000",
                         f"/api/v1/runs/{run_id}/samples?points=500",
                         f"/api/v1/runs/{run_id}", "/api/v1/lab"):
                r = await c.get(path, headers=headers)
                assert r.status_code == 200, (path, r.text)
    # The reads the API does through ADBC (exports, downsampling), with its parameters.
    where = SampleFilter()
    sent.append((chunk_sql("numeric_dollar", where), (run_id, 0, PER_RUN, 7000)))
    sent.append((count_sql("numeric_dollar", where), (run_id, PER_RUN)))
    assert len(sent) >= 6, sent

    parts = {f"samples_p{i}" for i in range(lab["partitions"])} or {"samples"}
    for sql, params in sent:
        sql = _dollar(sql)
        scans = [(kind, rel) for kind, rel in await _explain(url, sql, params)
                 if rel in parts]
        assert scans, (sql, "no scan of samples")
        # The primary key (run_id, seq), never the whole table; one partition.
        assert all("Index" in kind or kind == "Bitmap Heap Scan" for kind, _ in scans), \
            (sql, scans)
        assert len({rel for _, rel in scans}) == 1, (sql, scans)


def _dollar(sql: str) -> str:
    """SQLAlchemy's asyncpg statements as asyncpg takes them ($n placeholders)."""
    if "%s" not in sql:
        return sql
    parts = sql.split("%s")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "")
                   for i, p in enumerate(parts))
