"""Prometheus metrics (``GET /metrics``, text exposition format; labdaq.metrics)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from labdaq.api.deps import Session
from labdaq.api.problems import responses
from labdaq.metrics import CONTENT_TYPE_LATEST, render

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format (version 0.0.4); the metric "
            "names are listed in docs/api.md",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        **responses(503),
    },
)
async def metrics(session: Session) -> Response:
    """The service's metrics for a Prometheus scrape; no token, like /health and /ready."""
    return Response(await render(session), media_type=CONTENT_TYPE_LATEST)
