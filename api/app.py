"""The FastAPI application: wiring of routers, database and error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import labdaq
from labdaq.api.routers import (
    cells,
    channels,
    evaluations,
    exports,
    health,
    instruments,
    protocols,
    runs,
    samples,
    stream,
)
from labdaq.config import Settings, load_settings
from labdaq.errors import LabdaqError
from labdaq.storage.db import create_engine, sessionmaker


def _loc(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.resolved_database_url)
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker(engine)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(title="labdaq", version=labdaq.__version__, lifespan=lifespan)
    app.state.settings = settings

    @app.exception_handler(LabdaqError)
    async def _domain_error(_: Request, exc: LabdaqError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code, content={"detail": exc.message, "errors": exc.details}
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": _loc(tuple(e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        return JSONResponse(
            status_code=422, content={"detail": f"invalid request: {summary}", "errors": errors}
        )

    app.include_router(health.router)
    app.include_router(channels.router)
    app.include_router(runs.router)
    app.include_router(protocols.router)
    app.include_router(instruments.router)
    app.include_router(cells.router)
    app.include_router(samples.router)
    app.include_router(exports.router)
    app.include_router(stream.router)
    app.include_router(stream.lab_router)
    app.include_router(evaluations.router)
    app.include_router(evaluations.cell_router)
    return app
