"""SGLang's parsing routes (main process): `POST /separate_reasoning` splits a reasoning model's
text into reasoning and answer, `POST /parse_function_call` reads the tool calls out of a
model's text. Both parse text a client already has (e.g. from /generate, which returns the raw
text), with the same parsers the chat route uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from srt.entrypoints.openai.protocol import RequestError
from srt.entrypoints.web.openapi import request_body
from srt.function_call.formats import format_named
from srt.function_call.stream import parse_calls
from srt.function_call.tools import ToolError, ToolPlan
from srt.reasoning import reasoning_parser


class SeparateReasoningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    # Default: the server's --reasoning-parser.
    reasoning_parser: str | None = None


class ParseFunctionCallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    tools: list[Any]
    # Default: the server's tool-call format (--tool-call-parser, or the detected one).
    tool_call_parser: str | None = None


def register_parse_routes(
    app: FastAPI, default_format: str, default_reasoning: str | None, parse_body: Callable
) -> None:
    @app.post("/separate_reasoning")
    @request_body(SeparateReasoningRequest)
    async def separate_reasoning(request: Request) -> Response:
        body = await parse_body(request, SeparateReasoningRequest)
        name = body.reasoning_parser or default_reasoning
        if name is None:
            raise RequestError(
                "give reasoning_parser (the server has no --reasoning-parser)",
                param="reasoning_parser",
            )
        try:
            parser = reasoning_parser(name)
        except ValueError as e:
            raise RequestError(str(e), param="reasoning_parser") from e
        reasoning, text = parser.split(body.text, final=True)
        return JSONResponse({"text": text, "reasoning_text": reasoning})

    @app.post("/parse_function_call")
    @request_body(ParseFunctionCallRequest)
    async def parse_function_call(request: Request) -> Response:
        body = await parse_body(request, ParseFunctionCallRequest)
        try:
            fmt = format_named(body.tool_call_parser or default_format)
        except ValueError as e:
            raise RequestError(str(e), param="tool_call_parser") from e
        try:
            plan = ToolPlan.of(body.tools, None, None)
        except ToolError as e:
            raise RequestError(str(e), param=e.param) from e
        names = plan.names if plan is not None else frozenset()
        content, calls = parse_calls(fmt, body.text, names)
        out = [
            {
                "name": c["function"]["name"],
                "parameters": json.loads(c["function"]["arguments"]),
            }
            for c in calls
        ]
        return JSONResponse({"normal_text": content or "", "calls": out})
