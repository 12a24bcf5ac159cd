"""The standalone HTTP router (its own process): `python -m srt router --worker-urls URL ...`.

In: OpenAI and SGLang requests (POST /v1/completions, /v1/chat/completions, /generate; GET
/v1/models). Out: the response of the srt server ("worker") the request was routed to, passed
through unchanged, SSE streams included; every proxied response carries `x-srt-worker: URL`.
The router's own routes: GET /health (200 while some worker is up) and GET /workers (each
worker's state, load and index size).

Routing is `srt.managers.router` over the workers, with text-level keys: the UTF-8 bytes of a
prompt (the first one of a batch), of chat messages rendered as `role\\ncontent\\n\\n` each, or
the token ids of a token prompt; the kind of key and the request's `cache_salt` form the cache
namespace. The prefix index holds at most --max-tree-size bytes per worker.

Failures: a worker that refuses connections is marked down (its index is forgotten) and the
request goes to another; a background check (GET /health every --health-check-interval s) marks
workers down and up again. A worker that fails mid-request gives the client a 502 (an SSE error
event then `data: [DONE]` on a stream); no worker up gives a 503. Both carry an OpenAI-style
error body. A client that goes away closes its upstream request, so the worker aborts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from srt.entrypoints.openai.protocol import SSE_DONE, error_body, sse_event
from srt.entrypoints.router_args import RouterArgs
from srt.entrypoints.uvicorn_serve import serve_and_announce
from srt.managers.router import NoReplicaError, make_router

logger = logging.getLogger(__name__)

# Request headers passed on to a worker; the rest (host, content-length, ...) are the
# connection's own.
_FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept")
# Response headers passed back to the client.
_FORWARD_RESPONSE_HEADERS = ("content-type", "retry-after", "cache-control", "x-accel-buffering")
# How often a non-streaming proxy checks that its client is still there.
_DISCONNECT_POLL_S = 1.0
_HEALTH_TIMEOUT_S = 3.0

T = TypeVar("T")


# ---- routing keys -----------------------------------------------------------------------------


def routing_key(path: str, body: Any) -> tuple[list[int], str]:
    """The prefix key and cache namespace of a request body (an empty key when the body has
    no recognizable prompt: the worker will answer its error)."""
    if not isinstance(body, dict):
        return [], ""
    salt = body.get("cache_salt")
    salt = salt if isinstance(salt, str) else ""
    if path == "/v1/chat/completions":
        return list(_render_messages(body.get("messages")).encode()), "chat:" + salt
    prompt = body.get("prompt") if path == "/v1/completions" else body.get("text")
    if prompt is None and path == "/generate":
        prompt = body.get("input_ids")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, str):
        return list(prompt.encode("utf-8", errors="replace")), "text:" + salt
    if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < 2**32 for t in prompt):
        return list(prompt), "ids:" + salt
    return [], ""


def _render_messages(messages: Any) -> str:
    """Chat messages as text whose prefixes follow the conversation's: `role\\ncontent\\n\\n`."""
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        parts.append(f"{m.get('role', '')}\n{content if content is not None else ''}\n\n")
    return "".join(parts)


# ---- the proxy ---------------------------------------------------------------------------------


class WorkerDown(Exception):
    """A worker failed while answering; the message says how."""


class Router:
    """The workers, their routing state, and the HTTP client that reaches them."""

    def __init__(self, args: RouterArgs) -> None:
        self.args = args
        self.urls = list(args.worker_urls)
        self.policy = make_router(
            args.load_balance_method,
            len(self.urls),
            args.max_tree_size,
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
        )
        timeout = httpx.Timeout(args.request_timeout, connect=5.0)
        # NOTE: no connection limit: a stream holds its connection as long as it runs.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.client.aclose()

    def mark(self, i: int, up: bool) -> None:
        if self.policy.available[i] != up:
            logger.warning("worker %s is %s", self.urls[i], "up" if up else "down")
        self.policy.set_available(i, up)

    async def check_health(self) -> None:
        async def one(i: int) -> None:
            try:
                r = await self.client.get(self.urls[i] + "/health", timeout=_HEALTH_TIMEOUT_S)
                self.mark(i, r.status_code == 200)
            except httpx.HTTPError:
                self.mark(i, False)

        await asyncio.gather(*(one(i) for i in range(len(self.urls))))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.health_check_interval)
            try:
                await self.check_health()
            except Exception:  # never let the checker die
                logger.exception("health check failed")

    def workers(self) -> list[dict[str, Any]]:
        d = self.policy.describe()
        out = []
        for i, url in enumerate(self.urls):
            w = {"url": url, "available": d["available"][i], "load": d["loads"][i]}
            w["routed"] = d["routed"][i]
            if "index_tokens" in d:
                w["index_tokens"] = d["index_tokens"][i]
            out.append(w)
        return out

    async def open(
        self, method: str, path: str, key: list[int], namespace: str, body: bytes, headers: dict
    ) -> tuple[int, httpx.Response]:
        """Routes and sends a request, trying another worker while the chosen one refuses
        connections. Returns the worker and its response (body not read yet; the caller closes
        it and releases the worker). NoReplicaError when no worker is up."""
        while True:
            i = self.policy.choose(key, namespace)
            req = self.client.build_request(
                method, self.urls[i] + path, content=body, headers=headers
            )
            try:
                return i, await self.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # Nothing reached the worker, so another one may safely take the request.
                self.policy.release(i)
                logger.warning("worker %s refused the connection (%s)", self.urls[i], e)
                self.mark(i, False)
            except BaseException:
                self.policy.release(i)
                raise


def _error(status: int, message: str, type: str = "server_error") -> JSONResponse:
    return JSONResponse(error_body(message, type, code=status), status_code=status)


async def _until_disconnect(
    aw: Awaitable[T],
    request: Request,
    orphan: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """Awaits `aw`, cancelling it (and raising ClientGone) if the client goes away first.
    `orphan(result)` disposes of a result that arrived while the cancel was under way."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                result = await task
                if orphan is not None:
                    await orphan(result)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_router_app(args: RouterArgs) -> FastAPI:
    router = Router(args)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.close()

    app = FastAPI(title="srt router", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> Response:
        if any(router.policy.available):
            return Response(status_code=200)
        return _error(503, "no worker is up")

    @app.get("/workers")
    async def workers() -> Response:
        return JSONResponse({"method": router.policy.method, "workers": router.workers()})

    async def proxy(request: Request, path: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None  # the worker answers the malformed body with its own 400
        key, namespace = routing_key(path, parsed)
        headers = {k: v for k, v in request.headers.items() if k in _FORWARD_REQUEST_HEADERS}

        async def orphan(opened: tuple[int, httpx.Response]) -> None:
            router.policy.release(opened[0])
            await opened[1].aclose()

        try:
            i, resp = await _until_disconnect(
                router.open(request.method, path, key, namespace, body, headers), request, orphan
            )
        except NoReplicaError:
            return _error(503, "no worker is up to serve the request")
        except ClientGone:
            return _error(499, "client disconnected", "client_closed_request")
        except httpx.HTTPError as e:
            return _error(502, f"the worker failed before answering: {type(e).__name__}: {e}")
        url = router.urls[i]
        released = False

        async def finish() -> None:
            nonlocal released
            if not released:
                released = True
                router.policy.release(i)
                await resp.aclose()

        out_headers = {
            k: v for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE_HEADERS
        }
        out_headers["x-srt-worker"] = url
        if resp.headers.get("content-type", "").startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                except httpx.HTTPError as e:
                    message = f"the worker {url} failed mid-stream: {type(e).__name__}: {e}"
                    logger.warning("%s", message)
                    yield sse_event({"error": error_body(message, "server_error", code=502)})
                    yield SSE_DONE
                finally:
                    await finish()

            return StreamingResponse(
                relay(),
                status_code=resp.status_code,
                headers=out_headers,
                background=BackgroundTask(finish),
            )
        try:
            content = await _until_disconnect(resp.aread(), request)
        except ClientGone:
            return _error(499, "client disconnected", "client_closed_request")
        except httpx.HTTPError as e:
            return _error(502, f"the worker {url} failed while answering: {type(e).__name__}: {e}")
        finally:
            await finish()
        return Response(content=content, status_code=resp.status_code, headers=out_headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await proxy(request, "/generate")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy(request, "/v1/models")

    return app


def run_router(args: RouterArgs) -> int:
    """Serves until SIGINT/SIGTERM (exit 0); 1 if the port cannot be bound."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s [router] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.log_level != "debug":  # one line per proxied request is the access log's job
        logging.getLogger("httpx").setLevel(logging.WARNING)
    config = uvicorn.Config(
        create_router_app(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    def on_signal(sig: int, frame: Any) -> None:
        # NOTE: uvicorn re-raises the signal that stopped it once it has shut down; then this
        # is a no-op and the router exits 0. Before uvicorn took over, it stops the startup.
        if not server.started:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def announce(port: int) -> str:
        return f"srt router at http://{args.host}:{port} over {len(args.worker_urls)} workers"

    try:
        return 0 if asyncio.run(serve_and_announce(server, args.port, announce)) else 1
    except SystemExit as e:  # uvicorn exits this way when it cannot bind the port
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 0
