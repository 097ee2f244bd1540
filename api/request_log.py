"""Request ids, structured JSON logs and the latency histogram for the API process.

Every HTTP request gets an id: the client's ``X-Request-ID`` when it sends a usable one
(printable ASCII, at most :data:`MAX_ID_CHARS`), otherwise a new random one. The id goes
back in the response's ``X-Request-ID`` header, into every log record written while the
request is handled (a context variable that :class:`JsonFormatter` reads), and into one
``labdaq.api.request`` record per request when its response has started (method, route
template, status, latency), so a client's complaint can be matched to the server's log.
The same latency goes into the Prometheus histogram ``GET /metrics`` serves. Latency runs
from the request's arrival to the start of its response (status and headers), so a long
stream (SSE, an export) counts its time to first byte, not its length; the route label is
the matched route's template (``/api/v1/runs/{run_id}``), never the raw path, so the
label set stays bounded whatever clients send.

:func:`configure_json_logging` makes the process log one JSON object per line to stderr
(uvicorn's own records included); ``labdaq api`` calls it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labdaq.metrics import REQUEST_LATENCY

HEADER = "X-Request-ID"
MAX_ID_CHARS = 128
REQUEST_LOGGER = "labdaq.api.request"

#: The id of the request being handled in this context ("" outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_log = logging.getLogger(REQUEST_LOGGER)


def _usable(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_CHARS and all(32 < ord(c) < 127 for c in value)


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): a streamed export or SSE response passes
    through unbuffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(HEADER.lower().encode(), b"")
        given = sent.decode("latin-1")
        rid = given if _usable(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        logged = False

        def log(status: int) -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            elapsed_s = time.perf_counter() - start
            REQUEST_LATENCY.labels(scope.get("method", ""), route, str(status)).observe(elapsed_s)
            _log.info(
                "request",
                extra={
                    "http": {
                        "method": scope.get("method", ""),
                        "path": scope.get("path", ""),
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed_s * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    }
                },
            )

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers.append((HEADER.lower().encode(), rid.encode()))
                message = {**message, "headers": headers}
                log(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log(500)  # no response started: the server answers 500 or drops the connection
            request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    current request id when there is one, an exception's traceback, and the ``http``
    fields of a request record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            out.update(http)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_json_logging(level: str = "INFO") -> None:
    """Route every logger of the process (the root and uvicorn's, which do not
    propagate by default) to one stderr handler writing JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
