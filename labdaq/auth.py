"""Bearer tokens: creation (secret shown once), hashing at rest, lookup and role checks."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.storage import models as m

# Which roles may do what. Admin may do everything.
ROLE_GRANTS: dict[str, set[str]] = {
    "read": {m.Role.technician, m.Role.engineer, m.Role.admin},
    "operate": {m.Role.technician, m.Role.admin},
    "admin": {m.Role.admin},
    # Judging runs against the benchmark catalogue and issuing reports.
    "evaluate": {m.Role.engineer, m.Role.admin},
}


def hash_token(token: str) -> str:
    # Tokens are 256-bit random values, so an unsalted SHA-256 is enough to make a stolen
    # database useless (no dictionary to attack), and lookup stays one indexed query.
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(session: AsyncSession, name: str, role: str) -> str:
    if role not in {r.value for r in m.Role}:
        raise ValueError(f"unknown role {role!r}; expected one of {[r.value for r in m.Role]}")
    token = "ldq_" + secrets.token_urlsafe(32)
    session.add(m.ApiToken(name=name, role=role, token_sha256=hash_token(token)))
    await session.flush()
    return token


async def lookup_token(session: AsyncSession, token: str) -> m.ApiToken | None:
    row = await session.scalar(
        select(m.ApiToken).where(m.ApiToken.token_sha256 == hash_token(token))
    )
    if row is None or row.revoked_at is not None:
        return None
    return row


# `labdaq serve --sim` names its technician tokens demo-<unix time>.
DEMO_TOKEN_PREFIX = "demo-"


async def revoke_demo_tokens(session: AsyncSession) -> int:
    """Revoke every live demo token (one per earlier `serve --sim` start); how many."""
    rows = (
        await session.scalars(
            select(m.ApiToken).where(
                m.ApiToken.name.startswith(DEMO_TOKEN_PREFIX, autoescape=True),
                m.ApiToken.revoked_at.is_(None),
            )
        )
    ).all()
    now = m.utcnow()
    for row in rows:
        row.revoked_at = now
    if rows:
        session.add(m.Event(kind="audit", message=f"revoked {len(rows)} earlier demo token(s)"))
    return len(rows)
