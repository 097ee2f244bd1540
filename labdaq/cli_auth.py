"""`labdaq users …`, `labdaq token create|list|revoke` and `labdaq audit head|verify`.

These run on the machine with database access (no token needed); their changes are
audited with the local user's name and the role ``cli``. A secret is printed once, alone
on stdout, so scripts can capture it; everything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from labdaq.config import load_settings

users_app = typer.Typer(help="Users: the people who hold API tokens.")
token_app = typer.Typer(help="API tokens: create (the secret is shown once), list, revoke.")
audit_app = typer.Typer(help="The audit log: print its head, verify its chain.")

DataDir = Annotated[Path | None, typer.Option(help="data directory (SQLite file, journals)")]
DbUrl = Annotated[str | None, typer.Option(help="SQLAlchemy database URL")]
Expiry = Annotated[
    str, typer.Option(help="lifetime: 90d, 12h, 30m, or 'never'", show_default=True)
]

T = TypeVar("T")


def parse_expiry(text: str) -> timedelta | None:
    if text.strip().lower() == "never":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", text.lower())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r}: expected e.g. 90d, 12h, 30m or 'never'")
    n, unit = int(match.group(1)), match.group(2)
    delta = {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[unit]
    if delta > timedelta(days=3660):
        raise typer.BadParameter(f"{text!r}: at most 3660 days (or 'never')")
    return delta


def _run(data_dir: Path | None, database_url: str | None,
         work: Callable[[Any], Awaitable[T]]) -> T:
    """``work(session)`` in one transaction on the configured database."""
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    s = load_settings(data_dir=data_dir, database_url=database_url)

    async def main() -> T:
        engine = create_engine(s.resolved_database_url)
        try:
            maker = sessionmaker(engine, audit_head_file=s.audit_head_file)
            async with session_scope(maker) as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {getattr(exc, 'message', None) or exc}", err=True)
    return typer.Exit(1)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Option(help="the user's name (unique)")],
    role: Annotated[str, typer.Option(help="technician | engineer | admin")],
    token: Annotated[bool, typer.Option(help="also issue a first token, printed once")] = True,
    expires_in: Expiry = "90d",
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a user (the first admin bootstraps the lab) and print their first token."""
    from labdaq import auth
    from labdaq.errors import LabdaqError

    lifetime = parse_expiry(expires_in)

    async def work(session: Any) -> str | None:
        user = await auth.create_user(session, name, role, actor=_me())
        if not token:
            return None
        _row, secret = await auth.issue_token(session, user, f"{name} (first)", _me(), lifetime)
        return secret

    try:
        secret = _run(data_dir, database_url, work)
    except LabdaqError as exc:
        raise _fail(exc) from exc
    typer.echo(f"user {name!r} created with role {role}", err=True)
    if secret:
        typer.echo(secret)


@users_app.command("list")
def users_list(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List users: id, name, role, created, disabled."""
    from labdaq import auth

    async def work(session: Any) -> list[dict[str, Any]]:
        return [auth.user_view(u) for u in await auth.list_users(session)]

    for u in _run(data_dir, database_url, work):
        disabled = f"disabled {u['disabled_at']:%Y-%m-%d}" if u["disabled_at"] else "active"
        typer.echo(f"{u['id']:>4}  {u['name']:<24} {u['role']:<11} {disabled}")


def _me() -> str:
    from labdaq.audit import _local_user

    return _local_user()


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="who or what uses the token")],
    role: Annotated[
        str | None, typer.Option(help="technician | engineer | admin (default: the user's)")
    ] = None,
    user: Annotated[str | None, typer.Option(help="the user it acts for (`labdaq users`)")] = None,
    expires_in: Expiry = "90d",
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a bearer token; the secret is printed once and only its hash is stored."""
    from labdaq import auth
    from labdaq.errors import LabdaqError
    from labdaq.storage import models as m

    lifetime = parse_expiry(expires_in)

    async def work(session: Any) -> str:
        if user is not None:
            owner = await auth.get_user(session, user)
            if role is not None and role != owner.role:
                raise ValueError(
                    f"user {user!r} has role {owner.role}; a token has its user's role"
                )
            return (await auth.issue_token(session, owner, name, _me(), lifetime))[1]
        # A token without a user (a service, a script): named by itself in the audit log.
        r = role or "technician"
        expires_at = None if lifetime is None else m.utcnow() + lifetime
        secret = await auth.create_token(session, name, r, expires_at=expires_at)
        session.add(m.Event(kind="audit", message=f"token {name!r} created with role {r}",
                            data={"before": None, "after": {"name": name, "role": r,
                                  "expires_at": None if expires_at is None
                                  else expires_at.isoformat()}}))
        return secret

    try:
        secret = _run(data_dir, database_url, work)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except LabdaqError as exc:
        raise _fail(exc) from exc
    typer.echo(secret)


@token_app.command("list")
def token_list(
    all_: Annotated[bool, typer.Option("--all", help="include revoked and expired")] = False,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """List tokens without their secrets: id, name, user, role, state, expiry."""
    from labdaq import auth

    async def work(session: Any) -> list[dict[str, Any]]:
        rows = await auth.list_tokens(session, include_inactive=all_)
        return [auth.token_view(t, u) for t, u in rows]

    for t in _run(data_dir, database_url, work):
        expires = f"{t['expires_at']:%Y-%m-%d %H:%M}Z" if t["expires_at"] else "never"
        typer.echo(f"{t['id']:>4}  {t['name']:<24} {t['user'] or '-':<16} {t['role']:<11} "
                   f"{t['state']:<8} expires {expires}")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="the token's id (`labdaq token list`)")],
    reason: Annotated[str | None, typer.Option(help="why, for the audit log")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Revoke a token: refused (401) from now on."""
    from labdaq import auth
    from labdaq.errors import LabdaqError

    async def work(session: Any) -> str:
        token, _user = await auth.revoke_token(session, token_id, actor=_me(), reason=reason)
        return token.name

    try:
        name = _run(data_dir, database_url, work)
    except LabdaqError as exc:
        raise _fail(exc) from exc
    typer.echo(f"token {token_id} {name!r} revoked")


@audit_app.command("head")
def audit_head(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Print the chain's head as SEQ:SHA256; keep it (a notebook, another machine) to prove
    later with `labdaq audit verify --head` that nothing up to it was cut or rewritten."""
    from labdaq.audit import read_head

    async def work(session: Any) -> tuple[int, str]:
        return await read_head(await session.connection())

    seq, sha = _run(data_dir, database_url, work)
    typer.echo(f"{seq}:{sha}")


@audit_app.command("verify")
def audit_verify(
    head: Annotated[
        str | None, typer.Option(help="a head printed earlier by `labdaq audit head`")
    ] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Check the audit chain; name every record changed, removed or inserted. Exit 1 if any."""
    from labdaq.audit import parse_head, verify

    try:
        given = parse_head(head) if head is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    s = load_settings(data_dir=data_dir, database_url=database_url)

    async def work(session: Any) -> Any:
        return await verify(await session.connection(), s.audit_head_file, given)

    result = _run(data_dir, database_url, work)
    for problem in result.problems:
        typer.echo(f"FAIL {problem}")
    if not result.ok:
        raise typer.Exit(1)
    typer.echo(f"ok: {result.records} records, head {result.last_seq}:{result.last_sha256}")
