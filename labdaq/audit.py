"""The audit log: every change as an append-only, SHA-256-chained record, and its check.

Writers record a change as before, ``session.add(m.Event(kind="audit", message=...,
data={"before": ..., "after": ..., "reason": ...}, actor=...))``; a flush hook appends each
such event to ``audit_log`` in the same transaction, with who (the authenticated principal
the API put on the session, else the local user of the CLI), their role, what, the UTC
time, before/after and reason. Each record carries the hash of the previous one; the
appender locks the chain head first so concurrent processes never fork it. After the
commit the new head is written to a head file in the data directory: an anchor outside
the database, so a chain truncated or recomputed in the database is found too.
:func:`verify` names each changed, removed or inserted record.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Table, event, insert, inspect, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapper, Session, object_session
from sqlalchemy.orm.util import identity_key

from labdaq.storage import models as m

GENESIS = "0" * 64
#: Role recorded for changes made on the machine with database access (the CLI).
LOCAL_ROLE = "cli"

# Keys of Session.info.
PRINCIPAL_KEY = "labdaq_principal"
HEAD_FILE_KEY = "labdaq_audit_head_file"
ORIGIN_KEY = "labdaq_origin"
_PENDING_KEY = "labdaq_audit_pending"

log = logging.getLogger(__name__)

_HEAD = cast(Table, m.AuditHead.__table__)
_LOG = cast(Table, m.AuditRecord.__table__)

#: Fields a record's hash covers, in the canonical JSON (keys sorted).
HASHED = (
    "seq", "ts_utc", "actor", "role", "action", "run_id", "data", "before", "after",
    "reason", "prev_sha256",
)


@dataclass(frozen=True)
class Principal:
    """Who a session acts for: a user (or, for tokens without one, the token's name)."""

    actor: str
    role: str
    token_id: int | None = None
    # The dashboard's browser session the change came through (labdaq.web_sessions).
    web_session_id: int | None = None


def set_principal(info: dict[str, Any], principal: Principal) -> None:
    """Record on a session's ``info`` who its changes are made by."""
    info[PRINCIPAL_KEY] = principal


def record_hash(fields: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces, exact floats)."""
    doc = {k: fields.get(k) for k in HASHED}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    # What JSON stores is what is hashed: dates and the like become their text now, so the
    # value read back hashes the same.
    return json.loads(json.dumps(value, default=str))


def utc_text(ts: datetime | None = None) -> str:
    return (ts or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _claim_next(conn: Connection) -> tuple[int, str]:
    """Lock the chain head for the rest of the transaction; the next seq and the hash of
    the record before it. One statement: an UPDATE of the head row takes PostgreSQL's row
    lock (a concurrent appender waits, then sees this one's head) and SQLite's write lock
    (the effect of BEGIN IMMEDIATE) before the head is read."""
    t = _HEAD
    row = conn.execute(
        update(t).where(t.c.id == 1).values(seq=t.c.seq + 1).returning(t.c.seq, t.c.sha256)
    ).first()
    if row is None:  # the migration seeds it; a database that lost it starts the chain
        conn.execute(insert(t).values(id=1, seq=1, sha256=GENESIS))
        return 1, GENESIS
    return int(row[0]), str(row[1])


def append(
    conn: Connection,
    *,
    actor: str,
    role: str,
    action: str,
    run_id: int | None = None,
    data: dict[str, Any] | None = None,
    before: Any = None,
    after: Any = None,
    reason: str | None = None,
) -> tuple[int, str]:
    """Append one record under the head lock (in the caller's transaction); its seq and hash."""
    seq, prev = _claim_next(conn)
    row: dict[str, Any] = {
        "seq": seq,
        "ts_utc": utc_text(),
        "actor": actor[:200],
        "role": role[:20],
        "action": action,
        "run_id": run_id,
        "data": _plain(data or {}),
        "before": _plain(before),
        "after": _plain(after),
        "reason": reason,
        "prev_sha256": prev,
    }
    row["sha256"] = record_hash(row)
    conn.execute(insert(_LOG).values(**row))
    conn.execute(update(_HEAD).where(_HEAD.c.id == 1).values(sha256=row["sha256"]))
    return row["seq"], row["sha256"]


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


@event.listens_for(m.Event, "before_insert")
def _chain_audit_event(_mapper: Mapper[Any], conn: Connection, target: m.Event) -> None:
    """Every audit event also becomes a chained record, in the same transaction."""
    if target.kind != "audit":
        return
    session = object_session(target)
    info: dict[str, Any] = session.info if session is not None else {}
    data = dict(target.data or {})
    before, after = data.pop("before", None), data.pop("after", None)
    reason = data.pop("reason", None)
    principal: Principal | None = info.get(PRINCIPAL_KEY)
    if principal is not None:
        actor, role = principal.actor, principal.role
        if principal.token_id is not None:
            data["token_id"] = principal.token_id
        if principal.web_session_id is not None:
            data["web_session_id"] = principal.web_session_id
    elif info.get(ORIGIN_KEY) == "api":
        actor, role = target.actor or "unknown", "unknown"
    else:  # the CLI (or `serve`) on the machine itself
        actor, role = target.actor or _local_user(), LOCAL_ROLE
        data["os_user"] = _local_user()
    if target.actor and target.actor != actor:
        data["as"] = target.actor
    if before is None and after is None and target.run_id is not None and session is not None:
        before, after = _run_change(session, target.run_id)
    head = append(
        conn, actor=actor, role=role, action=target.message, run_id=target.run_id,
        data=data, before=before, after=after,
        reason=None if reason is None else str(reason),
    )
    if session is not None:
        info[_PENDING_KEY] = (head, conn.engine.url)


#: Columns of a run whose change an audit event on the run records as before/after when
#: its writer gave none (stop, pause, resume requests).
RUN_AUDITED = ("state", "requested_action", "end_reason", "ended_at")


def _run_change(session: Session, run_id: int) -> tuple[Any, Any]:
    """The run's audited columns changed in this flush: (before, after), or (None, None).
    Runs are flushed before their events (foreign key), and history lasts the flush."""
    run = session.identity_map.get(identity_key(m.Run, run_id))
    if run is None:
        return None, None
    state = inspect(run)
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for key in RUN_AUDITED:
        hist = state.attrs[key].history
        if hist.added or hist.deleted:
            before[key] = hist.deleted[0] if hist.deleted else None
            after[key] = hist.added[0] if hist.added else None
    return (before, after) if after else (None, None)


@event.listens_for(Session, "after_commit")
def _anchor_after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING_KEY, None)
    if pending is not None:
        (seq, sha), url = pending
        path = session.info.get(HEAD_FILE_KEY) or default_head_file(url)
        try:
            write_head_file(Path(path), _database_id(url), seq, sha)
        except OSError:
            # The change is committed; failing the request now would say it was not.
            # `labdaq audit verify` will name the records the file does not anchor.
            log.exception("could not write the audit head file %s", path)


_HEAD_FILES: dict[str, Path] = {}


def remember_head_file(url: str | URL, path: Path) -> None:
    """The head file of this database for this process (load_settings calls it, so the
    CLI's sessions advance the file its settings name, --data-dir included)."""
    _HEAD_FILES[_database_key(url)] = path


def default_head_file(url: str | URL) -> Path:
    """Where the head file of this database lives (Settings.audit_head_file)."""
    known = _HEAD_FILES.get(_database_key(url))
    return known if known is not None else _default_head_file(
        make_url(url).render_as_string(False))


@functools.cache
def _default_head_file(url: str) -> Path:
    # Reading the settings costs more than the append itself: once per database.
    from labdaq.config import load_settings

    return load_settings(database_url=url).audit_head_file


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


# --- the anchor outside the database -------------------------------------------------


def _database_key(url: str | URL) -> str:
    """The database itself, within this machine (a SQLite file by its full path)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"sqlite:{Path(u.database or '').resolve()}"
    return _database_id(u)


def _database_id(url: str | URL) -> str:
    """The database a head belongs to, without driver or password."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        # The head file lives next to the file: its name is enough, and a database moved or
        # restored with its directory keeps its anchor.
        return f"sqlite:{Path(u.database or '').name}"
    return f"{u.get_backend_name()}://{u.host or ''}:{u.port or ''}/{u.database or ''}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_head_file(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else None


def write_head_file(path: Path, database: str, seq: int, sha256: str) -> None:
    """Advance the head file to ``seq`` (never back: processes commit in any order)."""
    with _locked(path):
        cur = read_head_file(path)
        if cur is not None and cur.get("database") == database and int(cur.get("seq", 0)) >= seq:
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"database": database, "seq": seq, "sha256": sha256}, fh)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


# --- verification --------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A head kept somewhere else: the record ``seq`` must have hash ``sha256``.
    ``current``: it is meant to be the newest record (the head row, the head file), so
    records after it were added outside labdaq."""

    name: str
    seq: int
    sha256: str
    current: bool


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:SHA256`` as printed by ``labdaq audit head``."""
    seq, _, sha = text.strip().partition(":")
    if not seq.isdigit() or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"not a head (SEQ:SHA256 as `labdaq audit head` prints): {text!r}")
    return int(seq), sha


@dataclass
class Verification:
    records: int
    last_seq: int
    last_sha256: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chain(rows: Iterable[dict[str, Any]], anchors: Iterable[Anchor] = ()) -> Verification:
    """Walk the records in seq order; name every one that was changed, removed or inserted."""
    problems: list[str] = []
    hashes: dict[int, str] = {}
    expected_seq, expected_prev, count = 1, GENESIS, 0
    for row in rows:
        count += 1
        seq = int(row["seq"])
        if seq != expected_seq:
            gone = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
            problems.append(f"record {gone} removed (record {seq} follows {expected_seq - 1})")
        elif row["prev_sha256"] != expected_prev:
            problems.append(
                f"record {seq} does not follow record {seq - 1} (inserted, or the chain "
                f"recomputed from there)"
            )
        if record_hash(row) != row["sha256"]:
            problems.append(
                f"record {seq} changed: its content does not match its hash "
                f"(action now {row['action']!r}, by {row['actor']!r})"
            )
        hashes[seq] = row["sha256"]
        expected_seq, expected_prev = seq + 1, row["sha256"]
    last_seq = expected_seq - 1
    for a in anchors:
        if a.seq > last_seq:
            problems.append(
                f"the chain ends at record {last_seq} but the {a.name} anchors record {a.seq}: "
                f"records {last_seq + 1}-{a.seq} removed (truncated)"
            )
        elif a.seq > 0 and hashes.get(a.seq) != a.sha256:
            problems.append(
                f"record {a.seq} is not the one the {a.name} anchors: the chain was rewritten"
            )
        elif a.current and last_seq > a.seq:
            problems.append(
                f"record {a.seq + 1} is after the {a.name} (record {a.seq}): inserted outside "
                f"labdaq (or a process stopped between its commit and writing the head file)"
            )
    return Verification(count, last_seq, expected_prev, problems)


async def read_head(conn: AsyncConnection) -> tuple[int, str]:
    t = _HEAD
    row = (await conn.execute(select(t.c.seq, t.c.sha256).where(t.c.id == 1))).first()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


async def verify(
    conn: AsyncConnection, head_file: Path | None = None, head: tuple[int, str] | None = None
) -> Verification:
    """Check the whole chain against its head row, the head file and a head kept by the lab."""
    anchors = []
    db_seq, db_sha = await read_head(conn)
    anchors.append(Anchor("database's head row", db_seq, db_sha, current=True))
    database = _database_id(conn.engine.url)
    file_problems: list[str] = []
    if head_file is not None:
        doc = read_head_file(head_file)
        if doc is None:
            if db_seq > 0:
                file_problems.append(f"no head file at {head_file}")
        elif doc.get("database") != database:
            file_problems.append(f"the head file {head_file} anchors {doc.get('database')}")
        else:
            anchors.append(
                Anchor(f"head file {head_file}", int(doc["seq"]), str(doc["sha256"]), True)
            )
    if head is not None:
        anchors.append(Anchor("head given", head[0], head[1], current=False))
    result = await conn.stream(select(_LOG).order_by(_LOG.c.seq))
    rows: list[dict[str, Any]] = []
    async for part in result.mappings().partitions(5000):
        rows.extend(dict(r) for r in part)
    out = check_chain(rows, anchors)
    out.problems[:0] = file_problems
    return out
