"""The CLI on an unmigrated, missing or unreachable database: a message, never a traceback;
and `serve --sim`'s demo tokens: each start revokes the earlier ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from labdaq.auth import DEMO_TOKEN_PREFIX, create_token, lookup_token, revoke_demo_tokens
from labdaq.cli import app
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/labdaq"  # nothing listens on port 1


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["token", "create", "--name", "x"], "labdaq db upgrade"),
        (["token", "create", "--name", "x", "--database-url", UNREACHABLE_PG],
         "cannot reach the database"),
        (["db", "upgrade", "--database-url", UNREACHABLE_PG], "cannot reach the database"),
        (["engine", "--database-url", UNREACHABLE_PG], "cannot reach the database"),
        (["engine"], "labdaq db upgrade"),
    ],
    ids=[
        "token-unmigrated", "token-unreachable", "upgrade-unreachable", "engine-unreachable",
        "engine-unmigrated",
    ],
)
def test_cli_database_problems_are_a_message(
    tmp_path: Path, args: list[str], says: str
) -> None:
    code, output = _invoke([*args, "--data-dir", str(tmp_path / "fresh")])
    assert code == 2, output
    assert says in output, output
    assert "Traceback" not in output and "sqlalchemy" not in output.lower(), output


def test_cli_token_create_works_after_upgrade(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "d")]
    assert _invoke(["db", "upgrade", *data])[0] == 0
    code, output = _invoke(["token", "create", "--name", "ci", *data])
    assert code == 0, output
    assert output.strip().startswith("ldq_")


def test_demo_tokens_are_revoked_by_the_next_start(sqlite_url: str) -> None:
    """What `serve --sim` does at each start: revoke earlier demo tokens, mint one."""

    async def start() -> tuple[str, int]:
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                revoked = await revoke_demo_tokens(s)
                token = await create_token(s, f"{DEMO_TOKEN_PREFIX}x", "technician")
            return token, revoked
        finally:
            await engine.dispose()

    async def live(tokens: list[str]) -> list[bool]:
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return [await lookup_token(s, t) is not None for t in tokens]
        finally:
            await engine.dispose()

    async def other_token() -> str:
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return await create_token(s, "lab-admin", "admin")
        finally:
            await engine.dispose()

    admin = asyncio.run(other_token())
    tokens, revoked = [], []
    for _ in range(3):
        token, n = asyncio.run(start())
        tokens.append(token)
        revoked.append(n)
    assert revoked == [0, 1, 1]
    # Only the newest demo token works; a token someone created by hand is untouched.
    assert asyncio.run(live([*tokens, admin])) == [False, False, True, True]

    async def audit() -> list[str]:
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return list((await s.scalars(select(m.Event.message))).all())
        finally:
            await engine.dispose()

    assert asyncio.run(audit()).count("revoked 1 earlier demo token(s)") == 2
