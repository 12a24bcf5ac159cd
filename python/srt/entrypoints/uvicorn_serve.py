"""Running a uvicorn server until it stops, announcing the address once it listens (shared by
the srt server and the router)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import Any


async def serve_and_announce(
    server: Any,
    port: int,
    announce: Callable[[int], str],
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Serves `server` (a uvicorn.Server) until it stops; once it listens, prints
    `announce(real_port)` (the bound port, which differs from `port` when that is 0).
    `stop_requested()` true before uvicorn took over the signals stops the startup.
    Returns False if the server never started (e.g. the port is taken)."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        if stop_requested():
            server.should_exit = True
        await asyncio.sleep(0.05)
    if server.started:
        with contextlib.suppress(Exception):
            port = server.servers[0].sockets[0].getsockname()[1]
        print(announce(port))
        sys.stdout.flush()
    await task
    return bool(server.started)
