"""The dashboard's session cookie on the HTTP side: setting and clearing the cookies,
finding the browser session a request carries, and refusing cross-site changes made with
it (CSRF).

CSRF protection is a double-submit token checked against the session, with an Origin
check in front, as Django does: at sign-in the browser gets a readable `labdaq_csrf`
cookie next to the HttpOnly session cookie, and every change it makes with the session
(POST, PUT, PATCH, DELETE) must carry the same value in the `X-CSRF-Token` header. The
server compares it with the hash stored for that session, so a token planted in another
cookie does not pass. Another site's page cannot read the cookie, so it cannot send the
header; a form it submits has none. A request whose `Origin` header names another origin is
refused first. SameSite=Strict keeps the cookie off requests from other sites, but
127.0.0.1 on another port is the same site, so the token is what stops those. Bearer-token
requests carry no cookie identity and are not checked: a browser never adds an
Authorization header by itself."""

from __future__ import annotations

from datetime import datetime

from fastapi import HTTPException, Request, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq import web_sessions
from labdaq.web_sessions import Current

SESSION_COOKIE = "labdaq_session"
CSRF_COOKIE = "labdaq_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def set_cookies(request: Request, response: Response, signed: web_sessions.SignedIn) -> None:
    expires: datetime = signed.row.expires_at
    # Secure when the browser reached us over https (directly or through a proxy that
    # uvicorn trusts); a plain-http lab URL could not send a Secure cookie back.
    secure = request.url.scheme == "https"
    response.set_cookie(SESSION_COOKIE, signed.sid, expires=expires, path="/",
                        secure=secure, httponly=True, samesite="strict")
    # Readable by our page's script, which sends it back in the CSRF header.
    response.set_cookie(CSRF_COOKIE, signed.csrf, expires=expires, path="/",
                        secure=secure, httponly=False, samesite="strict")


def clear_cookies(response: Response) -> None:
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", samesite="strict")


def same_origin(request: Request) -> bool:
    """False when the request says it comes from a page of another origin. Browsers send
    Origin with every cross-origin POST/PUT/PATCH/DELETE; tools may send none."""
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


async def browser_session(request: Request, session: AsyncSession) -> Current | str | None:
    """The live session the request's cookie names, why it is refused, or None without a
    cookie."""
    sid = request.cookies.get(SESSION_COOKIE)
    if not sid:
        return None
    return await web_sessions.current(session, sid)


def check_csrf(request: Request, live: Current) -> None:
    """Refuse (403) a change made with the session cookie that did not come from our
    page."""
    if request.method in SAFE_METHODS:
        return
    if not same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "cross-origin request refused (Origin is not this service)")
    if not live.csrf_ok(request.headers.get(CSRF_HEADER)):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"missing or wrong {CSRF_HEADER} header for this session")
