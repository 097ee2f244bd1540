"""Domain errors raised by services and mapped to HTTP status codes by the API."""

from __future__ import annotations

from typing import Any


class LabdaqError(Exception):
    status_code = 400

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class Unauthenticated(LabdaqError):
    """No usable credentials: an unknown, revoked or expired token or browser session."""

    status_code = 401


class NotFound(LabdaqError):
    status_code = 404


class Forbidden(LabdaqError):
    """The token's role may not do this particular thing (the route itself admits it)."""

    status_code = 403


class Conflict(LabdaqError):
    status_code = 409


class Invalid(LabdaqError):
    """Bad input; ``details`` lists ``{"loc": ..., "msg": ...}`` naming each bad field."""

    status_code = 422

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        # The message names every bad field so a technician reading only it knows what to fix.
        if details:
            message = f"{message}: " + "; ".join(f"{d['loc']}: {d['msg']}" for d in details)
        super().__init__(message, details)
