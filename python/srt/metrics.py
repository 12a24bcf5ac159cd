"""Prometheus metrics of a server (main process), served by GET /metrics with --enable-metrics.

Latencies and token counts are measured here, from the outputs the TokenizerManager receives
(`on_output`). Scheduler-side numbers (running and queued requests, KV usage, cache hit rate)
are fetched from the scheduler at scrape time and set with `set_scheduler_stats`. Each Metrics
owns its own registry, so two servers in one process (tests) never share series.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The srt_* series; `model_name` is a constant label on every one."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["model_name"]
        self.num_running = Gauge(
            "srt_num_running_reqs", "Requests decoding or prefilling.", labels, registry=r
        )
        self.num_queued = Gauge(
            "srt_num_queued_reqs", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.token_usage = Gauge(
            "srt_token_usage",
            "KV slots held by requests / KV pool size (the evictable prefix cache is free).",
            labels,
            registry=r,
        )
        self.used_tokens = Gauge(
            "srt_used_tokens", "KV slots held by requests.", labels, registry=r
        )
        self.pool_tokens = Gauge(
            "srt_max_total_num_tokens", "KV pool size in tokens.", labels, registry=r
        )
        self.cache_hit_rate = Gauge(
            "srt_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens (since the last flush).",
            labels,
            registry=r,
        )
        self.ttft = Histogram(
            "srt_time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "srt_inter_token_latency_seconds",
            "Time between output tokens (per token, averaged over a batch of tokens).",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "srt_e2e_request_latency_seconds",
            "Time from arrival to the finishing output.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "srt_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "srt_generation_tokens", "Output tokens generated.", labels, registry=r
        )
        self.requests = Counter(
            "srt_requests",
            "Finished requests by finish reason (stop, length, abort).",
            [*labels, "finish_reason"],
            registry=r,
        )
        self._l = {"model_name": model_name}

    def on_output(self, state: Any, n_new: int, finish: Any) -> None:
        """One output of a request (a ReqState: `created`, `first_token_at`, `last_token_at`,
        `prompt_tokens`): `n_new` new tokens and its finish reason, if it ended."""
        now = time.time()
        if n_new > 0:
            self.generation_tokens.labels(**self._l).inc(n_new)
            if state.first_token_at is None:
                state.first_token_at = now
                self.ttft.labels(**self._l).observe(max(now - state.created, 0.0))
                n_gaps = n_new - 1
            else:
                n_gaps = n_new
            if n_gaps > 0 and state.last_token_at is not None:
                gap = max(now - state.last_token_at, 0.0) / n_gaps
                h = self.itl.labels(**self._l)
                for _ in range(n_gaps):
                    h.observe(gap)
            state.last_token_at = now
        if finish is not None:
            self.e2e.labels(**self._l).observe(max(now - state.created, 0.0))
            self.prompt_tokens.labels(**self._l).inc(state.prompt_tokens)
            self.requests.labels(**self._l, finish_reason=finish.type).inc()

    def on_client_abort(self) -> None:
        """A request dropped because its client went away (no finishing output comes)."""
        self.requests.labels(**self._l, finish_reason="abort").inc()

    def set_scheduler_stats(self, stats: dict[str, Any]) -> None:
        self.num_running.labels(**self._l).set(stats.get("num_running", 0))
        self.num_queued.labels(**self._l).set(stats.get("num_waiting", 0))
        self.token_usage.labels(**self._l).set(stats.get("token_usage", 0.0))
        self.used_tokens.labels(**self._l).set(stats.get("used_tokens", 0))
        self.pool_tokens.labels(**self._l).set(stats.get("pool_size", 0))
        self.cache_hit_rate.labels(**self._l).set(stats.get("cache_hit_rate", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
