"""The HTTP server (main process): FastAPI routes over the TokenizerManager, and `launch_server`.

Routes: POST /generate (SGLang's native shape, `native_request`), POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, the operational ones of `srt.entrypoints.admin` (tokenize,
server_info, flush_cache, abort_request, metrics, ...), and the browser pages of
`srt.entrypoints.web` (the chat page at /, the API docs at /docs and /redoc). Every error, including malformed JSON
and pydantic validation failures (FastAPI's 422), is an OpenAI-style body `{"object": "error",
"message", "type", "param", "code"}` with a 4xx status for client mistakes.

`launch_server` resolves the model, starts the scheduler and detokenizer, prints
`srt serving <model> at http://HOST:PORT` once the port is open, and serves until SIGINT/SIGTERM,
then stops the children and removes the socket files (exit 0). A child that dies while serving
ends the server with exit code 1. The app runs behind `guards.RequestGate`: 503 beyond
--max-queued-requests, and on the first SIGINT/SIGTERM a drain (new requests get 503, those in
flight get --shutdown-timeout seconds, then are aborted) before uvicorn stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from srt.entrypoints.admin import PUBLIC_PATHS, install_api_key, register_admin_routes
from srt.entrypoints.guards import RequestGate
from srt.entrypoints.native_request import GenerateRequest
from srt.entrypoints.openai.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    sse_event,
)
from srt.entrypoints.openai.serving_chat import OpenAIServingChat
from srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from srt.entrypoints.parse_routes import register_parse_routes
from srt.entrypoints.uvicorn_serve import serve_and_announce
from srt.entrypoints.web.openapi import install_openapi, request_body
from srt.entrypoints.web.pages import register_pages
from srt.managers.hf_tokenizer import load_tokenizer, tokenizer_path_of
from srt.managers.tokenizer_manager import (
    ClientDisconnected,
    RuntimeDeadError,
    TokenizerManager,
    final_output,
    merge_streams,
    public_output,
    requested_n,
    run_all,
)
from srt.server_args import PortArgs, ServerArgs, UsageError
from srt.version import __version__

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(status: int, message: str, type: str = "invalid_request_error", **kw: Any) -> Response:
    return JSONResponse(error_body(message, type, **kw), status_code=status)


def describe_validation_errors(errors: Sequence[Any]) -> str:
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends a form type);
    RequestError (400) for malformed JSON or invalid fields."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and the two below
        raise RequestError(f"malformed JSON body: {e}") from e
    if b"\\ud" in raw or b"\\uD" in raw:  # only escapes can smuggle in lone surrogates
        _check_unicode(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError(describe_validation_errors(e.errors())) from e


def _reject_constant(name: str) -> Any:
    """NaN and (-)Infinity: Python's json emits them, but they are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is not a finite float")
    return value


def _check_unicode(data: Any) -> None:
    """RequestError for a string holding a lone surrogate (a \\ud800-style escape), which no
    tokenizer can encode."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = item[e.start : e.end].encode("unicode_escape").decode()
                raise RequestError(
                    f"invalid string in the JSON body: the lone surrogate {bad} is not valid "
                    "Unicode"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _json(model: BaseModel) -> Response:
    return Response(content=model.model_dump_json(), media_type="application/json")


def create_app(tokenizer_manager: TokenizerManager) -> FastAPI:
    tm = tokenizer_manager
    completions = OpenAIServingCompletion(tm)
    chat = OpenAIServingChat(tm)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tm.start()
        yield

    # NOTE: FastAPI's own /docs and /redoc load their scripts from a CDN; `register_pages`
    # serves them from the package.
    app = FastAPI(
        title="srt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    install_api_key(app, tm.server_args.api_key)
    install_openapi(app, PUBLIC_PATHS if tm.server_args.api_key else None)
    register_admin_routes(app, tm, parse_body)
    register_parse_routes(app, chat.tool_format.name, tm.server_args.reasoning_parser, parse_body)
    register_pages(app, chat_page=not tm.server_args.disable_web_ui)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(400, describe_validation_errors(exc.errors()))

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> Response:
        return _error(exc.status_code, exc.message, exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RuntimeDeadError)
    async def on_dead(request: Request, exc: RuntimeDeadError) -> Response:
        return _error(503, str(exc), "server_error")

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return _error(499, "client disconnected", "client_closed_request")

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> Response:
        if tm.dead_reason is not None:
            return _error(503, tm.dead_reason, "server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(completions.model_list())

    @app.post("/generate")
    @request_body(GenerateRequest)
    async def generate(request: Request) -> Response:
        body = await parse_body(request, GenerateRequest)
        try:
            objs, batch = body.to_inputs()
            reqs = []
            for o in objs:
                # n > 1: n choices per prompt, returned as a list (index = prompt * n + j).
                n = requested_n(o.sampling_params)
                batch = batch or n > 1
                reqs.extend(tm.fan_out(await tm.tokenize_request(o), n))
        except ValueError as e:
            raise RequestError(str(e)) from e
        if body.stream:
            return StreamingResponse(
                _generate_stream(tm, reqs, batch),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        outs = await run_all([final_output(tm.generate_tokenized(r, request)) for r in reqs])
        result: Any = [public_output(o) for o in outs] if batch else public_output(outs[0])
        return JSONResponse(result)

    @app.post("/v1/completions")
    @request_body(CompletionRequest)
    async def v1_completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        out = await completions.create(body, request)
        if isinstance(out, BaseModel):
            return _json(out)
        return StreamingResponse(out, media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/chat/completions")
    @request_body(ChatCompletionRequest)
    async def v1_chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        out = await chat.create(body, request)
        if isinstance(out, BaseModel):
            return _json(out)
        return StreamingResponse(out, media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


async def _generate_stream(tm: TokenizerManager, reqs: list, batch: bool) -> AsyncIterator[str]:
    """SSE of /generate: cumulative SGLang dicts (with "index" for a batch), then [DONE]."""
    try:
        async for i, out in merge_streams([tm.generate_tokenized(r) for r in reqs]):
            d = public_output(out)
            if batch:
                d["index"] = i
            yield sse_event(d)
    except RuntimeDeadError as e:
        yield sse_event({"error": error_body(str(e), "server_error")})
    yield SSE_DONE


# ---- launching -----------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Raises UsageError when (host, port) cannot be bound (in use, or not an address here)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} is not an address of this machine ({e})") from e
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # NOTE: as uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT is not taken for busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise UsageError(
                f"cannot listen on {host}:{port} ({e.strerror}); is another server running "
                f"there? Pick a free port with --port"
            ) from e


def launch_server(server_args: ServerArgs) -> int:
    """Runs the server until SIGINT/SIGTERM; returns the process exit code."""
    import uvicorn

    from srt.entrypoints.launch import (
        LaunchError,
        Subprocesses,
        configure_logging,
        launch_subprocesses,
        prepare_server_args,
        scheduler_name,
    )

    configure_logging(server_args, "main")
    stop_signals: list[int] = []
    serving = False
    port_args: PortArgs | None = None
    procs: Subprocesses | None = None
    tm: TokenizerManager | None = None

    def on_signal(sig: int, frame: Any) -> None:
        # NOTE: uvicorn restores this handler after its graceful shutdown and re-raises the
        # signal it caught; recording it (instead of dying) lets us clean up and exit 0.
        stop_signals.append(sig)
        if procs is not None:
            procs.begin_shutdown()
        if len(stop_signals) == 1 and not serving:
            raise KeyboardInterrupt

    if server_args.node_rank > 0:
        return _serve_worker_node(server_args)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        # NOTE: the user's mistakes first, before the slow part (conversion, model load).
        check_port_free(server_args.host, server_args.port)
        try:
            server_args = prepare_server_args(server_args)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
        port_args = PortArgs.new(server_args)
        # NOTE: the tokenizer loads (without torch) while the children start: the scheduler's
        # start is the long part, and this one's own ~1 s then costs nothing.
        with ThreadPoolExecutor(1, thread_name_prefix="srt-load-tokenizer") as loader:
            tokenizer = loader.submit(
                load_tokenizer, tokenizer_path_of(server_args), torch_free=True
            )
            procs = launch_subprocesses(server_args, port_args)
            tm = TokenizerManager(
                server_args, port_args, procs.scheduler_info, tokenizer=tokenizer.result()
            )
        replicas = range(server_args.dp_size)
        tm.scheduler_pids = [procs.procs[scheduler_name(d, 0)].pid or 0 for d in replicas]

        def on_death(name: str, code: int | None) -> None:
            print(f"srt: the {name} process died (exit code {code}); exiting", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)

        procs.start_watchdog(on_death)
        gate = RequestGate(
            create_app(tm),
            # NOTE: every replica runs its own batch, so the server runs their sum at once.
            max_running=sum(
                int(info.get("max_running_requests") or 1)
                for info in procs.replica_infos(server_args.dp_size)
            ),
            max_queued=server_args.max_queued_requests,
        )
        config = uvicorn.Config(
            gate,
            host=server_args.host,
            port=server_args.port,
            log_level=server_args.log_level,
            access_log=server_args.log_level == "debug",
            timeout_graceful_shutdown=5,
        )
        tm_ = tm

        async def drain() -> None:
            await gate.drain(server_args.shutdown_timeout, tm_.abort_all)

        server = _server_class()(config, on_stop=procs.begin_shutdown, drain=drain)
        serving = True
        if stop_signals:  # a signal came during startup after KeyboardInterrupt was handled
            return 0
        ok = asyncio.run(_serve(server, server_args, stop_signals))
        return 0 if ok or stop_signals else 1
    except UsageError as e:
        print(f"srt serve: error: {e}", file=sys.stderr)
        if server_args.log_level == "debug":
            traceback.print_exc()
        return 2
    except SystemExit as e:  # uvicorn exits this way when it cannot bind the port
        return e.code if isinstance(e.code, int) else 1
    except LaunchError as e:
        print(f"srt: startup failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. no model given and no default model installed
        print(f"srt: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if tm is not None:
            tm.close()
        if procs is not None:
            procs.shutdown()
        if port_args is not None:
            port_args.cleanup()


def _serve_worker_node(server_args: ServerArgs) -> int:
    """--node-rank > 0: runs this node's scheduler ranks (no HTTP, no detokenizer) until a
    signal (exit 0) or until one of them exits, e.g. when node 0 goes away (exit 1)."""
    from srt.entrypoints.launch import (
        LaunchError,
        configure_logging,
        launch_subprocesses,
        node_ranks,
        prepare_server_args,
    )

    configure_logging(server_args, f"node{server_args.node_rank}")
    stopped = threading.Event()
    died: list[str] = []

    def on_signal(sig: int, frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    port_args: PortArgs | None = None
    procs = None
    try:
        server_args = prepare_server_args(server_args)
        port_args = PortArgs.new(server_args)
        procs = launch_subprocesses(server_args, port_args)
        ranks = node_ranks(server_args)
        print(
            f"srt node {server_args.node_rank}: ranks {ranks.start}..{ranks.stop - 1} of "
            f"{server_args.world_size} ready, joined {server_args.dist_init_addr}"
        )
        sys.stdout.flush()

        def on_death(name: str, code: int | None) -> None:
            died.append(f"{name} (exit code {code})")
            stopped.set()

        procs.start_watchdog(on_death)
        while not stopped.wait(0.5):
            pass
        if died:
            print(f"srt: the {died[0]} process ended; exiting", file=sys.stderr)
            return 1
        return 0
    except LaunchError as e:
        print(f"srt: startup failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"srt: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if procs is not None:
            procs.shutdown()
        if port_args is not None:
            port_args.cleanup()


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server: on the first SIGINT/SIGTERM it drains (`drain()`) before uvicorn's
        own graceful shutdown; a second signal stops at once. Tells the watchdog that the
        children will stop."""

        def __init__(
            self,
            config: uvicorn.Config,
            on_stop: Callable[[], None],
            drain: Callable[[], Awaitable[None]] | None = None,
        ) -> None:
            super().__init__(config)
            self._on_stop = on_stop
            self._drain = drain
            self._drain_task: asyncio.Task | None = None
            self.loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            self._on_stop()
            if self._drain is None or self.loop is None or self._drain_task is not None:
                super().handle_exit(sig, frame)
                return
            # NOTE: runs in a signal handler; start the drain on the loop, exit after it.
            self._captured_signals.append(sig)
            self.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            if self._drain_task is not None or self._drain is None:
                return

            async def run(drain: Callable[[], Awaitable[None]]) -> None:
                try:
                    await drain()
                except Exception:
                    logger.exception("drain failed")
                self.should_exit = True

            self._drain_task = asyncio.ensure_future(run(self._drain))

    return Server


async def _serve(server: Any, server_args: ServerArgs, stop_signals: list[int]) -> bool:
    """Serves until uvicorn stops; False if it never started (e.g. the port is taken)."""
    server.loop = asyncio.get_running_loop()
    return await serve_and_announce(
        server,
        server_args.port,
        lambda port: (
            f"srt serving {server_args.served_model_name} at http://{server_args.host}:{port}"
        ),
        # caught just before uvicorn took over the handlers
        stop_requested=lambda: bool(stop_signals),
    )
