"""The web dashboard's pages (server-rendered shells; their data comes from the JSON API
with the token the browser keeps) and its assets: our JS and CSS, and plotly.js from the
installed `plotly` wheel, so nothing is fetched from outside the lab network."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

import labdaq
from labdaq import auth
from labdaq.api.deps import Admin, CellId, RunId, Session
from labdaq.instruments_service import list_instruments

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
        request, name, {"page": page, "version": labdaq.__version__, **ctx}
    )


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> HTMLResponse:
    return _page(request, "overview.html", "overview", title="Lab")


@router.get("/signin", response_class=HTMLResponse)
async def signin(request: Request) -> HTMLResponse:
    return _page(request, "signin.html", "signin", title="Sign in")


@router.get("/runs/new", response_class=HTMLResponse)
async def start_run(request: Request) -> HTMLResponse:
    return _page(request, "start.html", "start", title="Start a run")


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, run_id: RunId) -> HTMLResponse:
    return _page(request, "run.html", "run", title=f"Run {run_id}", run_id=run_id)


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request) -> HTMLResponse:
    return _page(request, "queue.html", "queue", title="Queues")


@router.get("/cells/{cell_id}", response_class=HTMLResponse)
async def cell_page(request: Request, cell_id: CellId) -> HTMLResponse:
    return _page(request, "cell.html", "cell", title=f"Cell {cell_id}", cell_id=cell_id)


@router.get("/admin", response_class=HTMLResponse)
async def admin_page(request: Request) -> HTMLResponse:
    return _page(request, "admin.html", "admin", title="Admin")


@router.get("/ui/admin/instruments", response_class=HTMLResponse)
async def admin_instruments(request: Request, session: Session, _: Admin) -> HTMLResponse:
    """The admin page's content (instruments, users, tokens), rendered here and only for
    an admin token: opening /admin with another role gets this request refused (403), not
    just a hidden link."""
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
