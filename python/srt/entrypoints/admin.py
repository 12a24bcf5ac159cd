"""Operational and utility HTTP routes (main process), and the --api-key check.

Routes: GET /health_generate, GET /v1/models/{id}, POST /v1/tokenize (also /tokenize),
POST /v1/detokenize (also /detokenize), GET /server_info (also SGLang's /get_server_info),
GET /model_info (also SGLang's /get_model_info), POST /flush_cache, POST /abort_request, and
GET /metrics (without --enable-metrics, a 404 that names the flag). Scheduler numbers come from the schedulers over the control path
(`TokenizerManager.scheduler_stats`; summed over data-parallel replicas, each replica's under
`stats.replicas`); /flush_cache empties every replica's cache. Errors use the OpenAI error body
like every other route.

With --api-key, every route except /health, /metrics and the browser pages
(`srt.entrypoints.web.pages`) needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from srt.entrypoints.openai.protocol import ChatMessage, RequestError, error_body
from srt.entrypoints.openai.serving_base import OpenAIServingBase
from srt.entrypoints.web import pages
from srt.entrypoints.web.openapi import request_body
from srt.managers.tokenizer_manager import (
    GenerateReqInput,
    RuntimeDeadError,
    TokenizerManager,
    final_output,
)
from srt.version import __version__

# How long /health_generate waits for its one-token generation before answering 503.
HEALTH_GENERATE_TIMEOUT_S = 20.0
# How long a control request (stats, flush) waits for the scheduler.
CONTROL_TIMEOUT_S = 10.0
# Routes open without the API key: liveness probes, Prometheus scrapers and the pages.
PUBLIC_PATHS = frozenset({"/health", "/metrics"}) | pages.PUBLIC_PATHS
PUBLIC_PREFIXES = pages.PUBLIC_PREFIXES


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered by the chat template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rid: str | None = None
    abort_all: bool = False


def _err(status: int, message: str, type: str = "invalid_request_error") -> Response:
    return JSONResponse(error_body(message, type), status_code=status)


class ApiKeyMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which wraps streaming responses and hides
    client disconnects from the routes): a 401 unless `Authorization: Bearer api_key`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path not in PUBLIC_PATHS
            and not path.startswith(PUBLIC_PREFIXES)
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # NOTE: a constant-time comparison, so the key cannot be guessed from timings.
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    error_body(
                        "invalid or missing API key (send `Authorization: Bearer <key>`)",
                        "authentication_error",
                        code="invalid_api_key",
                    ),
                    status_code=401,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_api_key(app: FastAPI, api_key: str | None) -> None:
    """Requires `Authorization: Bearer api_key` on every route but PUBLIC_PATHS (no-op when
    api_key is None or empty)."""
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)


def register_admin_routes(app: FastAPI, tm: TokenizerManager, parse_body: Callable) -> None:
    """Adds the routes of this module to `app`; `parse_body(request, Model)` parses a JSON
    body into a pydantic model (a RequestError on failure)."""
    base = OpenAIServingBase(tm)
    metrics = None
    if tm.server_args.enable_metrics:
        from srt.metrics import Metrics

        metrics = Metrics(tm.served_model_name)
        tm.metrics = metrics

    async def scheduler_stats() -> dict[str, Any]:
        try:
            return await tm.scheduler_stats(CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            raise RequestError(
                "the scheduler did not answer", status_code=503, type="server_error"
            ) from e

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if tm.dead_reason is not None:
            return _err(503, tm.dead_reason, "server_error")
        token = tm.tokenizer.bos_token_id
        obj = GenerateReqInput(
            input_ids=[token if token is not None else 0],
            sampling_params={"max_new_tokens": 1, "ignore_eos": True},
        )
        try:
            out = await asyncio.wait_for(
                final_output(tm.generate_request(obj)), HEALTH_GENERATE_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            return _err(503, "the health generation did not finish in time", "server_error")
        except (RuntimeDeadError, ValueError) as e:
            return _err(503, f"the health generation failed: {e}", "server_error")
        fr = out["meta_info"]["finish_reason"] or {}
        if fr.get("type") == "abort":
            return _err(503, f"the health generation was aborted: {fr.get('message')}")
        return Response(status_code=200)

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        base.require_model(model_id)
        card = base.model_list().data[0]
        return Response(content=card.model_dump_json(), media_type="application/json")

    @app.post("/v1/tokenize")
    @app.post("/tokenize")
    @request_body(TokenizeRequest)
    async def tokenize(request: Request) -> Response:
        body = await parse_body(request, TokenizeRequest)
        base.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of `prompt` and `messages`")
        if body.messages is not None:
            if not body.messages:
                raise RequestError("messages must not be empty", param="messages")
            text = _render_chat(tm, body.messages, body.add_generation_prompt)
            # NOTE: the template already holds the special tokens (vLLM's default too).
            special = False if body.add_special_tokens is None else body.add_special_tokens
        else:
            text = body.prompt or ""
            special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await tm.tokenize(text, special) if text else []
        return JSONResponse(
            {"count": len(tokens), "max_model_len": tm.context_len, "tokens": tokens}
        )

    @app.post("/v1/detokenize")
    @app.post("/detokenize")
    @request_body(DetokenizeRequest)
    async def detokenize(request: Request) -> Response:
        body = await parse_body(request, DetokenizeRequest)
        base.check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < tm.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"token {bad} is not a token id in [0, {tm.vocab_size})", param="tokens"
            )
        text = tm.decode(body.tokens)
        # NOTE: vLLM names the text "prompt", SGLang "text".
        return JSONResponse({"prompt": text, "text": text})

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        args = dataclasses.asdict(tm.server_args)
        if args.get("api_key"):
            args["api_key"] = "***"  # never echo the secret
        info = {**args, **tm.scheduler_info, "version": __version__}
        info["max_total_num_tokens"] = tm.max_total_num_tokens
        info["dp_size"] = tm.dp_size
        info["scheduler_pids"] = tm.scheduler_pids
        info["stats"] = await scheduler_stats()
        return JSONResponse(info)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        return JSONResponse(
            {
                "model_path": tm.model_path,
                "tokenizer_path": tm.server_args.tokenizer_path or tm.model_path,
                "served_model_name": tm.served_model_name,
                "architecture": tm.scheduler_info.get("architecture"),
                "context_length": tm.context_len,
                "vocab_size": tm.vocab_size,
                "is_generation": True,
            }
        )

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        try:
            resp = await tm.flush_cache(CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _err(503, "the scheduler did not answer", "server_error")
        if not resp.success:
            raise RequestError(resp.message, code="cache_busy")
        return JSONResponse({"success": True, "message": resp.message})

    @app.post("/abort_request")
    @request_body(AbortRequest)
    async def abort_request(request: Request) -> Response:
        body = await parse_body(request, AbortRequest)
        if body.abort_all == (body.rid is not None):
            raise RequestError('give either {"rid": ...} or {"abort_all": true}')
        rid = None if body.abort_all else body.rid
        if not tm.abort_running(rid, "aborted by /abort_request"):
            raise RequestError(
                f"no running request with id {rid!r}",
                status_code=404,
                type="NotFoundError",
                param="rid",
            )
        return JSONResponse({"success": True})

    if metrics is not None:
        from srt.metrics import CONTENT_TYPE

        @app.get("/metrics")
        async def metrics_route() -> Response:
            # NOTE: a scrape still answers (latency series) when the scheduler is slow or dead;
            # the scheduler gauges then keep their last values.
            try:
                metrics.set_scheduler_stats(await scheduler_stats())
            except (RequestError, RuntimeDeadError):
                pass
            return Response(content=metrics.render(), media_type=CONTENT_TYPE)

    else:

        @app.get("/metrics", include_in_schema=False)
        async def metrics_off() -> Response:
            return _err(
                404,
                "metrics are off: start the server with --enable-metrics to serve Prometheus "
                "metrics at /metrics",
                "NotFoundError",
            )


def _render_chat(tm: TokenizerManager, messages: list[ChatMessage], gen_prompt: bool) -> str:
    if getattr(tm.tokenizer, "chat_template", None) is None:
        raise RequestError("this model's tokenizer has no chat template", param="messages")
    dicts = [m.to_template_dict(i) for i, m in enumerate(messages)]
    try:
        return tm.tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=gen_prompt
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates
        raise RequestError(f"chat template failed: {e}", param="messages") from e
