"""The router's command line: `RouterArgs` and its flags, apart from the router's server so
that `python -m srt` builds its parser without importing the web stack (a third of a second
of every `serve` start, before its children are spawned)."""

from __future__ import annotations

import argparse
import dataclasses

from srt.server_args import LOAD_BALANCE_METHODS


@dataclasses.dataclass(frozen=True)
class RouterArgs:
    worker_urls: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 30000
    load_balance_method: str = "cache_aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 24
    health_check_interval: float = 5.0
    request_timeout: float | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.worker_urls:
            raise ValueError("give at least one --worker-urls URL")
        for url in self.worker_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker URL {url!r} must start with http:// or https://")
        if len(set(self.worker_urls)) != len(self.worker_urls):
            raise ValueError("--worker-urls lists a worker twice")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"--load-balance-method must be one of {LOAD_BALANCE_METHODS}")
        if self.max_tree_size < 1:
            raise ValueError("--max-tree-size must be >= 1")
        if not self.health_check_interval > 0:
            raise ValueError("--health-check-interval must be > 0")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("--request-timeout must be > 0")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    d = RouterArgs(worker_urls=("http://unused",))
    p.add_argument(
        "--worker-urls",
        nargs="+",
        required=True,
        metavar="URL",
        help="Base URLs of the srt servers to route to (http://host:port).",
    )
    p.add_argument("--host", default=d.host, help="Address the router binds.")
    p.add_argument("--port", type=int, default=d.port, help="Port the router listens on.")
    p.add_argument(
        "--load-balance-method",
        default=d.load_balance_method,
        choices=LOAD_BALANCE_METHODS,
        help="How a worker is picked.",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=d.cache_threshold,
        help="cache_aware: least share of the prompt a worker must hold to get it for its cache.",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=d.balance_abs_threshold,
        help="cache_aware: load is uneven when max - min requests in flight exceed this ...",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=d.balance_rel_threshold,
        help="... and max exceeds this times min; then the least loaded gets it.",
    )
    p.add_argument(
        "--max-tree-size",
        type=int,
        default=d.max_tree_size,
        help="cache_aware: bytes of prompts remembered per worker.",
    )
    p.add_argument(
        "--health-check-interval",
        type=float,
        default=d.health_check_interval,
        help="Seconds between GET /health checks of every worker.",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="Seconds a worker may take to answer (and between stream chunks); default: no limit.",
    )
    p.add_argument(
        "--log-level",
        default=d.log_level,
        choices=("debug", "info", "warning", "error", "critical"),
    )


def args_from_cli(ns: argparse.Namespace) -> RouterArgs:
    return RouterArgs(
        worker_urls=tuple(u.rstrip("/") for u in ns.worker_urls),
        host=ns.host,
        port=ns.port,
        load_balance_method=ns.load_balance_method,
        cache_threshold=ns.cache_threshold,
        balance_abs_threshold=ns.balance_abs_threshold,
        balance_rel_threshold=ns.balance_rel_threshold,
        max_tree_size=ns.max_tree_size,
        health_check_interval=ns.health_check_interval,
        request_timeout=ns.request_timeout,
        log_level=ns.log_level,
    )
