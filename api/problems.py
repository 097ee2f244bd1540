"""Errors as RFC 9457 problem details, and the OpenAPI declaration of every error status.

Every error the API returns — a domain error, a validation error, a missing token, an
unknown path, a body too large, a database that is locked or unreachable — has the body
:class:`Problem` with media type ``application/problem+json``. Routes declare the statuses
they can return with :func:`responses`; :func:`problem_openapi` then rewrites every error
response in the OpenAPI document to that media type and schema, so what the schema says
is what a client gets.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from labdaq.errors import LabdaqError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

# RFC 9457 §4.2.1: "about:blank" means the status code's own meaning is the type; labdaq
# uses it for generic statuses and a tag URI for the ones with labdaq-specific meaning.
_TYPES = {
    413: "tag:labdaq,2026:problem:body-too-large",
    422: "tag:labdaq,2026:problem:invalid-input",
    503: "tag:labdaq,2026:problem:database-unavailable",
}
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    422: "Invalid input",
    500: "Internal server error",
    503: "Database unavailable",
}


class FieldProblem(BaseModel):
    """One bad field: where (``protocol.charge_current_a``, ``steps[2].until``) and why."""

    loc: str
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` names each bad field (422)."""

    type: str = Field(default="about:blank", description="URI identifying the problem type")
    title: str = Field(description="short summary of the problem type")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str = Field(description="what went wrong in this request, in words")
    instance: str = Field(description="the request path")
    errors: list[FieldProblem] = Field(default_factory=list)


def problem(
    request: Request,
    status: int,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=_TYPES.get(status, "about:blank"),
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=[
            FieldProblem(loc=str(e.get("loc", "")), msg=str(e.get("msg", ""))) for e in errors or []
        ],
    )
    return JSONResponse(
        status_code=status,
        content=body.model_dump(mode="json"),
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


# pydantic names the member of a union that failed ("constrained-str", "dict[str,any]",
# "function-plain[...]"); the client's field is the part before it.
_UNION_MEMBER = re.compile(r"(constrained-)?(str|int|float|bool)|[a-z-]+\[.*\]")


def _loc(loc: tuple[object, ...]) -> str:
    """pydantic's ``("body", "protocol", "rest_s")`` as ``protocol.rest_s``."""
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))
    ]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or ".".join(str(p) for p in loc)


# Errors that mean "the database cannot answer now" rather than "this request is wrong":
# a locked SQLite file, a PostgreSQL server that is down or restarting, a pool exhausted.
# Any other DBAPIError (a missing table, a server shutting down) is the database's state
# too; DataError and IntegrityError have their own handlers below. asyncpg reports a
# refused connection as a bare OSError.
_UNAVAILABLE = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
    OSError,
    OverflowError,  # classified as the client's by _client_fault
)


def _client_fault(exc: BaseException) -> int | None:
    """422/409 for a database error caused by the request's values, else None.

    asyncpg refuses a parameter that does not fit its column type before sending it
    ("invalid input for query argument"), and SQLAlchemy reports that as an
    InterfaceError; PostgreSQL's data exceptions (SQLSTATE class 22: a NUL in text, a
    string too long) and integrity violations (class 23) arrive as generic DBAPIErrors.
    """
    if isinstance(exc, OverflowError):  # sqlite3: an int beyond int64
        return 422
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    if isinstance(code, str) and code.startswith("22"):
        return 422
    if isinstance(code, str) and code.startswith("23"):
        return 409
    if "invalid input for query argument" in str(exc):
        return 422
    return None


def install_problem_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Map every exception a client or the database's state can cause to a problem."""

    @app.exception_handler(LabdaqError)
    async def _domain(request: Request, exc: LabdaqError) -> JSONResponse:
        return problem(request, exc.status_code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": _loc(tuple(e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        return problem(request, 422, f"invalid request: {summary}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            # Starlette's Allow names only the first route matching the path; a path with a
            # GET and a POST route supports both.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem(request, exc.status_code, str(exc.detail), headers=headers or None)

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        kind = _client_fault(exc)
        if kind == 422:
            log.warning("database refused a value for %s: %s", request.url.path, exc)
            return problem(request, 422, "a value is out of range or cannot be stored")
        if kind == 409:
            log.warning("integrity error for %s: %s", request.url.path, exc)
            return problem(request, 409, "the request conflicts with the stored data")
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
        text = str(exc).lower()
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            detail = (
                "the database has no labdaq schema (not migrated); "
                "run `labdaq db upgrade` and retry"
            )
        else:
            detail = "the database is locked or unreachable; nothing was changed, retry later"
        return problem(request, 503, detail, headers={"Retry-After": str(retry_after_s)})

    for cls in _UNAVAILABLE:
        app.add_exception_handler(cls, _unavailable)

    # Backstops: the schema bounds every value, but a value the database still refuses
    # (out of a column's range, a constraint) is the client's, not a server fault.
    @app.exception_handler(sa_exc.DataError)
    async def _data(request: Request, exc: sa_exc.DataError) -> JSONResponse:
        log.warning("database refused a value for %s: %s", request.url.path, exc)
        return problem(request, 422, "a value is out of range for the database")

    @app.exception_handler(sa_exc.IntegrityError)
    async def _integrity(request: Request, exc: sa_exc.IntegrityError) -> JSONResponse:
        log.warning("integrity error for %s: %s", request.url.path, exc)
        return problem(request, 409, "the request conflicts with the stored data")

    install_server_error_handler(app)


def install_server_error_handler(app: FastAPI) -> None:
    """A bug still answers problem+json (500), logged with its traceback."""

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error for %s %s", request.method, request.url.path, exc_info=exc)
        return problem(request, 500, "internal error; it has been logged")


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses (bodies are :class:`Problem`)."""
    return {s: {"model": Problem, "description": _DESCRIPTIONS[s]} for s in statuses}


_DESCRIPTIONS = {
    400: "The body could not be read (not JSON, nested too deep)",
    401: "No bearer token, or an unknown or revoked one",
    403: "The token's role may not do this",
    404: "No such resource",
    409: "The resource's state does not allow this",
    413: "The request body is larger than the configured limit",
    422: "Invalid input; `errors` names each bad field",
    503: "The database is locked or unreachable; retry after `Retry-After` seconds",
}


# What every route can return: bad input, an oversized body, an unavailable database.
COMMON = (400, 413, 422, 503)
AUTH = (401,)
OPERATE = (401, 403)


def _is_problem(resp: dict[str, Any]) -> bool:
    """An error response answered by the handlers here (Problem, FastAPI's own 422, or
    none given) rather than one a route answers with its own model (/ready's 503)."""
    content = resp.get("content") or {}
    refs = [str((c.get("schema") or {}).get("$ref", "")) for c in content.values()]
    return not content or any(
        r.endswith(("/Problem", "/HTTPValidationError")) for r in refs
    )


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with every error response as ``application/problem+json``."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, routes=app.routes, description=app.description
    )
    ref = {"$ref": "#/components/schemas/Problem"}
    headers = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            # What middleware and handlers can answer on any route (an oversized body, an
            # unavailable database; 401 wherever a token is needed) is declared on every
            # route, so a route added without `responses=` is still documented truthfully.
            generic = [*COMMON, *(AUTH if op.get("security") else ())]
            for code in generic:
                op.setdefault("responses", {}).setdefault(
                    str(code), {"description": _DESCRIPTIONS[code]}
                )
            for code, resp in op.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400 and _is_problem(resp):
                    resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
                    if code == "503":
                        resp["headers"] = headers
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    # FastAPI's own 422 shapes are replaced by Problem everywhere; drop them.
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    app.openapi_schema = schema
    return schema
