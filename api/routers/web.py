"""The web dashboard's pages (server-rendered shells; their data comes from the JSON API
with the browser's session cookie) and its assets: our JS and CSS, and plotly.js from the
installed `plotly` wheel, so nothing is fetched from outside the lab network.

Every page but the sign-in needs a live browser session (labdaq.web_sessions): without one
the URL redirects to the sign-in, and a page the session's role may not use answers 403
itself, not just its data requests."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

import labdaq
from labdaq import auth
from labdaq.api.deps import Admin, CellId, RunId, Session
from labdaq.api.session_cookie import browser_session
from labdaq.imports.readers import FORMATS
from labdaq.instruments_service import list_instruments
from labdaq.web_sessions import Current

_HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=str(_HERE / "templates"))
router = APIRouter(include_in_schema=False)

# Our own assets, by name; nothing else under /ui/static is served.
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@lru_cache(maxsize=1)
def _plotly_js() -> bytes:
    # The minified bundle the plotly wheel ships for offline use (plotly.offline).
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()


def _page(request: Request, name: str, page: str, **ctx: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"page": page, "version": labdaq.__version__, **ctx})


async def _guarded(request: Request, session: Session, grants: tuple[str, ...], name: str,
                   page: str, **ctx: object) -> Response:
    """The page for a session whose role holds any of ``grants``; the sign-in (303) for a
    browser without a live session; 403 for another role."""
    live = await browser_session(request, session)
    if not isinstance(live, Current):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/signin?next={quote(target, safe='')}",
                                status.HTTP_303_SEE_OTHER)
    role = live.who.token.role
    if not any(role in auth.ROLE_GRANTS[g] for g in grants):
        return templates.TemplateResponse(request, "denied.html", {
            "page": "denied", "version": labdaq.__version__, "title": "Not allowed",
            "role": role, "needs": " or ".join(grants), "what": ctx.get("title", page),
        }, status_code=status.HTTP_403_FORBIDDEN)
    return _page(request, name, page, **ctx)


READ, OPERATE, ADMIN, EVALUATE = ("read",), ("operate", "abuse"), ("admin",), ("evaluate",)


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, session: Session) -> Response:
    return await _guarded(request, session, READ, "overview.html", "overview", title="Lab")


@router.get("/signin", response_class=HTMLResponse)
async def signin(request: Request) -> HTMLResponse:
    return _page(request, "signin.html", "signin", title="Sign in")


@router.get("/runs/new", response_class=HTMLResponse)
async def start_run(request: Request, session: Session) -> Response:
    return await _guarded(request, session, OPERATE, "start.html", "start",
                          title="Start a run")


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, session: Session, run_id: RunId) -> Response:
    return await _guarded(request, session, READ, "run.html", "run", title=f"Run {run_id}",
                          run_id=run_id)


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, session: Session) -> Response:
    return await _guarded(request, session, READ, "queue.html", "queue", title="Queues")


@router.get("/cells/{cell_id}", response_class=HTMLResponse)
async def cell_page(request: Request, session: Session, cell_id: CellId) -> Response:
    return await _guarded(request, session, READ, "cell.html", "cell",
                          title=f"Cell {cell_id}", cell_id=cell_id)


@router.get("/imports/new", response_class=HTMLResponse)
async def import_page(request: Request, session: Session) -> Response:
    return await _guarded(request, session, EVALUATE, "import.html", "import",
                          title="Import a cycler file", formats=sorted(FORMATS))


@router.get("/admin", response_class=HTMLResponse)
async def admin_page(request: Request, session: Session) -> Response:
    return await _guarded(request, session, ADMIN, "admin.html", "admin", title="Admin")


@router.get("/ui/admin/instruments", response_class=HTMLResponse)
async def admin_instruments(request: Request, session: Session, _: Admin) -> HTMLResponse:
    """The admin page's content (instruments, users, tokens), rendered here and only for
    an admin (the /admin page itself answers 403 to another role)."""
    users = [auth.user_view(u) for u in await auth.list_users(session)]
    tokens = [auth.token_view(t, u)
              for t, u in await auth.list_tokens(session, include_inactive=False)]
    return templates.TemplateResponse(request, "admin_instruments.html", {
        "instruments": await list_instruments(session), "users": users, "tokens": tokens})


@router.get("/ui/static/plotly.min.js")
async def plotly_js() -> Response:
    return Response(_plotly_js(), media_type="text/javascript",
                    headers={"Cache-Control": "public, max-age=86400"})


@router.get("/ui/static/{name}")
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise HTTPException(404, f"no asset {name!r}")
    return Response((_HERE / "static" / name).read_bytes(), media_type=_ASSETS[name],
                    headers={"Cache-Control": "no-cache"})
