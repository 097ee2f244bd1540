"""FastAPI dependencies: database session per request and role checks of the bearer token
or, without one, of the dashboard's session cookie (labdaq.api.session_cookie)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq import token_cache
from labdaq.api.session_cookie import browser_session, check_csrf
from labdaq.audit import Principal, set_principal
from labdaq.auth import ROLE_GRANTS, Authenticated, authenticate, aware
from labdaq.bounds import INT32_MAX
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from labdaq.token_cache import TokenCache

_bearer = HTTPBearer(auto_error=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; committed if the handler returns, rolled back on error."""
    async with session_scope(request.app.state.sessionmaker) as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


def node_down_after_s(request: Request) -> float:
    """The ``node_down_after_s`` setting: when a run's node counts as down (labdaq.nodes)."""
    return float(request.app.state.settings.node_down_after_s)


NodeDownAfterS = Annotated[float, Depends(node_down_after_s)]

# Ids are INTEGER columns (int4 on PostgreSQL): a larger one names no row, and must not
# reach the database, which would refuse the parameter itself.
RunId = Annotated[int, Path(ge=1, le=INT32_MAX, description="run id")]
CellId = Annotated[int, Path(ge=1, le=INT32_MAX, description="cell id")]


def require(*grants: str) -> Callable[..., Coroutine[Any, Any, m.ApiToken]]:
    """A token whose role holds any of ``grants`` (the route's service may narrow it)."""
    admitted = set().union(*(ROLE_GRANTS[g] for g in grants))
    grant = " or ".join(grants)

    async def _check(
        request: Request,
        session: Session,
        creds: HTTPAuthorizationCredentials | None,
    ) -> m.ApiToken:
        if creds is None:
            # No bearer token: the dashboard's session cookie, if any, stands for one.
            principal, token = await _from_cookie(request, session)
        else:
            principal, token = await _from_bearer(request, session, creds.credentials)
        if token.role not in admitted:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {token.role!r} may not {grant}")
        # The audit log names whoever this request's changes are made by.
        set_principal(session.info, principal)
        return token

    # The roles admitted, as the OpenAPI security requirement's role list (OpenAPI 3.1:
    # non-OAuth2 schemes may list role names), so clients and the role-matrix test read
    # them from the document. Set as an object: a string annotation could not see `admitted`.
    roles = sorted(str(r) for r in admitted)
    _check.__annotations__["creds"] = Annotated[
        HTTPAuthorizationCredentials | None, Security(_bearer, scopes=roles)
    ]
    return _check


async def _from_bearer(
    request: Request, session: AsyncSession, secret: str
) -> tuple[Principal, m.ApiToken]:
    # A token verified a moment ago is taken from the cache (labdaq.token_cache): one
    # database trip less per request; a revocation in this process empties the cache.
    cache: TokenCache = request.app.state.token_cache
    cached = cache.get(secret)
    if cached is not None:
        return Principal(cached.actor, cached.token.role, cached.token.id), cached.token
    own: list[m.ApiToken] = []

    async def lookup(generation: int) -> token_cache.CachedToken | str:
        found = await authenticate(session, secret)
        if not isinstance(found, Authenticated):
            return found  # unknown, revoked or expired token, or a disabled user
        own.append(found.token)
        return cache.put(secret, found.token, found.actor, aware(found.token.expires_at),
                         generation)

    # Requests of the same token arriving while it is looked up share that one lookup.
    verdict, _ = await cache.verify_once(secret, lookup)
    if isinstance(verdict, str):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, verdict,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    # The request that looked it up keeps its session's own instance, as before.
    token = own[0] if own else verdict.token
    return Principal(verdict.actor, token.role, token.id), token


async def _from_cookie(request: Request, session: AsyncSession) -> tuple[Principal, m.ApiToken]:
    live = await browser_session(request, session)
    if live is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if isinstance(live, str):  # unknown, ended or expired session, or its token unusable
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, live,
                            headers={"WWW-Authenticate": "Bearer"})
    check_csrf(request, live)
    return live.principal(), live.who.token


Reader = Annotated[m.ApiToken, Depends(require("read"))]
Operator = Annotated[m.ApiToken, Depends(require("operate"))]
# POST /api/v1/runs: technicians start ordinary runs, engineers abuse runs (labdaq.runs).
RunStarter = Annotated[m.ApiToken, Depends(require("operate", "abuse"))]
Admin = Annotated[m.ApiToken, Depends(require("admin"))]
