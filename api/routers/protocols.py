"""Protocol templates shipped with labdaq (seeds/protocols)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from labdaq.api.deps import Reader
from labdaq.api.problems import AUTH, COMMON, responses
from labdaq.api.schemas import TemplateOut
from labdaq.bounds import ONE_LINE
from labdaq.errors import NotFound
from labdaq.protocol import list_templates, load_template

router = APIRouter(prefix="/api/v1/protocols", tags=["protocols"])


@router.get("/templates", response_model=list[TemplateOut], responses=responses(*COMMON, *AUTH))
async def get_templates(_: Reader) -> list[TemplateOut]:
    return [_out(name) for name in list_templates()]


@router.get(
    "/templates/{name}", response_model=TemplateOut, responses=responses(*COMMON, *AUTH, 404)
)
async def get_template(
    name: Annotated[str, Path(max_length=200, pattern=ONE_LINE, description="template name")],
    _: Reader,
) -> TemplateOut:
    if name not in list_templates():
        raise NotFound(f"no template {name!r}; available: {', '.join(list_templates())}")
    return _out(name)


def _out(name: str) -> TemplateOut:
    p = load_template(name)
    return TemplateOut(
        name=name,
        description=p.description,
        content_hash=p.content_hash(),
        document=p.model_dump(mode="json", exclude_defaults=True),
    )
