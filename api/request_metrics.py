"""ASGI middleware: every HTTP request's latency into the API's Prometheus histogram.

Latency runs from the request's arrival to the start of its response (status and
headers), so a long stream (SSE, an export) counts its time to first byte, not its
length. The route label is the matched route's template (``/api/v1/runs/{run_id}``), never
the raw path, so the label set stays bounded whatever clients send.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labdaq.metrics import REQUEST_LATENCY


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        done = False

        def observe(status: int) -> None:
            nonlocal done
            if done:
                return
            done = True
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUEST_LATENCY.labels(scope.get("method", ""), route, str(status)).observe(
                time.perf_counter() - start)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            observe(500)  # no response started: the server answers 500 or drops it
