"""Responses serialised by pydantic straight to JSON bytes, for the hot read routes.

A route that returns a model lets FastAPI validate it again against ``response_model``
and encode it in Python; for the frequently polled reads (cycles, downsampled samples)
that was a measurable share of each request. The route still declares its
``response_model`` (the OpenAPI document and its tests rely on it), and the body is the
same model's own JSON (pydantic's ``dump_json``), so the schema holds by construction.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter


def model_json(model: BaseModel) -> Response:
    return Response(model.model_dump_json().encode(), media_type="application/json")


def validated_json(adapter: TypeAdapter[Any], data: Any) -> Response:
    """``data`` validated by ``adapter`` and written as JSON (a 500 if it does not fit)."""
    return Response(adapter.dump_json(adapter.validate_python(data)),
                    media_type="application/json")
