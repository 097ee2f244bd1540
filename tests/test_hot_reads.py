"""The API's frequently polled reads and what makes them cheap: cycles and downsampled
samples on worker threads' kept connections (labdaq.read_pool), the downsample cache by
run and last seq, and the verified-token cache (labdaq.token_cache) — each checked for
the answer it must still give: new samples and revocations are seen."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from labdaq import auth as auth_service
from labdaq import token_cache
from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dataout_fixtures import insert_samples, make_lab

Lab = tuple[httpx.AsyncClient, dict[str, Any], str]


async def _client(url: str, cache_s: float) -> AsyncIterator[Lab]:
    info = await make_lab(url, runs=2)
    insert_samples(url, info["run_ids"][0], 3_000)
    app = create_app(Settings(database_url=url, api_token_cache_s=cache_s))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            yield c, info, url


@pytest.fixture
async def lab(db_url: str) -> AsyncIterator[Lab]:
    async for x in _client(db_url, 60.0):
        yield x


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _write(url: str, *rows: Any, stmt: Any = None) -> None:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            s.add_all(rows)
            if stmt is not None:
                await s.execute(stmt)
    finally:
        await engine.dispose()


async def _revoke_elsewhere(url: str, secret: str) -> None:
    """As `labdaq token revoke` in another process would: nothing tells the API."""
    await _write(url, stmt=update(m.ApiToken).where(
        m.ApiToken.token_sha256 == auth_service.hash_token(secret)).values(
        revoked_at=m.utcnow()))


def _cycle(run_id: int, k: int) -> m.Cycle:
    return m.Cycle(run_id=run_id, cycle_index=k, start_t_s=10.0 * k, end_t_s=10.0 * k + 10,
                   charge_capacity_ah=1.5 + k, discharge_capacity_ah=1.25,
                   charge_energy_wh=5.5, discharge_energy_wh=4.75,
                   coulombic_efficiency=None, energy_efficiency=0.8,
                   mean_charge_voltage_v=3.9, mean_discharge_voltage_v=None)


async def test_cycles_as_stored_empty_and_missing(lab: Lab) -> None:
    c, info, url = lab
    eng = _h(info["tokens"]["engineer"])
    full, empty = info["run_ids"]
    await _write(url, _cycle(full, 1), _cycle(full, 0))
    r = await c.get(f"/api/v1/runs/{full}/cycles", headers=eng)
    assert r.status_code == 200
    got = r.json()
    assert [x["cycle_index"] for x in got] == [0, 1]
    assert got[1]["charge_capacity_ah"] == 2.5 and got[1]["coulombic_efficiency"] is None
    assert set(got[0]) == {f for f in m.Cycle.__table__.columns.keys()
                           if f not in ("id", "run_id", "spans_gap")}
    assert (await c.get(f"/api/v1/runs/{empty}/cycles", headers=eng)).json() == []
    missing = await c.get("/api/v1/runs/9999/cycles", headers=eng)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def test_downsampled_answer_follows_new_samples(lab: Lab) -> None:
    c, info, url = lab
    eng = _h(info["tokens"]["engineer"])
    run_id = info["run_ids"][0]
    first = await c.get(f"/api/v1/runs/{run_id}/samples", params={"points": 100}, headers=eng)
    again = await c.get(f"/api/v1/runs/{run_id}/samples", params={"points": 100}, headers=eng)
    assert first.status_code == 200 and again.json() == first.json()
    assert first.json()["source_count"] == 3_000 and first.json()["seq"][-1] == 3_000
    # The run acquires on: the cached answer for the old last seq is not served.
    insert_samples(url, run_id, 500, seed=5, first_seq=3_001)
    later = (await c.get(f"/api/v1/runs/{run_id}/samples", params={"points": 100},
                         headers=eng)).json()
    assert later["source_count"] == 3_500 and later["seq"][-1] == 3_500
    # Another filter is another answer, not the cached one.
    window = (await c.get(f"/api/v1/runs/{run_id}/samples",
                          params={"points": 100, "t_to": 100.0}, headers=eng)).json()
    assert window["seq"][-1] < 1_001 and window["source_count"] < 1_001
    assert (await c.get("/api/v1/runs/9999/samples", params={"points": 100},
                        headers=eng)).status_code == 404
    # A run with nothing stored yet.
    empty = (await c.get(f"/api/v1/runs/{info['run_ids'][1]}/samples",
                         params={"points": 100}, headers=eng)).json()
    assert empty["count"] == 0 and empty["seq"] == []


async def test_revoked_through_the_api_is_refused_at_once(lab: Lab) -> None:
    c, info, url = lab
    admin = _h(info["tokens"]["admin"])
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            user = await auth_service.create_user(s, "dora", "engineer", actor="test")
            row, secret = await auth_service.issue_token(s, user, "nb", "test", None)
            token_id = row.id
    finally:
        await engine.dispose()
    path = f"/api/v1/runs/{info['run_ids'][0]}/cycles"
    assert (await c.get(path, headers=_h(secret))).status_code == 200  # now cached
    r = await c.post(f"/api/v1/tokens/{token_id}/revoke", headers=admin)
    assert r.status_code == 200
    assert (await c.get(path, headers=_h(secret))).status_code == 401


async def test_revoked_elsewhere_is_refused_once_the_entry_is_old(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    c, info, url = lab
    secret = info["tokens"]["engineer"]
    path = f"/api/v1/runs/{info['run_ids'][0]}/cycles"
    assert (await c.get(path, headers=_h(secret))).status_code == 200
    await _revoke_elsewhere(url, secret)
    assert (await c.get(path, headers=_h(secret))).status_code == 200  # within the TTL
    now = token_cache.time.monotonic()
    monkeypatch.setattr(token_cache.time, "monotonic", lambda: now + 60.0)
    r = await c.get(path, headers=_h(secret))
    assert r.status_code == 401 and "revoked" in r.text


async def test_a_cached_token_is_refused_when_it_expires(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    c, info, url = lab
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            user = await auth_service.create_user(s, "erin", "engineer", actor="test")
            _, secret = await auth_service.issue_token(s, user, "day", "test",
                                                       timedelta(hours=1))
    finally:
        await engine.dispose()
    path = f"/api/v1/runs/{info['run_ids'][0]}/cycles"
    assert (await c.get(path, headers=_h(secret))).status_code == 200
    later = m.utcnow() + timedelta(hours=2)
    monkeypatch.setattr(m, "utcnow", lambda: later)
    r = await c.get(path, headers=_h(secret))
    assert r.status_code == 401 and "expired" in r.text


async def test_no_cache_sees_every_revocation(sqlite_url: str) -> None:
    async for c, info, url in _client(sqlite_url, 0.0):
        secret = info["tokens"]["technician"]
        path = f"/api/v1/runs/{info['run_ids'][0]}/cycles"
        assert (await c.get(path, headers=_h(secret))).status_code == 200
        await _revoke_elsewhere(url, secret)
        assert (await c.get(path, headers=_h(secret))).status_code == 401


def test_the_downsample_cache_keeps_one_answer_per_run_points_and_filter() -> None:
    # A live run's last seq changes every period: each new answer replaces the one before
    # (which would never be asked for again) instead of filling the cache.
    import pyarrow as pa

    from labdaq.downsample import DownsampleCache
    from labdaq.sample_arrow import SampleFilter

    cache = DownsampleCache(max_rows=10_000)
    key = (1, 500, SampleFilter())
    for seq in range(1, 101):
        cache.put(key, seq, (pa.table({"seq": list(range(50))}), seq))
    assert len(cache) == 1 and cache.rows == 50
    assert cache.get(key, 99) is None
    hit = cache.get(key, 100)
    assert hit is not None and hit[1] == 100
    # A slower request's older answer does not replace a newer one.
    cache.put(key, 90, (pa.table({"seq": [1]}), 90))
    assert cache.get(key, 100) is not None and cache.rows == 50
    # Other runs, other keys; the least recently used go first past max_rows.
    for run_id in range(2, 400):
        cache.put((run_id, 500, SampleFilter()), 1, (pa.table({"seq": list(range(50))}), 1))
    assert cache.rows <= 10_000 and len(cache) == 200
    assert cache.get(key, 100) is None  # the oldest, evicted
