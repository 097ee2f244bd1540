"""CLI commands meet a database that is missing, unmigrated or unreachable with a message.

Every command registered on the ``labdaq`` Typer app is wrapped: a database error becomes
two lines on stderr (what is wrong, what to run) and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import typer
from sqlalchemy import exc as sa_exc

UPGRADE_HINT = (
    "run `labdaq db upgrade` (with the same --data-dir / --database-url) to create or "
    "migrate the schema"
)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreachable(exc: BaseException) -> bool:
    # asyncpg reports a refused connection as a bare OSError ("Connect call failed").
    return isinstance(exc, ConnectionError) or (
        isinstance(exc, OSError) and "connect call failed" in str(exc).lower()
    )


def explain(exc: BaseException) -> str | None:
    """What went wrong and what to run, for a database error; None for anything else."""
    if isinstance(exc, sa_exc.DBAPIError | sa_exc.TimeoutError):
        reason = _first_line(exc)
        low = reason.lower()
        missing_relation = "does not exist" in low and "relation" in low
        if "no such table" in low or "no such column" in low or missing_relation:
            return f"the database has no labdaq schema, or an older one ({reason}).\n{UPGRADE_HINT}"
        if "unable to open database file" in low:
            return (
                f"cannot open the SQLite database ({reason}): check that --data-dir exists "
                f"and is writable.\nThen {UPGRADE_HINT}"
            )
        if "database is locked" in low:
            return "the SQLite database is locked by another process; retry when it is free"
        if "does not exist" in low and "database" in low:
            return (
                f"the PostgreSQL database does not exist ({reason}): create it "
                f"(createdb), then {UPGRADE_HINT}"
            )
        return (
            f"the database refused the command ({reason}).\nIf it is new or labdaq was "
            f"upgraded, {UPGRADE_HINT}"
        )
    if _unreachable(exc):
        return (
            f"cannot reach the database ({_first_line(exc)}): check --database-url / "
            "LABDAQ_DATABASE_URL and that the server is running.\n"
            f"If it is a new database, {UPGRADE_HINT}"
        )
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            # Alembic and asyncio wrap the database's error; the message is in the chain.
            for link in _chain(exc):
                message = explain(link)
                if message is not None:
                    typer.echo(f"labdaq: {message}", err=True)
                    raise typer.Exit(2) from None
            raise

    return wrapper


def wrap_commands(app: typer.Typer) -> None:
    """Wrap every command of ``app`` and of its sub-apps (call after all are registered)."""
    for command in app.registered_commands:
        if command.callback is not None:
            command.callback = friendly(command.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            wrap_commands(group.typer_instance)
