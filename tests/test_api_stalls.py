"""What keeps the API's requests from waiting on each other (docs/performance.md, "API
latency: stalls"): the start-up heap frozen out of full garbage collections
(labdaq.api.gc_freeze), and one token lookup shared by the requests that arrive while it
runs (labdaq.token_cache.TokenCache.verify_once)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import httpx
import pytest

from labdaq import token_cache
from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.token_cache import CachedToken, TokenCache
from tests.dataout_fixtures import make_lab


class _Node:
    me: _Node | None = None


@pytest.fixture
def _unfrozen() -> Any:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's heap goes back to being collected as usual


async def test_the_api_freezes_its_startup_heap_only_when_asked(
        db_url: str, _unfrozen: None) -> None:
    info = await make_lab(db_url)
    for freeze in (False, True):
        app = create_app(Settings(database_url=db_url), gc_freeze=freeze)
        async with app.router.lifespan_context(app):
            assert (gc.get_freeze_count() > 0) is freeze
            # It still answers, and objects made after start-up are collected as usual.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t") as c:
                r = await c.get(f"/api/v1/runs/{info['run_ids'][0]}/cycles",
                                headers={"Authorization":
                                         f"Bearer {info['tokens']['engineer']}"})
                assert r.status_code == 200 and r.json() == []
            garbage = _Node()
            garbage.me = garbage  # a reference cycle: only the collector frees it
            gone = weakref.ref(garbage)
            del garbage
            gc.collect()
            assert gone() is None


def test_labdaq_api_freezes_as_the_setting_says(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import uvicorn

    import labdaq.api.app as app_module
    from labdaq import cli

    asked: list[bool] = []
    real = app_module.create_app

    def spy(settings: Settings | None = None, gc_freeze: bool = False) -> Any:
        asked.append(gc_freeze)
        return real(settings)

    monkeypatch.setattr(app_module, "create_app", spy)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setenv("LABDAQ_API_NICE", "0")
    for env, want in (("true", True), ("false", False)):
        monkeypatch.setenv("LABDAQ_API_GC_FREEZE", env)
        cli.api_cmd(data_dir=tmp_path)
        assert asked[-1] is want


def _entry(name: str) -> CachedToken:
    return CachedToken(m.ApiToken(id=1, name=name, role="engineer", user_id=1, expires_at=None),
                       "actor", None, token_cache.generation(), 0.0)


async def test_requests_arriving_during_a_lookup_share_it() -> None:
    cache = TokenCache(ttl_s=2.0)
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def lookup(generation: int) -> CachedToken | str:
        calls.append(generation)
        started.set()
        await release.wait()
        return _entry("nb")

    leader = asyncio.create_task(cache.verify_once("s3cret", lookup))
    await started.wait()
    followers = [asyncio.create_task(cache.verify_once("s3cret", lookup)) for _ in range(7)]
    other = asyncio.create_task(cache.verify_once("another", lookup))  # its own lookup
    await asyncio.sleep(0)  # one loop turn: every new task runs up to its first wait
    release.set()
    got = await asyncio.gather(leader, *followers, other)
    assert len(calls) == 2
    assert [own for _, own in got] == [True, *[False] * 7, True]
    assert all(isinstance(v, CachedToken) and v.token.name == "nb" for v, _ in got)
    assert not cache._pending  # nothing left behind


async def test_a_change_to_tokens_during_a_lookup_is_not_shared(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TokenCache(ttl_s=2.0)
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def lookup(generation: int) -> CachedToken | str:
        calls.append(generation)
        if len(calls) == 1:
            started.set()
            await release.wait()
            return _entry("before")
        return "revoked token"

    leader = asyncio.create_task(cache.verify_once("s3cret", lookup))
    await started.wait()
    # A commit revoked the token meanwhile: a request arriving now must not be told
    # what the older lookup finds.
    monkeypatch.setattr(token_cache, "_generation", token_cache.generation() + 1)
    late = asyncio.create_task(cache.verify_once("s3cret", lookup))
    await asyncio.sleep(0)
    release.set()
    (first, _), (second, own) = await asyncio.gather(leader, late)
    assert isinstance(first, CachedToken) and second == "revoked token" and own
    assert calls[1] == calls[0] + 1


async def _leader_and_follower(cache: TokenCache, lookup: Any, started: asyncio.Event
                               ) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """A request looking the token up (it has started) and one that arrived meanwhile and
    waits for it."""
    leader = asyncio.create_task(cache.verify_once("s", lookup))
    await started.wait()
    follower = asyncio.create_task(cache.verify_once("s", lookup))
    await asyncio.sleep(0)
    return leader, follower


async def test_an_error_reaches_the_waiters_and_a_cancelled_lookup_is_redone() -> None:
    cache = TokenCache(ttl_s=2.0)
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def failing(generation: int) -> CachedToken | str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        raise RuntimeError("database is locked")

    leader, follower = await _leader_and_follower(cache, failing, started)
    release.set()
    for task in (leader, follower):
        with pytest.raises(RuntimeError, match="locked"):
            await task
    assert calls == 1

    # The request that was looking up goes away: the one waiting for it looks up itself.
    started.clear()
    gate = asyncio.Event()

    async def slow(generation: int) -> CachedToken | str:
        started.set()
        await gate.wait()
        return _entry("again")

    leader, follower = await _leader_and_follower(cache, slow, started)
    leader.cancel()
    gate.set()
    verdict, own = await follower
    assert isinstance(verdict, CachedToken) and own
    assert leader.cancelled()


async def test_without_a_cache_every_request_looks_up() -> None:
    cache = TokenCache(ttl_s=0.0)
    calls = 0

    async def lookup(generation: int) -> CachedToken | str:
        nonlocal calls
        calls += 1
        return _entry("x")

    await asyncio.gather(*(cache.verify_once("s", lookup) for _ in range(3)))
    assert calls == 3


# A hang guard: the child imports the whole API and SciPy, several seconds of CPU, which
# at a load average of 35 took over the default 120 s.
@pytest.mark.timeout(600)
def test_the_reads_one_time_imports_happen_at_startup(db_url: str) -> None:
    """pyarrow imports pandas on its first conversion of Python values (half a second with
    the GIL held, every request waiting), and dQ/dV and the circuit fit import SciPy's
    signal and optimize packages (over a second of CPU): the API does them before it
    serves, not in the first downsampled-samples, dQ/dV or fit request."""
    import subprocess
    import sys

    asyncio.run(make_lab(db_url))
    code = (
        "import asyncio, sys\n"
        "from labdaq.api.app import create_app\n"
        "from labdaq.config import Settings\n"
        f"app = create_app(Settings(database_url={db_url!r}))\n"
        "names = ('pandas', 'scipy.signal', 'scipy.optimize')\n"
        "before = any(n in sys.modules for n in names)\n"
        "async def go():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        return all(n in sys.modules for n in names)\n"
        "print(before, asyncio.run(go()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout


async def test_the_api_opens_its_pools_connections_before_serving(db_url: str) -> None:
    await make_lab(db_url)
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        pool = app.state.engine.pool
        assert pool.size() > 0 and pool.checkedin() == pool.size()
