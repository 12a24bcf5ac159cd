"""Starts the scheduler and detokenizer processes and keeps watch over them (main process).

`launch_subprocesses` spawns both children (multiprocessing "spawn": no forked CUDA or
threads), waits for each one's `ProcessReady` on a pipe, and returns a `Subprocesses` handle
holding the scheduler's info (context length, vocab size, pool size, ...). A child that fails to
start makes the launch raise `LaunchError` with the child's own error, after stopping the rest.

Each child runs under `_child_entry`, which arms PR_SET_PDEATHSIG (a child never outlives main)
and ignores SIGINT (Ctrl-C in a terminal reaches the whole process group; main decides how to
stop). The watchdog thread notices a child that dies while serving, stops the rest, removes the
socket files and calls the owner's `on_death` (the server exits nonzero).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from srt.cpu_threads import child_environment
from srt.managers.io_struct import ProcessReady, decode, encode
from srt.server_args import PortArgs, ServerArgs
from srt.spawning import caller_main_hidden

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 5.0
_SIGNAL_GRACE_S = 1.0

ChildTarget = Callable[[ServerArgs, PortArgs, multiprocessing.connection.Connection], None]


class LaunchError(RuntimeError):
    """A child process failed to start; the message carries its error."""


def configure_logging(server_args: ServerArgs, prefix: str = "", force: bool = True) -> None:
    """Root logging at --log-level; `force=False` keeps a configuration the host program set."""
    level = getattr(logging, server_args.log_level.upper(), logging.INFO)
    tag = f"[{prefix}] " if prefix else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=force,
    )


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Asks Linux to send `sig` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable; children may outlive main")


def _child_entry(
    parent_pid: int,
    name: str,
    target: ChildTarget,
    server_args: ServerArgs,
    port_args: PortArgs,
    ready_conn: multiprocessing.connection.Connection,
) -> None:
    set_pdeathsig()
    # NOTE: the parent may have died before prctl took effect; then we were re-parented.
    if os.getppid() != parent_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(server_args, name)
    try:
        target(server_args, port_args, ready_conn)
    except BaseException as e:  # report, so main prints why instead of only an exit code
        tb = traceback.format_exc()
        logging.getLogger(f"srt.{name}").error("%s process failed:\n%s", name, tb)
        try:
            # Ignored by main when this child had already reported ready.
            ready_conn.send_bytes(encode(ProcessReady(name=name, ok=False, error=tb)))
        except (OSError, ValueError):
            pass
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        sys.exit(code or 1)


def prepare_server_args(server_args: ServerArgs) -> ServerArgs:
    """Resolves model and tokenizer to HF folders (once, in main) and fixes the served name."""
    from srt.model_loader.gguf import default_model_path, resolve_model_paths

    served = server_args.served_model_name or default_served_name(
        server_args.model_path or default_model_path()
    )
    model_path, tokenizer_path = resolve_model_paths(
        server_args.model_path, server_args.tokenizer_path
    )
    return server_args.replace(
        model_path=model_path, tokenizer_path=tokenizer_path, served_model_name=served
    )


def default_served_name(model_path: str) -> str:
    """The name a model is served under without --served-model-name: its folder's name, or
    its file's without the .gguf suffix; a hub id (no such local path) as given."""
    if not os.path.exists(model_path):
        return model_path
    return os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")


def scheduler_name(dp_rank: int, rank: int) -> str:
    """Child name of one scheduler rank: "scheduler" for replica 0's rank 0 (the only one
    without parallelism), "scheduler1" for replica 1's, "scheduler-rank2" for rank 2, ..."""
    return "scheduler" + (str(dp_rank) if dp_rank else "") + (f"-rank{rank}" if rank else "")


def node_ranks(server_args: ServerArgs) -> range:
    """The ranks (of tp x pp) that this node runs."""
    per_node = server_args.world_size // server_args.nnodes
    return range(server_args.node_rank * per_node, (server_args.node_rank + 1) * per_node)


def run_scheduler_process(*args: Any, **kwargs: Any) -> None:
    """The scheduler child's entry point. NOTE: the scheduler module (and with it torch) is
    imported in the child only: the main process never loads torch (~700 MiB of RSS). The
    child's transformers, imported only if it is needed, runs without its torch side (configs
    and tokenizers only)."""
    from srt.managers.hf_tokenizer import mark_own_process

    mark_own_process()
    from srt.managers.scheduler import run_scheduler_process as run

    run(*args, **kwargs)


def run_detokenizer_process(*args: Any, **kwargs: Any) -> None:
    """The detokenizer child's entry point (its module, numpy and zmq among its imports, is
    imported in the child only: ~0.1 s less before main spawns the children)."""
    from srt.managers.detokenizer_manager import run_detokenizer_process as run

    run(*args, **kwargs)


def _default_targets(server_args: ServerArgs) -> dict[str, ChildTarget]:
    # NOTE: the schedulers first: they load the model, the slow part of startup.
    targets: dict[str, ChildTarget] = {}
    for dp_rank in range(server_args.dp_size):
        for rank in node_ranks(server_args):
            targets[scheduler_name(dp_rank, rank)] = functools.partial(
                run_scheduler_process, dp_rank=dp_rank, rank=rank
            )
    if server_args.node_rank == 0:
        targets["detokenizer"] = run_detokenizer_process
    return targets


class Subprocesses:
    """Handle on the running children: their info, a watchdog, and a clean shutdown."""

    def __init__(
        self,
        procs: dict[str, BaseProcess],
        port_args: PortArgs,
        infos: dict[str, dict[str, Any]],
    ) -> None:
        self.procs = procs
        self.port_args = port_args
        self.infos = infos
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

    @property
    def scheduler_info(self) -> dict[str, Any]:
        """Replica 0's rank-0 scheduler info (context length, vocab, pool size, ...)."""
        return self.infos.get("scheduler", {})

    def replica_infos(self, dp_size: int) -> list[dict[str, Any]]:
        """The rank-0 scheduler info of each data-parallel replica."""
        return [self.infos.get(scheduler_name(d, 0), {}) for d in range(dp_size)]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.pid is not None]

    def start_watchdog(self, on_death: Callable[[str, int | None], None]) -> None:
        """Calls `on_death(name, exitcode)` (after stopping the other children and removing the
        socket files) when a child exits while we are not shutting down."""

        def watch() -> None:
            sentinels = {p.sentinel: name for name, p in self.procs.items()}
            while not self._stopping.is_set():
                ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
                if not ready or self._stopping.is_set():
                    continue
                name = sentinels[ready[0]]  # type: ignore[index]
                # NOTE: the sentinel can fire a moment before the child is reapable.
                self.procs[name].join(timeout=_JOIN_TIMEOUT_S)
                code = self.procs[name].exitcode
                if code is not None and code < 0:
                    # Killed by a signal: maybe one sent to the whole process group (systemd,
                    # `timeout`, `kill -- -PGID`) that main is about to handle as a stop.
                    self._stopping.wait(_SIGNAL_GRACE_S)
                    if self._stopping.is_set():
                        return
                logger.error("%s process died (exit code %s); stopping srt", name, code)
                self.shutdown()
                on_death(name, code)
                return

        self._watchdog = threading.Thread(target=watch, name="srt-watchdog", daemon=True)
        self._watchdog.start()

    def begin_shutdown(self) -> None:
        """From now on a child's exit is expected (safe from a signal handler)."""
        self._stopping.set()

    def shutdown(self) -> None:
        """Terminates every child, waits for them, kills stragglers, removes the socket files.

        Idempotent and safe to call from any thread."""
        with self._lock:
            self._stopping.set()
            for p in self.procs.values():
                if p.is_alive():
                    p.terminate()
            deadline = time.monotonic() + _JOIN_TIMEOUT_S
            for p in self.procs.values():
                p.join(timeout=max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    logger.warning("%s did not stop on SIGTERM; killing it", p.name)
                    p.kill()
                    p.join(timeout=_JOIN_TIMEOUT_S)
            self.port_args.cleanup()


def launch_subprocesses(
    server_args: ServerArgs,
    port_args: PortArgs,
    targets: dict[str, ChildTarget] | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> Subprocesses:
    """Starts the children and waits until each reports ready; raises LaunchError otherwise.

    `targets` maps a child's name to its entry function (default: every scheduler rank this
    node runs, and the detokenizer on node 0).
    """
    targets = targets if targets is not None else _default_targets(server_args)
    ctx = multiprocessing.get_context("spawn")
    procs: dict[str, BaseProcess] = {}
    conns: dict[str, multiprocessing.connection.Connection] = {}
    for name, target in targets.items():
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_child_entry,
            args=(os.getpid(), name, target, server_args, port_args, writer),
            name=f"srt-{name}",
            # NOTE: not daemonic, so a child may start processes of its own (compile workers);
            # shutdown() and PR_SET_PDEATHSIG are what guarantee that none outlives main.
            daemon=False,
        )
        # e.g. OpenMP's wait policy (srt.cpu_threads); the caller's script not re-run.
        with child_environment(), caller_main_hidden():
            p.start()
        writer.close()  # so a child's death shows as EOF on `reader`
        procs[name] = p
        conns[name] = reader
    handle = Subprocesses(procs, port_args, {})
    try:
        handle.infos = _wait_ready(procs, conns, timeout)
    except BaseException:
        handle.shutdown()
        raise
    finally:
        for c in conns.values():
            c.close()
    return handle


def _wait_ready(
    procs: dict[str, BaseProcess],
    conns: dict[str, multiprocessing.connection.Connection],
    timeout: float,
) -> dict[str, dict[str, Any]]:
    infos: dict[str, dict[str, Any]] = {}
    pending = dict(conns)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(sorted(pending))
            raise LaunchError(f"timed out after {timeout:.0f} s waiting for {names} to start")
        ready = multiprocessing.connection.wait(list(pending.values()), timeout=left)
        for conn in ready:
            name = next(n for n, c in pending.items() if c is conn)
            del pending[name]
            try:
                msg = decode(conn.recv_bytes())
            except (EOFError, OSError):
                procs[name].join(timeout=_JOIN_TIMEOUT_S)
                raise LaunchError(
                    f"{name} process exited during startup "
                    f"(exit code {procs[name].exitcode}) without reporting an error"
                ) from None
            if not isinstance(msg, ProcessReady):
                raise LaunchError(f"{name} sent {type(msg).__name__} instead of ProcessReady")
            if not msg.ok:
                raise LaunchError(f"{name} process failed to start:\n{msg.error}")
            infos[name] = dict(msg.info)
            logger.info("%s process ready (pid %s)", name, procs[name].pid)
    return infos
