"""Pydantic schemas of users, tokens and the audit log (kept apart from the ORM models)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from labdaq.api.schemas import UtcDatetime
from labdaq.bounds import Text

RoleName = Literal["technician", "engineer", "admin"]
# Column-sized (String(100)), one line.
ShortName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")
]
Reason = Annotated[Text, StringConstraints(max_length=1000)]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ShortName
    role: RoleName


class UserPatch(BaseModel):
    """Fields to change; a disabled user's tokens are refused (401)."""

    model_config = ConfigDict(extra="forbid")

    role: RoleName | None = None
    disabled: StrictBool | None = None  # 0 and 1 are not booleans
    reason: Reason | None = None


class UserOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: UtcDatetime
    disabled_at: UtcDatetime | None


class TokenCreate(BaseModel):
    """A token for a user, with the user's role; it expires after ``expires_in_days``
    (null: never)."""

    model_config = ConfigDict(extra="forbid")

    user: ShortName = Field(description="the user's name")
    name: ShortName = Field(description="what the token is for (a laptop, a script)")
    expires_in_days: int | None = Field(default=90, ge=1, le=3660)


class TokenRevoke(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason | None = None


class TokenOut(BaseModel):
    """A token as listed: never its secret."""

    id: int
    name: str
    role: str
    user: str | None
    created_at: UtcDatetime
    expires_at: UtcDatetime | None
    revoked_at: UtcDatetime | None
    state: Literal["active", "expired", "revoked"]


class TokenIssued(TokenOut):
    token: str = Field(description="the secret; shown this once, only its hash is stored")


class AuditRecordOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    ts_utc: str
    actor: str
    role: str
    action: str
    run_id: int | None
    data: dict[str, Any]
    before: Any
    after: Any
    reason: str | None
    prev_sha256: str
    sha256: str


class AuditHeadOut(BaseModel):
    seq: int
    sha256: str
    head: str = Field(description="SEQ:SHA256, as `labdaq audit head` prints it")


class SignIn(BaseModel):
    """The dashboard's sign-in: the token, given once; a session cookie stands for it."""

    model_config = ConfigDict(extra="forbid")

    token: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class SignedIn(BaseModel):
    session_id: int
    name: str
    role: RoleName
    expires_at: UtcDatetime
