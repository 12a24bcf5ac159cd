"""The browser pages of the HTTP server (main process): the chat page and the API docs.

GET / is the chat page (static/index.html, with its script and style under /web/), unless
--disable-web-ui. GET /docs (Swagger UI) and GET /redoc (ReDoc) render /openapi.json from assets
of the fastapi-offline package, served under /docs/assets/, so neither needs the internet. The
pages hold no secret and a browser cannot send a bearer token when it opens a URL, so they stay
open under --api-key (`PUBLIC_PATHS`, `PUBLIC_PREFIXES`); the chat page asks for the key and
sends it with its API calls.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CHAT_ASSETS = "/web"
DOCS_ASSETS = "/docs/assets"
DOCS, REDOC, OAUTH2_REDIRECT = "/docs", "/redoc", "/docs/oauth2-redirect"
# Open without the API key (besides the probes): the pages, their assets and the schema.
PUBLIC_PATHS = frozenset({"/", DOCS, REDOC, OAUTH2_REDIRECT, "/openapi.json"})
PUBLIC_PREFIXES = (CHAT_ASSETS + "/", DOCS_ASSETS + "/")
_REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
_EMPTY_SVG = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def docs_assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def register_pages(app: FastAPI, chat_page: bool = True) -> None:
    """Adds the docs pages, and the chat page when `chat_page`, to `app` (created with
    docs_url=None and redoc_url=None, so these replace FastAPI's CDN-loading ones)."""
    if chat_page:
        index = STATIC_DIR / "index.html"

        @app.get("/", include_in_schema=False)
        async def chat() -> FileResponse:
            return FileResponse(index, media_type="text/html")

        app.mount(CHAT_ASSETS, StaticFiles(directory=STATIC_DIR), name="web")

    # NOTE: ReDoc's sidebar shows a logo from cdn.redoc.ly, whatever its options; the script is
    # served with that image swapped for an empty inline one (a route before the mount wins).
    redoc_js = (docs_assets_dir() / "redoc.standalone.js").read_text(encoding="utf-8")
    redoc_js = redoc_js.replace(_REDOC_CDN_LOGO, _EMPTY_SVG)

    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_script() -> Response:
        return Response(redoc_js, media_type="application/javascript")

    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            # NOTE: Swagger UI's default validator is a badge image from swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
