"""The dashboard's browser sessions in-process, on SQLite and PostgreSQL: sign-in with a
token sets an HttpOnly, SameSite=Strict session cookie (Secure over https) whose id is
stored only hashed; changes made with it need the CSRF header and our own Origin; pages
that need a role answer 403 (or send to the sign-in) on their URL; sign-out, expiry and
the token's revocation end the session; bearer clients are unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

CELL = {"serial": "WS-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
        "discharge_cutoff_v": 2.5}
BASE = "http://127.0.0.1:8000"


class Lab:
    def __init__(self, app: Any, tokens: dict[str, str], url: str) -> None:
        self.app, self.tokens, self.url = app, tokens, url

    def client(self, base: str = BASE,
               cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=base,
                                 cookies=cookies)

    async def rows(self, stmt: Any) -> list[Any]:
        engine = create_engine(self.url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return list((await s.execute(stmt)).all())
        finally:
            await engine.dispose()

    async def run(self, stmt: Any) -> None:
        engine = create_engine(self.url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                await s.execute(stmt)
        finally:
            await engine.dispose()


@pytest.fixture
async def lab(db_url: str) -> AsyncIterator[Lab]:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        tokens = {role: await create_token(s, f"ws-{role}", role)
                  for role in ("technician", "engineer", "admin")}
    await engine.dispose()
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        yield Lab(app, tokens, db_url)


async def _sign_in(c: httpx.AsyncClient, token: str) -> httpx.Response:
    r = await c.post("/api/v1/session", json={"token": token})
    assert r.status_code == 201, r.text
    return r


def _set_cookies(r: httpx.Response) -> dict[str, Any]:
    jar: dict[str, Any] = {}
    for header in r.headers.get_list("set-cookie"):
        jar.update(SimpleCookie(header))
    return jar


async def test_sign_in_sets_strict_httponly_cookie_stored_hashed_and_audited(lab: Lab) -> None:
    async with lab.client() as c:
        r = await _sign_in(c, lab.tokens["technician"])
        body = r.json()
        assert body["role"] == "technician" and body["name"] == "ws-technician"
        cookies = _set_cookies(r)
        sid, csrf = cookies["labdaq_session"], cookies["labdaq_csrf"]
        assert sid["httponly"] is True and sid["samesite"] == "strict"
        assert not sid["secure"]  # plain http: a Secure cookie would never come back
        assert csrf["samesite"] == "strict" and not csrf["httponly"]  # the page reads it
        who = await c.get("/api/v1/whoami")
        assert who.status_code == 200 and who.json()["role"] == "technician"
    # Only hashes are stored: neither secret appears in the row.
    ((row,),) = await lab.rows(select(m.WebSession))
    assert sid.value not in (row.sid_sha256, row.csrf_sha256)
    assert csrf.value not in (row.sid_sha256, row.csrf_sha256)
    assert len(row.sid_sha256) == 64 and row.revoked_at is None
    audit = await lab.rows(select(m.AuditRecord.actor, m.AuditRecord.action,
                                  m.AuditRecord.data))
    signed = [a for a in audit if a.action.startswith("signed in to the dashboard")]
    assert len(signed) == 1 and signed[0].actor == "ws-technician"
    assert signed[0].data["web_session_id"] == row.id


async def test_cookie_is_secure_over_https(lab: Lab) -> None:
    async with lab.client("https://127.0.0.1:8443") as c:
        r = await _sign_in(c, lab.tokens["engineer"])
    cookies = _set_cookies(r)
    assert cookies["labdaq_session"]["secure"] and cookies["labdaq_csrf"]["secure"]


async def test_unknown_token_or_other_origin_cannot_sign_in(lab: Lab) -> None:
    async with lab.client() as c:
        r = await c.post("/api/v1/session", json={"token": "ldq_nope"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = await c.post("/api/v1/session", json={"token": lab.tokens["admin"]},
                         headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        # A form post (no JSON body) is no sign-in either.
        r = await c.post("/api/v1/session", data={"token": lab.tokens["admin"]})
        assert r.status_code == 422
    assert await lab.rows(select(m.WebSession)) == []


async def test_changes_with_the_cookie_need_the_csrf_header_and_our_origin(lab: Lab) -> None:
    async with lab.client() as c:
        r = await _sign_in(c, lab.tokens["technician"])
        csrf = _set_cookies(r)["labdaq_csrf"].value
        no_header = await c.post("/api/v1/cells", json=CELL)
        assert no_header.status_code == 403 and "X-CSRF-Token" in no_header.json()["detail"]
        wrong = await c.post("/api/v1/cells", json=CELL, headers={"X-CSRF-Token": "x" + csrf})
        assert wrong.status_code == 403
        foreign = await c.post("/api/v1/cells", json=CELL, headers={
            "X-CSRF-Token": csrf, "Origin": "http://127.0.0.1:9999"})
        assert foreign.status_code == 403 and "Origin" in foreign.json()["detail"]
        assert (await lab.rows(select(m.Cell.id).where(m.Cell.serial == "WS-001"))) == []
        ok = await c.post("/api/v1/cells", json=CELL, headers={
            "X-CSRF-Token": csrf, "Origin": BASE})
        assert ok.status_code == 201, ok.text
    # The change is audited as the session's token, naming the session.
    ((data,),) = await lab.rows(select(m.AuditRecord.data).where(
        m.AuditRecord.action.like("%WS-001%")))
    ((sid,),) = await lab.rows(select(m.WebSession.id))
    assert data["web_session_id"] == sid


async def test_bearer_clients_are_unchanged(lab: Lab) -> None:
    async with lab.client() as c:
        h = {"Authorization": f"Bearer {lab.tokens['technician']}"}
        # No cookie, no CSRF header: a bearer token is not something a browser sends alone.
        r = await c.post("/api/v1/cells", json=CELL, headers=h)
        assert r.status_code == 201, r.text
        assert (await c.get("/api/v1/whoami")).status_code == 401
        # A bearer token wins over a session cookie of another role.
        await _sign_in(c, lab.tokens["admin"])
        r = await c.get("/api/v1/tokens", headers=h)
        assert r.status_code == 403


async def test_pages_need_a_session_and_the_role(lab: Lab) -> None:
    async with lab.client() as c:
        r = await c.get("/admin?x=1")
        assert r.status_code == 303
        assert r.headers["location"] == "/signin?next=%2Fadmin%3Fx%3D1"
        assert (await c.get("/signin")).status_code == 200
        await _sign_in(c, lab.tokens["technician"])
        for path in ("/", "/queue", "/runs/new"):
            assert (await c.get(path)).status_code == 200, path
        for path in ("/admin", "/imports/new"):
            r = await c.get(path)
            assert r.status_code == 403, path
            assert "technician" in r.text
        assert (await c.get("/ui/admin/instruments")).status_code == 403
    async with lab.client() as c:
        await _sign_in(c, lab.tokens["engineer"])
        assert (await c.get("/imports/new")).status_code == 200
        assert (await c.get("/runs/new")).status_code == 200  # abuse runs
        assert (await c.get("/admin")).status_code == 403
    async with lab.client() as c:
        await _sign_in(c, lab.tokens["admin"])
        assert (await c.get("/admin")).status_code == 200
        assert (await c.get("/ui/admin/instruments")).status_code == 200


async def test_sign_out_ends_the_session_and_is_audited(lab: Lab) -> None:
    async with lab.client() as c:
        r = await _sign_in(c, lab.tokens["technician"])
        csrf = _set_cookies(r)["labdaq_csrf"].value
        sid = c.cookies["labdaq_session"]
        # Sign-out is a change too: not without the CSRF header.
        assert (await c.delete("/api/v1/session")).status_code == 403
        assert (await c.get("/api/v1/whoami")).status_code == 200
        out = await c.delete("/api/v1/session", headers={"X-CSRF-Token": csrf})
        assert out.status_code == 204
        assert "labdaq_session" not in c.cookies
        assert (await c.get("/api/v1/whoami")).status_code == 401
    # The old cookie, replayed, is refused: the session ended on the server.
    async with lab.client(cookies={"labdaq_session": sid}) as c:
        r = await c.get("/api/v1/whoami")
        assert r.status_code == 401 and "ended" in r.json()["detail"]
        assert (await c.get("/")).status_code == 303
    ((revoked,),) = await lab.rows(select(m.WebSession.revoked_at))
    assert revoked is not None
    actions = [a for (a,) in await lab.rows(select(m.AuditRecord.action))]
    assert any(a.startswith("signed out of the dashboard") for a in actions)


async def test_signing_in_again_ends_the_browsers_previous_session(lab: Lab) -> None:
    async with lab.client() as c:
        await _sign_in(c, lab.tokens["technician"])
        first = c.cookies["labdaq_session"]
        await _sign_in(c, lab.tokens["admin"])
        assert (await c.get("/api/v1/whoami")).json()["role"] == "admin"
    async with lab.client(cookies={"labdaq_session": first}) as c:
        assert (await c.get("/api/v1/whoami")).status_code == 401
    states = await lab.rows(select(m.WebSession.id, m.WebSession.revoked_at)
                            .order_by(m.WebSession.id))
    assert [revoked is not None for _, revoked in states] == [True, False]
    audit = {a: actor for a, actor in await lab.rows(
        select(m.AuditRecord.action, m.AuditRecord.actor))}
    # Each record names its own session's user.
    assert audit[f"signed out of the dashboard (session {states[0].id})"] == "ws-technician"
    signed_in = [a for a in audit if a.startswith(f"signed in to the dashboard (session "
                                                  f"{states[1].id},")]
    assert [audit[a] for a in signed_in] == ["ws-admin"]


async def test_expiry_and_token_revocation_end_the_session(lab: Lab) -> None:
    async with lab.client() as c:
        await _sign_in(c, lab.tokens["technician"])
        await lab.run(update(m.WebSession).values(expires_at=m.utcnow() - timedelta(seconds=1)))
        r = await c.get("/api/v1/whoami")
        assert r.status_code == 401 and "expired" in r.json()["detail"]
    async with lab.client() as c:
        await _sign_in(c, lab.tokens["engineer"])
        assert (await c.get("/api/v1/whoami")).status_code == 200
        await lab.run(update(m.ApiToken).where(m.ApiToken.name == "ws-engineer")
                      .values(revoked_at=m.utcnow()))
        r = await c.get("/api/v1/whoami")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]


async def test_session_never_outlives_its_token(db_url: str) -> None:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        token = await create_token(s, "short", "technician",
                                   expires_at=m.utcnow() + timedelta(hours=1))
    await engine.dispose()
    app = create_app(Settings(database_url=db_url, web_session_ttl_s=7 * 24 * 3600))
    async with app.router.lifespan_context(app):
        lab = Lab(app, {}, db_url)
        async with lab.client() as c:
            body = (await _sign_in(c, token)).json()
    ((token_expires, session_expires),) = await lab.rows(
        select(m.ApiToken.expires_at, m.WebSession.expires_at)
        .join(m.WebSession, m.WebSession.token_id == m.ApiToken.id))
    assert session_expires == token_expires
    assert body["expires_at"].startswith(str(token_expires.date()))
