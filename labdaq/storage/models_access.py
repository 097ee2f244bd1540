"""The tables of who may act and what they did: users, bearer tokens, web sessions, and
the hash-chained audit log with its head (labdaq.auth, labdaq.web_sessions, labdaq.audit).

One job: those tables' columns. ``models.py`` re-exports them (``m.ApiToken``, ...).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, utcnow


class Role(enum.StrEnum):
    technician = "technician"  # operates runs
    engineer = "engineer"  # reads, exports, evaluates
    admin = "admin"  # users, instruments, calibrations


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored: the secret is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    # The person the token acts for (tokens made before users existed have none); the
    # audit log names the user. A token past expires_at is refused like a revoked one.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    expires_at: Mapped[datetime | None] = mapped_column()


class WebSession(Base):
    """A browser's sign-in (labdaq.web_sessions): the dashboard's cookie holds the secret
    session id, of which only the SHA-256 is stored, as for tokens. The session acts as its
    token (role, audit actor) and ends at ``expires_at``, at sign-out or revocation, or when
    its token can no longer be used."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    sid_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # The CSRF token of the session (double-submit: the page sends it back in a header).
    csrf_sha256: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class User(Base):
    """A person (or service) who holds tokens; their role is given to the tokens they get.
    Never deleted (the audit log names them): disabled instead, which refuses their tokens."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column()


class AuditRecord(Base):
    """One change, append-only (the database refuses UPDATE and DELETE: triggers of
    migration 0008). ``sha256`` hashes the record with ``prev_sha256``, the previous
    record's hash, so a changed, removed or inserted row breaks the chain (labdaq.audit).
    No foreign keys: the record outlives whatever it names."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # ISO 8601 UTC text, exactly as hashed (a datetime column would round-trip differently
    # on SQLite and PostgreSQL).
    ts_utc: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(Integer, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(Text)
    # Unique: two records claiming the same predecessor would be a fork of the chain.
    prev_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """The chain's newest record (one row, id 1). Appenders update it first (a row lock on
    PostgreSQL, the write lock on SQLite, both held to commit), so concurrent processes
    append one after another and never fork the chain."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
