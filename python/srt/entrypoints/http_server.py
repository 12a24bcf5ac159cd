"""The HTTP server's app (main process): FastAPI routes over the TokenizerManager.

Routes: POST /generate (SGLang's native shape, `native_request`), POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, the operational ones of `srt.entrypoints.admin` (tokenize,
server_info, flush_cache, abort_request, metrics, ...), and the browser pages of
`srt.entrypoints.web` (the chat page at /, the API docs at /docs and /redoc). Every error, including malformed JSON
and pydantic validation failures (FastAPI's 422), is an OpenAI-style body `{"object": "error",
"message", "type", "param", "code"}` with a 4xx status for client mistakes.

The server's lifecycle (children, signals, uvicorn) is `srt.entrypoints.serve.launch_server`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from srt.entrypoints.admin import PUBLIC_PATHS, install_api_key, register_admin_routes
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
from srt.entrypoints.web.openapi import install_openapi, request_body
from srt.entrypoints.web.pages import register_pages
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
