"""The audit log: chained, append-only in the database, anchored outside it.

`labdaq audit verify` passes on an untouched database and names the record after an
UPDATE, a DELETE or an INSERT made directly in SQLite (triggers dropped for the tamper
step), and a truncated or recomputed chain through the head file or a kept head; both
databases refuse UPDATE and DELETE; concurrent appenders on separate connections never
fork the chain.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from labdaq.audit import GENESIS, Anchor, check_chain, record_hash, verify
from labdaq.cli import app
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout


def _chain(n: int) -> list[dict[str, Any]]:
    rows, prev = [], GENESIS
    for seq in range(1, n + 1):
        row: dict[str, Any] = {
            "seq": seq, "ts_utc": f"2026-12-06T10:00:0{seq}.000000Z", "actor": "alice",
            "role": "admin", "action": f"change {seq}", "run_id": None, "data": {"x": seq},
            "before": {"v": 1.1}, "after": {"v": 2.2}, "reason": None, "prev_sha256": prev,
        }
        row["sha256"] = prev = record_hash(row)
        rows.append(row)
    return rows


def _rehash(rows: list[dict[str, Any]], start: int) -> None:
    """What a careful forger does: recompute every hash from ``start`` on."""
    prev = rows[start - 1]["sha256"] if start else GENESIS
    for row in rows[start:]:
        row["prev_sha256"] = prev
        row["sha256"] = prev = record_hash(row)


def test_check_chain_names_each_kind_of_tampering() -> None:
    rows = _chain(5)
    head = Anchor("head file", 5, rows[-1]["sha256"], current=True)
    assert check_chain(rows, [head]).ok

    changed = [dict(r) for r in rows]
    changed[1]["after"] = {"v": 9.9}
    assert check_chain(changed).problems == [
        "record 2 changed: its content does not match its hash (action now 'change 2', "
        "by 'alice')"]

    removed = [r for r in rows if r["seq"] != 3]
    (problem,) = check_chain(removed).problems
    assert problem.startswith("record 3 removed")

    # Inserted with a valid hash at the end: only the anchor knows it does not belong.
    forged = [dict(r) for r in rows] + [{**rows[-1], "seq": 6, "action": "forged"}]
    _rehash(forged, 5)
    assert check_chain(forged).ok
    (problem,) = check_chain(forged, [head]).problems
    assert problem.startswith("record 6 is after the head file")

    # Truncated, or rewritten and recomputed from record 2: consistent in itself.
    assert check_chain(rows[:3]).ok
    (problem,) = check_chain(rows[:3], [head]).problems
    assert "records 4-5 removed (truncated)" in problem
    rewritten = [dict(r) for r in rows]
    rewritten[1]["actor"] = "mallory"
    _rehash(rewritten, 1)
    assert check_chain(rewritten).ok
    (problem,) = check_chain(rewritten, [head]).problems
    assert problem == "record 5 is not the one the head file anchors: the chain was rewritten"
    # A head kept earlier still holds for the records it covers; newer ones are fine.
    kept = Anchor("head given", 3, rows[2]["sha256"], current=False)
    assert check_chain(rows, [kept]).ok
    assert not check_chain(rewritten, [kept]).ok


@pytest.fixture(scope="module")
def audited_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A data directory whose audit log holds changes made through the CLI; its head."""
    data = tmp_path_factory.mktemp("audited")
    d = ("--data-dir", str(data))
    assert _cli("db", "upgrade", *d)[0] == 0
    code, out = _cli("users", "create", "--name", "alice", "--role", "admin", *d)
    assert code == 0 and out.strip().startswith("ldq_"), out
    assert _cli("token", "create", "--name", "script", "--role", "engineer", *d)[0] == 0
    assert _cli("token", "create", "--name", "nb", "--user", "alice", "--expires-in", "12h",
                *d)[0] == 0
    assert _cli("token", "revoke", "2", "--reason", "left on a bench", *d)[0] == 0
    code, head = _cli("audit", "head", *d)
    assert code == 0 and head.startswith("5:"), head
    with sqlite3.connect(data / "labdaq.db") as db:  # everything in the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return data, head.strip()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("labdaq.db", "audit-head"):
        shutil.copy(src / name, dst / name)
    return dst


def _tamper(data: Path, *sql: str) -> None:
    with sqlite3.connect(data / "labdaq.db") as db:
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute("DROP TRIGGER audit_log_no_delete")
        for stmt in sql:
            db.execute(stmt)


def test_cli_records_who_and_verify_passes_untouched(audited_lab) -> None:
    data, head = audited_lab
    code, out = _cli("audit", "verify", "--data-dir", str(data))
    assert code == 0 and out.startswith(f"ok: 5 records, head {head}"), out
    assert _cli("audit", "verify", "--head", head, "--data-dir", str(data))[0] == 0
    with sqlite3.connect(data / "labdaq.db") as db:
        rows = db.execute("SELECT seq, role, action, reason FROM audit_log ORDER BY seq").fetchall()
    assert [r[1] for r in rows] == ["cli"] * 5
    assert rows[0][2] == "user 'alice' created with role admin"
    assert rows[4][2].startswith("token 2 'script' revoked") and rows[4][3] == "left on a bench"
    code, listed = _cli("token", "list", "--all", "--data-dir", str(data))
    assert "revoked" in listed and "ldq_" not in listed, listed


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (["UPDATE audit_log SET reason = 'no reason' WHERE seq = 3"], "record 3 changed"),
        (["DELETE FROM audit_log WHERE seq = 2"], "record 2 removed"),
        # A row inserted at the end: its hash is not what it claims, and it is past the head.
        (["INSERT INTO audit_log (seq, ts_utc, actor, role, action, run_id, data, before, "
          "after, reason, prev_sha256, sha256) SELECT 6, ts_utc, 'mallory', 'admin', "
          "'backdated approval', NULL, '{}', NULL, NULL, NULL, sha256, "
          "'ab' || substr(sha256, 3) FROM audit_log WHERE seq = 5"], "record 6 changed"),
        # Cut at the end and the head row moved back: only the head file knows.
        (["DELETE FROM audit_log WHERE seq > 3",
          "UPDATE audit_head SET seq = 3, sha256 = (SELECT sha256 FROM audit_log WHERE seq = 3)"],
         "records 4-5 removed (truncated)"),
    ],
    ids=["update", "delete", "insert", "truncate"],
)
def test_verify_names_the_tampered_record(audited_lab, tmp_path: Path, sql: list[str],
                                          named: str) -> None:
    src, head = audited_lab
    data = _copy(src, tmp_path / "copy")
    _tamper(data, *sql)
    code, out = _cli("audit", "verify", "--data-dir", str(data))
    assert code == 1 and named in out, out
    assert "FAIL" in out


def test_verify_finds_a_recomputed_chain_through_the_head(audited_lab, tmp_path: Path) -> None:
    src, head = audited_lab
    data = _copy(src, tmp_path / "copy")
    with sqlite3.connect(data / "labdaq.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM audit_log ORDER BY seq")]
    for r in rows:
        for k in ("data", "before", "after"):
            r[k] = json.loads(r[k]) if r[k] is not None else None
    rows[1]["actor"] = "mallory"
    _rehash(rows, 1)
    stmts = ["DELETE FROM audit_log"]
    for r in rows:
        vals = ", ".join(
            "NULL" if v is None else
            "'" + (json.dumps(v) if isinstance(v, dict) else str(v)).replace("'", "''") + "'"
            for v in (r[k] for k in ("seq", "ts_utc", "actor", "role", "action", "run_id",
                                     "data", "before", "after", "reason", "prev_sha256",
                                     "sha256")))
        stmts.append(f"INSERT INTO audit_log VALUES ({vals})")
    stmts.append(f"UPDATE audit_head SET sha256 = '{rows[-1]['sha256']}'")
    _tamper(data, *stmts)
    # Consistent in itself: without an anchor outside the database nothing shows.
    (data / "audit-head").unlink()
    code, out = _cli("audit", "verify", "--head", head, "--data-dir", str(data))
    assert code == 1 and "record 5 is not the one the head given anchors" in out, out
    assert "no head file" in out
    shutil.copy(src / "audit-head", data / "audit-head")
    code, out = _cli("audit", "verify", "--data-dir", str(data))
    assert code == 1 and "the chain was rewritten" in out, out


async def _append(engine: Any, n: int, who: str) -> None:
    maker = sessionmaker(engine)
    for i in range(n):
        async with session_scope(maker) as s:
            s.add(m.Event(kind="audit", message=f"{who} change {i}", actor=who,
                          data={"before": {"i": i}, "after": {"i": i + 1}}))


async def test_database_refuses_update_and_delete_and_appenders_never_fork(
    db_url: str,
) -> None:
    # Three appenders on their own connections (as three API processes would be).
    engines = [create_engine(db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(_append(e, 8, f"p{i}") for i, e in enumerate(engines)))
        async with engines[0].connect() as conn:
            result = await verify(conn)
        assert result.ok and result.records == 24, result.problems
        for stmt in ("UPDATE audit_log SET actor = 'x' WHERE seq = 1",
                     "DELETE FROM audit_log WHERE seq = 24",
                     *(("TRUNCATE audit_log",) if db_url.startswith("postgresql") else ())):
            async with engines[0].connect() as conn:
                with pytest.raises(DBAPIError, match="append-only"):
                    await conn.execute(text(stmt))
        async with engines[0].connect() as conn:
            assert (await verify(conn)).ok
    finally:
        for e in engines:
            await e.dispose()


def test_sqlite_head_file_follows_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'labdaq.db'}"
    upgrade(url)

    async def go() -> tuple[int, str]:
        engine = create_engine(url)
        try:
            await _append(engine, 3, "x")
            async with engine.connect() as conn:
                r = await verify(conn, tmp_path / "audit-head")
                assert r.ok, r.problems
                return r.last_seq, r.last_sha256
        finally:
            await engine.dispose()

    seq, sha = asyncio.run(go())
    doc = json.loads((tmp_path / "audit-head").read_text())
    assert (doc["seq"], doc["sha256"]) == (seq, sha) == (3, sha)


def test_token_lifetimes_parse() -> None:
    from datetime import timedelta

    import typer

    from labdaq.cli_auth import parse_expiry

    assert parse_expiry("90d") == timedelta(days=90)
    assert parse_expiry("12h") == timedelta(hours=12)
    assert parse_expiry("never") is None
    for bad in ("0d", "3y", "-1d", "99999d", ""):
        with pytest.raises(typer.BadParameter):
            parse_expiry(bad)


APPENDER = """
import asyncio, sys
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

async def main(url, who, n):
    engine = create_engine(url)
    try:
        async with engine.connect():
            pass  # connected: now wait for the others
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(n):
            async with session_scope(sessionmaker(engine)) as s:
                s.add(m.Event(kind="audit", message=f"{who} {i}", actor=who))
    finally:
        await engine.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow  # three interpreters starting: seconds on a busy machine
def test_appenders_in_separate_processes_never_fork(db_url: str) -> None:
    """Three OS processes append at once (as API processes do); one linear chain. (The
    same on three connections of one process is the fast test above.)"""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, db_url, f"p{i}", "15"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:  # all connected before any appends: their appends overlap
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        _, err = p.communicate("go\n", timeout=120)
        assert p.returncode == 0, err

    async def check() -> Any:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                return await verify(conn)
        finally:
            await engine.dispose()

    result = asyncio.run(check())
    assert result.ok and result.records == 45, result.problems
