"""ASGI middleware: a request body over the configured size gets 413 before it is parsed.

The body is counted as it arrives, so a client that announces no length (chunked transfer
encoding) or a wrong one is stopped too. The body is buffered only up to the limit, which
also means the route reads it from memory rather than from the socket.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labdaq.api.problems import problem


class BodyLimitMiddleware:
    """``larger``: exact paths allowed a larger body (an uploaded file) and their limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope.get("path", ""), self.max_body_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending the whole body: nothing to answer.
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body, the app only waits for the client to disconnect.
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem(
            Request(scope),
            413,
            f"the request body is larger than {limit} bytes; nothing was parsed",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
