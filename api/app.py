"""The FastAPI application: wiring of routers, database, input limits and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event

import labdaq
from labdaq import export, malloc_trim, run_analysis
from labdaq.api.body_limit import BodyLimitMiddleware
from labdaq.api.gc_freeze import freeze_startup_heap
from labdaq.api.openapi_examples import add_examples, operation_id
from labdaq.api.problems import install_problem_handlers, problem_openapi
from labdaq.api.request_log import RequestIdMiddleware
from labdaq.api.routers import (
    analysis,
    audit,
    calibrations,
    cells,
    channels,
    evaluations,
    exports,
    health,
    imports,
    instruments,
    lab,
    metrics,
    protocols,
    runs,
    samples,
    stream,
    subscriptions,
    tokens,
    users,
    web,
    web_session,
)
from labdaq.config import Settings, load_settings
from labdaq.downsample import DownsampleCache
from labdaq.read_pool import ReadPool
from labdaq.storage.db import create_engine, sessionmaker, warm_pool
from labdaq.token_cache import TokenCache

#: Page cache of each of the API's SQLite connections, KiB (the storage layer's 32 MiB is
#: for the writer's inserts). A request reads one run's rows, a few hundred pages at most,
#: and the OS caches the file behind it. With 32 MiB each pooled connection kept caching
#: new sample pages as the database grew, and so did the API's memory (the 1 h soak,
#: tests/test_soak_api_load.py).
API_SQLITE_CACHE_KIB = 2048


def _api_sqlite_pragmas(timeout_s: float) -> Any:
    def _set(dbapi_conn: Any, _record: Any) -> None:
        # Runs after the storage layer's pragmas: an API request waits this long for a
        # locked SQLite file and then answers 503 with Retry-After, instead of holding the
        # client (and a worker) for the engine's longer wait.
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        cur.execute(f"PRAGMA cache_size=-{API_SQLITE_CACHE_KIB}")
        cur.close()

    return _set


def create_app(settings: Settings | None = None, gc_freeze: bool = False) -> FastAPI:
    """The application. ``gc_freeze``: freeze the heap once started (labdaq.api.gc_freeze;
    ``labdaq api`` asks for it, tests building many apps in one process do not)."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.resolved_database_url)
        if engine.dialect.name == "sqlite":
            event.listen(
                engine.sync_engine, "connect",
                _api_sqlite_pragmas(settings.api_db_busy_timeout_s)
            )
        app.state.engine = engine
        # The downsampled-samples route's connections, one per worker thread.
        app.state.read_pool = ReadPool(settings.resolved_database_url)
        app.state.sessionmaker = sessionmaker(
            engine, audit_head_file=settings.audit_head_file, origin="api"
        )
        # The alert notifier (labdaq.alerts) runs with the API: for the lab's subscribers
        # in the configuration and the runs' own (labdaq.run_alerts) unless turned off.
        notifier = None
        if settings.alerts or settings.run_alerts:
            from labdaq.alerts import Notifier

            notifier = asyncio.create_task(
                Notifier(app.state.sessionmaker, settings).run_forever(), name="alerts")
        # This process, which survives a node (on SQLite: the engine beside it), records a
        # node going down or coming back as one event (labdaq.node_watch), for the notifier.
        from labdaq.node_watch import NodeWatch

        watch: asyncio.Task[None] | None = asyncio.create_task(NodeWatch(
            app.state.sessionmaker, settings.node_down_after_s,
            min(settings.alerts_poll_s, settings.node_down_after_s / 3)).run_forever(),
            name="node-watch")
        # Freed malloc memory back to the OS once a minute (labdaq.malloc_trim).
        trimmer = asyncio.create_task(malloc_trim.trim_forever(), name="malloc-trim")
        # Before the first request: the reads' one-time imports, the pool's connections.
        export.warm_up()
        run_analysis.warm_up()
        await warm_pool(engine)
        if gc_freeze:
            # Last: everything start-up made, the engines and pools included, is frozen.
            freeze_startup_heap()
        try:
            yield
        finally:
            for task in (notifier, watch, trimmer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await engine.dispose()
            app.state.read_pool.close()

    app = FastAPI(title="labdaq", version=labdaq.__version__, lifespan=lifespan,
                  generate_unique_id_function=operation_id)
    app.state.settings = settings
    app.state.token_cache = TokenCache(settings.api_token_cache_s)
    app.state.downsample_cache = DownsampleCache()
    install_problem_handlers(app, settings.api_retry_after_s)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.api_max_body_bytes,
                       larger={"/api/v1/imports": settings.api_max_import_bytes})
    # Outermost: every request, refused by the body limit or not, has an id in its log
    # records and its latency in the histogram.
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(channels.router)
    app.include_router(runs.router)
    app.include_router(analysis.router)
    app.include_router(protocols.router)
    app.include_router(instruments.router)
    app.include_router(cells.router)
    app.include_router(samples.router)
    app.include_router(exports.router)
    app.include_router(stream.router)
    app.include_router(stream.lab_router)
    app.include_router(subscriptions.router)

    def _openapi() -> dict[str, Any]:
        cached = app.openapi_schema is not None
        doc = problem_openapi(app)
        if not cached:
            add_examples(doc)
        return doc

    app.openapi = _openapi  # type: ignore[method-assign]
    app.include_router(evaluations.router)
    app.include_router(evaluations.cell_router)
    app.include_router(imports.router)
    app.include_router(calibrations.router)
    app.include_router(users.router)
    app.include_router(tokens.router)
    app.include_router(audit.router)
    app.include_router(lab.router)
    app.include_router(web_session.router)
    app.include_router(web.router)
    return app
