"""The dashboard's sign-in and sign-out (labdaq.web_sessions): a token in, a session cookie
out (labdaq.api.session_cookie); sign-out ends the session and clears the cookies."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, HTTPException, Request, Response, status

from labdaq import web_sessions as service
from labdaq.api.auth_schemas import SignedIn, SignIn
from labdaq.api.deps import Session
from labdaq.api.problems import COMMON, OPERATE, responses
from labdaq.api.session_cookie import (
    browser_session,
    check_csrf,
    clear_cookies,
    same_origin,
    set_cookies,
)

# The dashboard's, like its pages: not in the API document, whose clients use bearer
# tokens (and whose role matrix lists endpoints that need a role; these need a token
# or a session of any role). tests/test_web_sessions.py covers them.
router = APIRouter(prefix="/api/v1/session", tags=["session"], include_in_schema=False)


@router.post("", response_model=SignedIn, status_code=status.HTTP_201_CREATED,
             responses=responses(*COMMON, *OPERATE))
async def sign_in(body: SignIn, request: Request, response: Response,
                  session: Session) -> SignedIn:
    """Start a browser session for the token (audited), ending the one the browser's
    cookie held, if any. The answer sets an HttpOnly session cookie and the readable CSRF
    cookie whose value changes must send back in ``X-CSRF-Token``. API clients keep
    using ``Authorization: Bearer``."""
    if not same_origin(request):
        # Another site must not sign a browser in to a session of its choosing.
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin sign-in refused")
    previous = await browser_session(request, session)
    if isinstance(previous, service.Current):
        # This browser signs in anew: the session its cookie held ends (audited, as its
        # own user) rather than living on unseen until it expires. A refused sign-in
        # below rolls this back with the rest of the request.
        await service.sign_out(session, previous)
    ttl = timedelta(seconds=request.app.state.settings.web_session_ttl_s)
    signed = await service.sign_in(session, body.token, ttl)
    await session.commit()
    set_cookies(request, response, signed)
    token = signed.who.token
    return SignedIn(session_id=signed.row.id, name=token.name,
                    role=token.role,  # type: ignore[arg-type]  # a Role value
                    expires_at=signed.row.expires_at)

@router.delete("", status_code=status.HTTP_204_NO_CONTENT,
               responses=responses(*COMMON, *OPERATE))
async def sign_out(request: Request, session: Session) -> Response:
    """End this browser's session (audited) and clear its cookies. Without a live session
    only the cookies are cleared."""
    live = await browser_session(request, session)
    if isinstance(live, service.Current):
        check_csrf(request, live)
        await service.sign_out(session, live)
        await session.commit()
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_cookies(response)
    return response
