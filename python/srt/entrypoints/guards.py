"""Admission control of the HTTP server (main process): overload and graceful shutdown.

`RequestGate` is a pure ASGI middleware in front of the FastAPI app. It counts the generation
requests in flight (from the moment the request arrives until its response, streamed or not,
has been sent) and answers 503 with an OpenAI-style error body, without reading the body:

- when more than `max_running + max_queued` would be in flight (`--max-queued-requests`);
  the requests beyond what the scheduler runs at once are the ones waiting in its queue;
- to every new request once draining has begun (SIGTERM/SIGINT, see `drain`).

`drain` lets the requests in flight finish for `--shutdown-timeout` seconds, then aborts those
still running (they end with finish_reason abort "the server is shutting down") and waits a
moment for their responses to go out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from srt.entrypoints.openai.protocol import error_body

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Any]

# Routes that start generation; only these count against the queue limit.
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
# After aborting at the end of the drain: how long the aborted responses get to go out.
ABORT_FLUSH_S = 3.0


class RequestGate:
    """ASGI middleware: 503 beyond the queue limit and while draining; counts in-flight."""

    def __init__(self, app: ASGIApp, max_running: int, max_queued: int | None) -> None:
        self.app = app
        self.max_running = max_running
        self.max_queued = max_queued
        self.in_flight = 0
        self.draining = False

    @property
    def limit(self) -> int | None:
        return None if self.max_queued is None else self.max_running + self.max_queued

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await _reject(send, "the server is shutting down")
            return
        if scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        limit = self.limit
        if limit is not None and self.in_flight >= limit:
            await _reject(
                send,
                f"the server is overloaded: {self.in_flight - self.max_running} requests are "
                f"already queued (--max-queued-requests {self.max_queued}); retry later",
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def drain(self, timeout: float, abort_all: Callable[[str], None]) -> None:
        """Stops admitting, waits up to `timeout` s for in-flight requests, then aborts the
        rest (through `abort_all(message)`) and waits briefly for their responses."""
        self.draining = True
        logger.info("draining %d requests in flight (up to %g s)", self.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("aborting %d requests still in flight", self.in_flight)
            abort_all("the server is shutting down")
            deadline = time.monotonic() + ABORT_FLUSH_S
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)


async def _reject(send: Any, message: str) -> None:
    body = json.dumps(error_body(message, "server_error", code=503)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
