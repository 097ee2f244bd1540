"""The declarative base every labdaq table derives from, and the default timestamp.

One job: one metadata for the schema (``models.py``, ``models_access.py``), with the
column types the annotations map to.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.orm import DeclarativeBase


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSON,
        dict[str, Any] | None: JSON,
        list[dict[str, Any]] | None: JSON,
        datetime: DateTime(timezone=True),
    }
