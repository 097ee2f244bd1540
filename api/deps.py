"""FastAPI dependencies: database session per request and bearer-token role checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.auth import ROLE_GRANTS, lookup_token
from labdaq.bounds import INT32_MAX
from labdaq.storage import models as m
from labdaq.storage.db import session_scope

_bearer = HTTPBearer(auto_error=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; committed if the handler returns, rolled back on error."""
    async with session_scope(request.app.state.sessionmaker) as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]

# Ids are INTEGER columns (int4 on PostgreSQL): a larger one names no row, and must not
# reach the database, which would refuse the parameter itself.
RunId = Annotated[int, Path(ge=1, le=INT32_MAX, description="run id")]
CellId = Annotated[int, Path(ge=1, le=INT32_MAX, description="cell id")]


def require(grant: str) -> Callable[..., Coroutine[Any, Any, m.ApiToken]]:
    async def _check(
        session: Session,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> m.ApiToken:
        if creds is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        token = await lookup_token(session, creds.credentials)
        if token is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "unknown or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if token.role not in ROLE_GRANTS[grant]:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {token.role!r} may not {grant}")
        return token

    return _check


Reader = Annotated[m.ApiToken, Depends(require("read"))]
Operator = Annotated[m.ApiToken, Depends(require("operate"))]
Admin = Annotated[m.ApiToken, Depends(require("admin"))]
