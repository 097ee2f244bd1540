"""Users: the people who hold tokens; only admins list, create, re-role or disable them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from labdaq import auth as service
from labdaq.api.auth_schemas import UserCreate, UserOut, UserPatch
from labdaq.api.deps import Admin, Session
from labdaq.api.problems import COMMON, OPERATE, responses
from labdaq.bounds import INT32_MAX

router = APIRouter(prefix="/api/v1/users", tags=["users"])

UserId = Annotated[int, Path(ge=1, le=INT32_MAX, description="user id")]


@router.get("", response_model=list[UserOut], responses=responses(*COMMON, *OPERATE))
async def list_users(session: Session, _: Admin) -> list[UserOut]:
    return [UserOut(**service.user_view(u)) for u in await service.list_users(session)]


@router.post("", response_model=UserOut, status_code=status.HTTP_201_CREATED,
             responses=responses(*COMMON, *OPERATE, 409))
async def create_user(body: UserCreate, session: Session, token: Admin) -> UserOut:
    user = await service.create_user(session, body.name, body.role, actor=token.name)
    await session.commit()
    return UserOut(**service.user_view(user))


@router.patch("/{user_id}", response_model=UserOut,
              responses=responses(*COMMON, *OPERATE, 404, 409))
async def update_user(user_id: UserId, body: UserPatch, session: Session, token: Admin) -> UserOut:
    """Change a role (the user's tokens follow) or disable/enable; 409 for the last admin."""
    user = await service.update_user(session, user_id, actor=token.name, role=body.role,
                                     disabled=body.disabled, reason=body.reason)
    await session.commit()
    return UserOut(**service.user_view(user))
