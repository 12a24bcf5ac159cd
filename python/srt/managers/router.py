"""Replica routers: which data-parallel replica (or HTTP worker) gets the next request.

Used in the main process by the TokenizerManager (`--dp-size N`, keys are token ids) and by the
standalone HTTP router (`python -m srt router`, keys are UTF-8 bytes of the prompt). In: a
request's key (and its cache namespace); out: a replica index. The router also counts each
replica's requests in flight: `choose` adds one to the chosen replica, and the caller calls
`release` exactly once when that request ends (finished, aborted or failed).

Methods (`--load-balance-method`), as in SGLang's router:
- `round_robin`: the next available replica in turn.
- `shortest_queue`: the available replica with the fewest requests in flight (lowest index on a
  tie).
- `cache_aware`: if load is uneven (max - min in flight > `balance_abs_threshold` and
  max > `balance_rel_threshold` * min) the least loaded replica; else the replica whose prefix
  index (`srt._native.PrefixIndex`, one radix tree per replica of what was routed there) holds
  the longest prefix of the key, when that covers at least `cache_threshold` of the key; else
  the replica with the smallest index (the most room). The key is then recorded for the chosen
  replica.

Replicas can be marked unavailable (an HTTP worker that stopped answering); they get nothing
until marked available again, and `NoReplicaError` is raised when none is.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from srt._native import PrefixIndex
from srt.server_args import LOAD_BALANCE_METHODS


class NoReplicaError(RuntimeError):
    """Every replica is unavailable."""


class ReplicaRouter(abc.ABC):
    """Base: availability and in-flight counts; subclasses pick among available replicas."""

    method = ""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"a router needs at least one replica, got {num_replicas}")
        self.num_replicas = num_replicas
        self.loads = [0] * num_replicas
        self.routed = [0] * num_replicas
        self.available = [True] * num_replicas

    def choose(self, key: Sequence[int], namespace: str = "") -> int:
        """The replica for a request with prompt `key`; counts it as in flight there."""
        candidates = [r for r in range(self.num_replicas) if self.available[r]]
        if not candidates:
            raise NoReplicaError("no replica is available")
        replica = self._pick(key, namespace, candidates)
        self.loads[replica] += 1
        self.routed[replica] += 1
        return replica

    def assign(self, replica: int) -> None:
        """Counts one more request in flight on `replica` without choosing (a request that must
        go where another one went, e.g. the copies of an n > 1 request)."""
        self._check(replica)
        self.loads[replica] += 1
        self.routed[replica] += 1

    def release(self, replica: int) -> None:
        """One request on `replica` ended."""
        self._check(replica)
        if self.loads[replica] <= 0:
            raise ValueError(f"release of replica {replica}, which has no request in flight")
        self.loads[replica] -= 1

    def set_available(self, replica: int, available: bool) -> None:
        """Marks a replica (un)available. One that goes away forgets what it was routed."""
        self._check(replica)
        if self.available[replica] and not available:
            self.forget(replica)
        self.available[replica] = available

    def forget(self, replica: int) -> None:
        """The replica's cache is empty now (flushed, restarted); no-op without an index."""
        self._check(replica)

    def describe(self) -> dict:
        return {
            "method": self.method,
            "loads": list(self.loads),
            "routed": list(self.routed),
            "available": list(self.available),
        }

    @abc.abstractmethod
    def _pick(self, key: Sequence[int], namespace: str, candidates: list[int]) -> int:
        """The replica among `candidates` (available ones, never empty) for this request."""

    def _check(self, replica: int) -> None:
        if not 0 <= replica < self.num_replicas:
            raise ValueError(f"replica {replica} out of range [0, {self.num_replicas})")


class RoundRobinRouter(ReplicaRouter):
    method = "round_robin"

    def __init__(self, num_replicas: int) -> None:
        super().__init__(num_replicas)
        self._next = 0

    def _pick(self, key: Sequence[int], namespace: str, candidates: list[int]) -> int:
        # The first available replica at or after the cursor, so an unavailable one is skipped
        # without breaking the rotation of the others.
        replica = min(candidates, key=lambda r: (r - self._next) % self.num_replicas)
        self._next = (replica + 1) % self.num_replicas
        return replica


class ShortestQueueRouter(ReplicaRouter):
    method = "shortest_queue"

    def _pick(self, key: Sequence[int], namespace: str, candidates: list[int]) -> int:
        return min(candidates, key=lambda r: (self.loads[r], r))


class CacheAwareRouter(ReplicaRouter):
    method = "cache_aware"

    def __init__(
        self,
        num_replicas: int,
        max_tokens: int,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        super().__init__(num_replicas)
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        self.index = PrefixIndex(num_replicas, max_tokens)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def _pick(self, key: Sequence[int], namespace: str, candidates: list[int]) -> int:
        key = list(key)
        loads = [self.loads[r] for r in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            replica = min(candidates, key=lambda r: (self.loads[r], r))
        else:
            match = self.index.match_prefix(key, candidates, namespace)
            assert match is not None  # candidates is not empty
            best, matched = match
            if key and matched / len(key) >= self.cache_threshold and matched > 0:
                replica = best
            else:
                smallest = self.index.smallest(candidates)
                assert smallest is not None
                replica = smallest
        self.index.insert(replica, key, namespace)
        return replica

    def forget(self, replica: int) -> None:
        self._check(replica)
        self.index.clear(replica)

    def describe(self) -> dict:
        sizes = [self.index.size(r) for r in range(self.num_replicas)]
        return {**super().describe(), "index_tokens": sizes}


def make_router(
    method: str,
    num_replicas: int,
    max_tokens: int,
    cache_threshold: float = 0.3,
    balance_abs_threshold: int = 64,
    balance_rel_threshold: float = 1.5,
) -> ReplicaRouter:
    """The router of `method` (one of LOAD_BALANCE_METHODS); `max_tokens` caps each replica's
    prefix index (cache_aware only)."""
    if method == "round_robin":
        return RoundRobinRouter(num_replicas)
    if method == "shortest_queue":
        return ShortestQueueRouter(num_replicas)
    if method == "cache_aware":
        return CacheAwareRouter(
            num_replicas,
            max_tokens,
            cache_threshold=cache_threshold,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
        )
    raise ValueError(f"unknown load balance method {method!r}; use one of {LOAD_BALANCE_METHODS}")


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One view of several replicas' scheduler stats: counts summed, ratios recomputed from the
    sums (token_usage, cache_hit_rate), other ratios averaged."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in stats for k in s):
        values = [s[key] for s in stats if key in s]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
    if out.get("pool_size"):
        out["token_usage"] = out.get("used_tokens", 0) / out["pool_size"]
    if "hit_prompt_tokens" in out:
        prompt = out["hit_prompt_tokens"]
        out["cache_hit_rate"] = out.get("hit_cached_tokens", 0) / prompt if prompt else 0.0
    return out
