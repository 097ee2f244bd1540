"""The dashboard's browser sessions: a token is given once at sign-in, and from then on a
cookie holding a random session id stands for it. Only SHA-256 hashes of the session id
and of its CSRF token are stored (as for tokens). A session ends at its expiry, at
sign-out, when revoked, or as soon as its token could no longer be used (revoked,
expired, user disabled). Sign-in, sign-out and revocation are audited."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.audit import Principal, set_principal
from labdaq.auth import Authenticated, authenticate, aware, hash_token, judge
from labdaq.errors import Unauthenticated
from labdaq.storage import models as m


@dataclass(frozen=True)
class SignedIn:
    """A new session: its row and the two secrets for the browser's cookies (never
    stored)."""

    row: m.WebSession
    sid: str
    csrf: str
    who: Authenticated


@dataclass(frozen=True)
class Current:
    """A live session, the token it acts as and that token's user."""

    row: m.WebSession
    who: Authenticated

    def principal(self) -> Principal:
        token = self.who.token
        return Principal(self.who.actor, token.role, token.id, web_session_id=self.row.id)

    def csrf_ok(self, presented: str | None) -> bool:
        """Whether the CSRF token the page sent back is this session's."""
        if not presented:
            return False
        return hmac.compare_digest(hash_token(presented), self.row.csrf_sha256)


async def sign_in(session: AsyncSession, secret: str, ttl: timedelta) -> SignedIn:
    """A session for the token ``secret``: it lasts ``ttl``, never past the token's own
    expiry. An unusable token is refused (401) and nothing is stored."""
    found = await authenticate(session, secret)
    if not isinstance(found, Authenticated):
        raise Unauthenticated(found)
    expires = m.utcnow() + ttl
    token_expires = aware(found.token.expires_at)
    if token_expires is not None:
        expires = min(expires, token_expires)
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    row = m.WebSession(sid_sha256=hash_token(sid), csrf_sha256=hash_token(csrf),
                       token_id=found.token.id, expires_at=expires)
    session.add(row)
    await session.flush()
    current = Current(row, found)
    set_principal(session.info, current.principal())
    session.add(m.Event(
        kind="audit", actor=found.actor,
        message=f"signed in to the dashboard (session {row.id}, token {found.token.id})",
        data={"web_session": row.id, "expires_at": expires.isoformat()},
    ))
    return SignedIn(row, sid, csrf, found)


async def current(session: AsyncSession, sid: str) -> Current | str:
    """The live session the cookie ``sid`` names, else why it is refused."""
    row = (await session.execute(
        select(m.WebSession, m.ApiToken, m.User)
        .join(m.ApiToken, m.ApiToken.id == m.WebSession.token_id)
        .outerjoin(m.User, m.User.id == m.ApiToken.user_id)
        .where(m.WebSession.sid_sha256 == hash_token(sid))
    )).first()
    if row is None:
        return "unknown session"
    web, token, user = row
    if web.revoked_at is not None:
        return "the session has ended"
    expires = aware(web.expires_at)
    if expires is not None and expires <= m.utcnow():
        return "the session has expired"
    found = judge(token, user)
    if not isinstance(found, Authenticated):
        return f"the session's {found}"
    return Current(web, found)


async def sign_out(session: AsyncSession, live: Current) -> None:
    """End the session now (audited); its cookie is refused from here on."""
    set_principal(session.info, live.principal())
    live.row.revoked_at = m.utcnow()
    session.add(m.Event(
        kind="audit", actor=live.who.actor,
        message=f"signed out of the dashboard (session {live.row.id})",
        data={"web_session": live.row.id},
    ))
    await session.flush()
