"""Threads of srt's processes on the CPU.

Only the scheduler ranks do tensor math. On the CPU each sets torch's intra-op thread count on
purpose (`--num-threads`). The default is `OMP_NUM_THREADS` when the environment sets it, else
the cores this process may use (its CPU affinity and cgroup quota) shared among the node's
scheduler ranks. A native step runs on fewer while other processes take some of the cores
(`srt.cpu_share`). The main and detokenizer processes do no tensor math, so they never start
an OpenMP pool.

libgomp (torch's OpenMP on Linux) keeps its workers spinning after every parallel region
(300,000 iterations when no wait policy is set). On an idle machine that costs only power.
Beside other busy processes, the spinning workers take the cores that the one thread with work
needs, and a decode step stalls behind them: on 2 cores beside one busy process, 5-7x slower
(benches/RESULTS.md, `benches/cpu_threads.py`). So srt starts its children with
`GOMP_SPINCOUNT=2000`: a worker spins a few microseconds (enough to catch the next region of a
running forward) and then sleeps. Measured there, that costs 8-10% alone and keeps the
slowdown beside a busy process at 1.6-1.7x; `OMP_WAIT_POLICY=PASSIVE` (no spin) costs 20-28%
alone. The
user's environment wins: nothing is set when it already says how OpenMP waits
(`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Set for the children unless the user set any of USER_WAIT_SETTINGS.
CHILD_ENV = {"GOMP_SPINCOUNT": "2000"}
USER_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def usable_cores() -> int:
    """Cores this process may use: its affinity mask, bounded by its cgroup's CPU quota (a
    container started with `--cpus 2` on a 64-core host may use 2, not 64)."""
    from srt._native import available_parallelism

    return max(1, available_parallelism())


def scheduler_threads(server_args: ServerArgs) -> int:
    """torch's intra-op threads for one scheduler rank on the CPU."""
    if server_args.num_threads is not None:
        return server_args.num_threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    ranks = max(1, server_args.world_size * server_args.dp_size // server_args.nnodes)
    return max(1, usable_cores() // ranks)


def child_env_additions(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """What the children's environment gets on top of `environ` (nothing where the user
    already chose how OpenMP waits)."""
    if any(name in environ for name in USER_WAIT_SETTINGS):
        return {}
    return {k: v for k, v in CHILD_ENV.items() if k not in environ}


@contextlib.contextmanager
def child_environment() -> Iterator[None]:
    """`os.environ` with the children's additions while they are started (spawn copies the
    parent's environment), restored after: the caller's own process keeps its settings."""
    added = child_env_additions(os.environ)
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def set_scheduler_threads(server_args: ServerArgs) -> int:
    """In a scheduler rank on the CPU: sets torch's thread count; returns it."""
    import torch

    threads = scheduler_threads(server_args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info(
        "torch threads: %d (OMP_WAIT_POLICY=%s, GOMP_SPINCOUNT=%s)",
        threads,
        os.environ.get("OMP_WAIT_POLICY", "unset"),
        os.environ.get("GOMP_SPINCOUNT", "unset"),
    )
    return threads
