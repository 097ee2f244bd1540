"""The audit log: every change, append-only and hash-chained; admins and engineers read it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from labdaq.api.auth_schemas import AuditHeadOut, AuditRecordOut
from labdaq.api.deps import Session, require
from labdaq.api.problems import COMMON, OPERATE, responses
from labdaq.audit import read_head
from labdaq.bounds import INT32_MAX
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

# Reading the trail is part of judging the work (ISO/IEC 17025 reviews): engineers too.
Auditor = Annotated[m.ApiToken, Depends(require("evaluate"))]


@router.get("", response_model=list[AuditRecordOut], responses=responses(*COMMON, *OPERATE))
async def list_audit(
    session: Session, _: Auditor,
    after_seq: int = Query(0, ge=0, le=INT32_MAX),
    limit: int = Query(100, ge=1, le=1000),
    run_id: int | None = Query(None, ge=1, le=INT32_MAX),
) -> list[AuditRecordOut]:
    """Records after ``after_seq``, oldest first."""
    q = select(m.AuditRecord).where(m.AuditRecord.seq > after_seq)
    if run_id is not None:
        q = q.where(m.AuditRecord.run_id == run_id)
    rows = await session.scalars(q.order_by(m.AuditRecord.seq).limit(limit))
    return [AuditRecordOut.model_validate(r) for r in rows]


@router.get("/head", response_model=AuditHeadOut, responses=responses(*COMMON, *OPERATE))
async def get_head(session: Session, _: Auditor) -> AuditHeadOut:
    """The chain's newest record: keep it to check later that nothing was cut or rewritten."""
    seq, sha = await read_head(await session.connection())
    return AuditHeadOut(seq=seq, sha256=sha, head=f"{seq}:{sha}")
