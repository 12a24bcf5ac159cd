"""`launch_server`: the HTTP server's lifecycle in the main process.

It resolves the model, starts the scheduler and detokenizer, prints `srt serving <model> at
http://HOST:PORT` once the port is open, and serves until SIGINT/SIGTERM, then stops the
children and removes the socket files (exit 0). A child that dies while serving ends the server
with exit code 1. The app (`http_server.create_app`) runs behind `guards.RequestGate`: 503
beyond --max-queued-requests, and on the first SIGINT/SIGTERM a drain (new requests get 503,
those in flight get --shutdown-timeout seconds, then are aborted) before uvicorn stops.

Startup order: the children start first; the app's modules (FastAPI and the routes, ~0.3 s
to import) and the tokenizer (without torch) load in a thread meanwhile, since the scheduler's
start (torch, the model) is the long part.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from srt.entrypoints.uvicorn_serve import serve_and_announce
from srt.managers.hf_tokenizer import load_tokenizer, tokenizer_path_of
from srt.server_args import PortArgs, ServerArgs, UsageError

if TYPE_CHECKING:
    from srt.managers.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)


def _load_app_and_tokenizer(server_args: ServerArgs) -> Any:
    """In the loader thread: imports the app's modules and returns the tokenizer."""
    import srt.entrypoints.http_server  # noqa: F401

    return load_tokenizer(tokenizer_path_of(server_args), torch_free=True)


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
        # NOTE: the app and the tokenizer load while the children start (module docstring).
        with ThreadPoolExecutor(1, thread_name_prefix="srt-load-app") as loader:
            tokenizer = loader.submit(_load_app_and_tokenizer, server_args)
            procs = launch_subprocesses(server_args, port_args)
            tokenizer_ = tokenizer.result()
        from srt.entrypoints.guards import RequestGate
        from srt.entrypoints.http_server import create_app
        from srt.managers.tokenizer_manager import TokenizerManager

        tm = TokenizerManager(server_args, port_args, procs.scheduler_info, tokenizer=tokenizer_)
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
