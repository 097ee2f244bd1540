"""Tokens: admins issue them to users (the secret is in the answer, once), list them
without their secrets, and revoke them."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from labdaq import auth as service
from labdaq.api.auth_schemas import TokenCreate, TokenIssued, TokenOut, TokenRevoke
from labdaq.api.deps import Admin, Session
from labdaq.api.problems import COMMON, OPERATE, responses
from labdaq.bounds import INT32_MAX

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])

TokenId = Annotated[int, Path(ge=1, le=INT32_MAX, description="token id")]


@router.get("", response_model=list[TokenOut], responses=responses(*COMMON, *OPERATE))
async def list_tokens(
    session: Session, _: Admin,
    active: bool = Query(False, description="only tokens that are neither revoked nor expired"),
) -> list[TokenOut]:
    rows = await service.list_tokens(session, include_inactive=not active)
    return [TokenOut(**service.token_view(t, u)) for t, u in rows]


@router.post("", response_model=TokenIssued, status_code=status.HTTP_201_CREATED,
             responses=responses(*COMMON, *OPERATE, 404, 409))
async def create_token(body: TokenCreate, session: Session, token: Admin) -> TokenIssued:
    user = await service.get_user(session, body.user)
    days = body.expires_in_days
    row, secret = await service.issue_token(
        session, user, body.name, actor=token.name,
        expires_in=None if days is None else timedelta(days=days),
    )
    await session.commit()
    return TokenIssued(**service.token_view(row, user), token=secret)


@router.post("/{token_id}/revoke", response_model=TokenOut,
             responses=responses(*COMMON, *OPERATE, 404))
async def revoke_token(
    token_id: TokenId, session: Session, token: Admin, body: TokenRevoke | None = None
) -> TokenOut:
    """Refused from now on (401); revoking a revoked token changes nothing."""
    row, user = await service.revoke_token(
        session, token_id, actor=token.name, reason=body.reason if body else None
    )
    await session.commit()
    return TokenOut(**service.token_view(row, user))
