"""Other labs' cycler files brought in as read-only runs (labdaq.imports): upload one,
list them, read one with the cycler's own per-cycle summary. The work is done by
labdaq.imports.store; these functions only map HTTP to it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi import Path as PathParam
from sqlalchemy import select

from labdaq.api.deps import Reader, Session, require
from labdaq.api.problems import Problem
from labdaq.api.schemas_imports import ImportOut, ImportPatch
from labdaq.bounds import INT32_MAX, ONE_LINE
from labdaq.errors import NotFound
from labdaq.imports.readers import FORMATS
from labdaq.imports.store import import_file, safe_filename
from labdaq.imports.template import set_template
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/imports", tags=["imports"])

# Bringing in another lab's data is an engineer's job (and an admin's).
Importer = Annotated[m.ApiToken, Depends(require("evaluate"))]
ImportId = Annotated[int, PathParam(ge=1, le=INT32_MAX, description="import id")]

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
    403: {"model": Problem, "description": "the token's role may not import"},
}


@router.post("", response_model=ImportOut, status_code=201, responses={
    **_AUTH, 200: {"model": ImportOut, "description": "the same file was imported before"},
    404: {"model": Problem, "description": "no cell with that serial"},
    413: {"model": Problem, "description": "the file is larger than the import limit"},
    422: {"model": Problem, "description": "unreadable file, or its reader is not installed"},
})
async def create_import(
    session: Session, token: Importer, response: Response,
    file: Annotated[UploadFile, File(description="the cycler's file")],
    cell_serial: Annotated[str | None, Form(max_length=100, pattern=ONE_LINE, description=(
        "the registered cell the data are of; without it a cell is created from the "
        "file"))] = None,
    fmt: Annotated[str | None, Form(alias="format", description=(
        f"one of {', '.join(sorted(FORMATS))}; default: from the file's name and "
        "content"))] = None,
    template: Annotated[str | None, Form(max_length=100, pattern=ONE_LINE, description=(
        "the protocol template (GET /api/v1/protocols/templates) the other lab's test "
        "followed: its catalogue entries then apply to the run. Not applied when the "
        "file was imported before (PATCH the import)"))] = None,
) -> ImportOut:
    name = safe_filename(file.filename)
    with tempfile.TemporaryDirectory(prefix="labdaq-import-") as tmp:
        path = Path(tmp) / name  # the readers go by the suffix
        path.write_bytes(await file.read())
        result = await session.run_sync(lambda s: import_file(
            s, path, actor=token.name, cell_serial=cell_serial, fmt=fmt, filename=name,
            template=template))
    await session.commit()
    if not result.created:
        response.status_code = 200
    row = await session.get(m.Import, result.import_id)
    assert row is not None
    return ImportOut.model_validate(row).model_copy(update={"created": result.created})


@router.get("", response_model=list[ImportOut], responses=_AUTH)
async def list_imports(
    session: Session, _: Reader,
    run_id: Annotated[int | None, Query(ge=1, le=INT32_MAX,
                                        description="only the import of this run")] = None,
) -> list[ImportOut]:
    """Imports without their ``vendor_cycles`` (``GET /api/v1/imports/{id}`` has them)."""
    stmt = select(m.Import).order_by(m.Import.id)
    if run_id is not None:
        stmt = stmt.where(m.Import.run_id == run_id)
    rows = (await session.scalars(stmt)).all()
    return [ImportOut.model_validate(r).model_copy(update={"vendor_cycles": None})
            for r in rows]


@router.get("/{import_id}", response_model=ImportOut, responses={
    **_AUTH, 404: {"model": Problem, "description": "no such import"}})
async def get_import(import_id: ImportId, session: Session, _: Reader) -> ImportOut:
    row = await session.get(m.Import, import_id)
    if row is None:
        raise NotFound(f"no import {import_id}")
    return ImportOut.model_validate(row)


@router.patch("/{import_id}", response_model=ImportOut, responses={
    **_AUTH, 404: {"model": Problem, "description": "no such import"},
    422: {"model": Problem, "description": "not a shipped protocol template"}})
async def patch_import(import_id: ImportId, body: ImportPatch, session: Session,
                       token: Importer) -> ImportOut:
    """Declare the protocol template the imported run's test followed (audited)."""
    row = await session.run_sync(
        lambda s: set_template(s, import_id, body.template, token.name))
    await session.commit()
    return ImportOut.model_validate(row)
