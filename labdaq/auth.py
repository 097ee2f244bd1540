"""Users and bearer tokens: creation (secret shown once), hashing at rest, expiry,
revocation, lookup and role checks. Every change writes an audit event."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.errors import Conflict, Invalid, NotFound
from labdaq.storage import models as m
from labdaq.token_cache import mark_auth_changed

# Which roles may do what. Admin may do everything.
ROLE_GRANTS: dict[str, set[str]] = {
    "read": {m.Role.technician, m.Role.engineer, m.Role.admin},
    "operate": {m.Role.technician, m.Role.admin},
    "admin": {m.Role.admin},
    # Judging runs against the benchmark catalogue and issuing reports.
    "evaluate": {m.Role.engineer, m.Role.admin},
    # Running an abuse protocol (abuse: true), which may exceed the cell's ratings.
    "abuse": {m.Role.engineer, m.Role.admin},
}


def hash_token(token: str) -> str:
    # Tokens are 256-bit random values, so an unsalted SHA-256 is enough to make a stolen
    # database useless (no dictionary to attack), and lookup stays one indexed query.
    return hashlib.sha256(token.encode()).hexdigest()


ROLES = tuple(r.value for r in m.Role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {list(ROLES)}")


def aware(ts: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything labdaq stores is UTC.
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


async def create_token(
    session: AsyncSession,
    name: str,
    role: str,
    *,
    user_id: int | None = None,
    expires_at: datetime | None = None,
) -> str:
    """A new token's secret (shown once; only its hash is stored)."""
    _check_role(role)
    token = "ldq_" + secrets.token_urlsafe(32)
    session.add(
        m.ApiToken(
            name=name, role=role, token_sha256=hash_token(token), user_id=user_id,
            expires_at=expires_at,
        )
    )
    await session.flush()
    return token


@dataclass(frozen=True)
class Authenticated:
    token: m.ApiToken
    user: m.User | None

    @property
    def actor(self) -> str:
        """Who the audit log names: the user, or for a token without one its name."""
        return self.user.name if self.user is not None else self.token.name


async def authenticate(session: AsyncSession, secret: str) -> Authenticated | str:
    """The token and its user, or why it is refused (unknown, revoked, expired, disabled)."""
    row = (
        await session.execute(
            select(m.ApiToken, m.User)
            .outerjoin(m.User, m.User.id == m.ApiToken.user_id)
            .where(m.ApiToken.token_sha256 == hash_token(secret))
        )
    ).first()
    if row is None:
        return "unknown token"
    return judge(*row)


def judge(token: m.ApiToken, user: m.User | None) -> Authenticated | str:
    """The token and its user if the token may be used now, else why not (revoked,
    expired, or its user disabled); a browser session is judged by its token too."""
    if token.revoked_at is not None:
        return "revoked token"
    expires = aware(token.expires_at)
    if expires is not None and expires <= m.utcnow():
        return "expired token"
    if user is not None and user.disabled_at is not None:
        return "the token's user is disabled"
    return Authenticated(token, user)


async def lookup_token(session: AsyncSession, token: str) -> m.ApiToken | None:
    """The token if it may be used (not unknown, revoked, expired or of a disabled user)."""
    found = await authenticate(session, token)
    return found.token if isinstance(found, Authenticated) else None


def token_state(token: m.ApiToken, now: datetime | None = None) -> str:
    if token.revoked_at is not None:
        return "revoked"
    expires = aware(token.expires_at)
    if expires is not None and expires <= (now or m.utcnow()):
        return "expired"
    return "active"


def token_view(token: m.ApiToken, user: m.User | None) -> dict[str, Any]:
    """A token as listed: never its secret or hash."""
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "user": user.name if user is not None else None,
        "created_at": aware(token.created_at),
        "expires_at": aware(token.expires_at),
        "revoked_at": aware(token.revoked_at),
        "state": token_state(token),
    }


def user_view(user: m.User) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "role": user.role,
        "created_at": aware(user.created_at),
        "disabled_at": aware(user.disabled_at),
    }


async def create_user(session: AsyncSession, name: str, role: str, actor: str) -> m.User:
    try:
        _check_role(role)
    except ValueError as exc:
        raise Invalid("invalid user", [{"loc": "role", "msg": str(exc)}]) from exc
    if await session.scalar(select(m.User.id).where(m.User.name == name)) is not None:
        raise Conflict(f"a user named {name!r} exists")
    user = m.User(name=name, role=role)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent request made the same user
        raise Conflict(f"a user named {name!r} exists") from exc
    session.add(m.Event(
        kind="audit", message=f"user {name!r} created with role {role}", actor=actor,
        data={"user_id": user.id, "before": None, "after": _plain(user_view(user))},
    ))
    return user


def _plain(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in view.items()}


async def get_user(session: AsyncSession, ref: int | str) -> m.User:
    q = select(m.User).where(m.User.id == ref if isinstance(ref, int) else m.User.name == ref)
    user = await session.scalar(q)
    if user is None:
        raise NotFound(f"no user {ref!r}")
    return user


async def list_users(session: AsyncSession) -> list[m.User]:
    return list((await session.scalars(select(m.User).order_by(m.User.id))).all())


async def update_user(
    session: AsyncSession,
    user_id: int,
    actor: str,
    role: str | None = None,
    disabled: bool | None = None,
    reason: str | None = None,
) -> m.User:
    """Change a user's role (their tokens follow) or disable/enable them."""
    user = await get_user(session, user_id)
    before = _plain(user_view(user))
    demoted = role is not None and role != m.Role.admin.value
    if user.role == m.Role.admin.value and user.disabled_at is None and (demoted or disabled):
        others = await session.scalar(
            select(m.User.id).where(
                m.User.role == m.Role.admin.value, m.User.disabled_at.is_(None),
                m.User.id != user.id,
            ).limit(1)
        )
        if others is None:
            # Nobody could then manage users or instruments through the API.
            raise Conflict(f"{user.name!r} is the last active admin: not disabled or demoted")
    if role is not None and role != user.role:
        try:
            _check_role(role)
        except ValueError as exc:
            raise Invalid("invalid user", [{"loc": "role", "msg": str(exc)}]) from exc
        user.role = role
        tokens = await session.scalars(select(m.ApiToken).where(m.ApiToken.user_id == user.id))
        for t in tokens:
            t.role = role
    if disabled is not None and disabled != (user.disabled_at is not None):
        user.disabled_at = m.utcnow() if disabled else None
    # The API's verified-token cache is dropped when this commits (labdaq.token_cache).
    mark_auth_changed(session.sync_session)
    after = _plain(user_view(user))
    if after != before:
        session.add(m.Event(
            kind="audit", actor=actor,
            message=f"user {user.name!r} edited: "
            + ", ".join(k for k in after if after[k] != before[k]),
            data={"user_id": user.id, "before": before, "after": after, "reason": reason},
        ))
    await session.flush()
    return user


async def issue_token(
    session: AsyncSession,
    user: m.User,
    name: str,
    actor: str,
    expires_in: timedelta | None,
) -> tuple[m.ApiToken, str]:
    """A token for ``user`` with the user's role; the row and the secret (shown once)."""
    if user.disabled_at is not None:
        raise Conflict(f"user {user.name!r} is disabled")
    expires_at = None if expires_in is None else m.utcnow() + expires_in
    secret = await create_token(session, name, user.role, user_id=user.id, expires_at=expires_at)
    token = await session.scalar(
        select(m.ApiToken).where(m.ApiToken.token_sha256 == hash_token(secret))
    )
    assert token is not None
    session.add(m.Event(
        kind="audit", actor=actor,
        message=f"token {token.id} {name!r} issued to {user.name!r} ({user.role})",
        data={"token_id_issued": token.id, "before": None,
              "after": _plain(token_view(token, user))},
    ))
    return token, secret


async def list_tokens(
    session: AsyncSession, include_inactive: bool = True
) -> list[tuple[m.ApiToken, m.User | None]]:
    rows = await session.execute(
        select(m.ApiToken, m.User)
        .outerjoin(m.User, m.User.id == m.ApiToken.user_id)
        .order_by(m.ApiToken.id)
    )
    out: list[tuple[m.ApiToken, m.User | None]] = [(t, u) for t, u in rows.all()]
    if not include_inactive:
        out = [(t, u) for t, u in out if token_state(t) == "active"]
    return out


async def revoke_token(
    session: AsyncSession, token_id: int, actor: str, reason: str | None = None
) -> tuple[m.ApiToken, m.User | None]:
    """Revoke a token (it is refused from now on); revoking it again changes nothing."""
    row = (
        await session.execute(
            select(m.ApiToken, m.User)
            .outerjoin(m.User, m.User.id == m.ApiToken.user_id)
            .where(m.ApiToken.id == token_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no token {token_id}")
    token, user = row
    if token.revoked_at is None:
        before = _plain(token_view(token, user))
        token.revoked_at = m.utcnow()
        mark_auth_changed(session.sync_session)
        session.add(m.Event(
            kind="audit", actor=actor, message=f"token {token.id} {token.name!r} revoked",
            data={"token_id_revoked": token.id, "before": before,
                  "after": _plain(token_view(token, user)), "reason": reason},
        ))
        await session.flush()
    return token, user


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
    mark_auth_changed(session.sync_session)
    if rows:
        session.add(m.Event(kind="audit", message=f"revoked {len(rows)} earlier demo token(s)"))
    return len(rows)
