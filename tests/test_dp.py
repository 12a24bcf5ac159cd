"""Data parallelism: the replica routers of `srt.managers.router` (fake loads, no processes),
the Rust `PrefixIndex` they use, and live `--dp-size 2` servers (tiny llama on loopback) driven
through the openai client: same greedy outputs as one replica, prefix affinity with cached
tokens, round robin, KV returned after aborts, and a dead replica ending the server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from _live import alive, child_pids, start_server

from srt._native import PrefixIndex
from srt.managers.router import (
    CacheAwareRouter,
    NoReplicaError,
    RoundRobinRouter,
    ShortestQueueRouter,
    make_router,
    merge_stats,
)

# ---- routers in isolation ------------------------------------------------------------------


def test_round_robin_cycles_and_skips_unavailable() -> None:
    r = RoundRobinRouter(3)
    assert [r.choose([1]) for _ in range(4)] == [0, 1, 2, 0]
    r.set_available(2, False)
    assert [r.choose([1]) for _ in range(4)] == [1, 0, 1, 0]
    r.set_available(2, True)
    assert [r.choose([1]) for _ in range(3)] == [1, 2, 0]
    assert r.loads == [5, 4, 2]
    assert r.routed == r.loads


def test_shortest_queue_follows_loads() -> None:
    r = ShortestQueueRouter(3)
    assert [r.choose([]) for _ in range(3)] == [0, 1, 2]
    r.release(1)
    assert r.choose([]) == 1
    r.release(2)
    r.release(0)
    assert r.loads == [0, 1, 0]
    assert r.choose([]) == 0
    assert r.choose([]) == 2


def test_release_and_bad_arguments() -> None:
    r = ShortestQueueRouter(2)
    with pytest.raises(ValueError, match="no request in flight"):
        r.release(0)
    with pytest.raises(ValueError, match="out of range"):
        r.release(2)
    with pytest.raises(ValueError, match="out of range"):
        r.assign(-1)
    r.set_available(0, False)
    r.set_available(1, False)
    with pytest.raises(NoReplicaError):
        r.choose([1, 2])
    with pytest.raises(ValueError, match="unknown load balance method"):
        make_router("random", 2, 100)
    with pytest.raises(ValueError, match="at least one replica"):
        make_router("round_robin", 0, 100)
    with pytest.raises(ValueError, match="cache_threshold"):
        CacheAwareRouter(2, 100, cache_threshold=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        CacheAwareRouter(2, 0)


def test_cache_aware_prefix_affinity() -> None:
    r = CacheAwareRouter(2, 10_000)
    sys_a = list(range(100, 200))
    sys_b = list(range(300, 400))
    first = r.choose(sys_a + [1, 2])
    # A new prefix goes to the replica with the smallest index (the empty one).
    second = r.choose(sys_b + [1, 2])
    assert {first, second} == {0, 1}
    for q in range(10):
        assert r.choose(sys_a + [q, q]) == first
        assert r.choose(sys_b + [q]) == second
    # The same tokens in another cache namespace share nothing: the smaller tree gets it.
    sizes = [r.index.size(0), r.index.size(1)]
    assert r.choose(sys_a + [7], namespace="salt") == sizes.index(min(sizes))
    assert r.loads == r.routed and sum(r.loads) == 23


def test_cache_aware_threshold_and_imbalance() -> None:
    r = CacheAwareRouter(2, 10_000, cache_threshold=0.5, balance_abs_threshold=3)
    assert r.choose(list(range(10))) == 0
    # Shares 4 of 10 tokens with replica 0's key: below the threshold, so the emptier replica.
    assert r.choose([0, 1, 2, 3, 90, 91, 92, 93, 94, 95]) == 1
    # Shares 6 of 10: above it, so replica 0.
    assert r.choose([0, 1, 2, 3, 4, 5, 80, 81, 82, 83]) == 0
    # Pile load on replica 0 (max - min = 4 > 3 and 5 > 1.5 * 1): the least loaded wins even
    # though replica 0 holds the whole prefix, and the key is recorded for replica 1.
    for _ in range(3):
        r.assign(0)
    assert r.loads == [5, 1]
    assert r.choose(list(range(10))) == 1
    assert r.index.match_prefix(list(range(10)), [1]) == (1, 10)
    # Balanced again: affinity is back.
    for _ in range(4):
        r.release(0)
    assert r.choose(list(range(10)) + [5]) in (0, 1)


def test_forget_and_unavailable_clear_the_index() -> None:
    r = CacheAwareRouter(2, 10_000)
    key = list(range(50))
    assert r.choose(key) == 0
    r.set_available(0, False)
    assert r.index.size(0) == 0
    assert r.choose(key) == 1
    r.set_available(0, True)
    # Replica 0 forgot the key; replica 1 holds it.
    assert r.choose(key) == 1
    r.forget(1)
    assert r.index.size(1) == 0
    assert r.describe()["index_tokens"] == [0, 0]


def test_prefix_index_binding() -> None:
    ix = PrefixIndex(2, 8)
    assert (ix.num_replicas, ix.max_tokens) == (2, 8)
    assert ix.match_prefix([1, 2], []) is None
    assert ix.insert(1, [1, 2, 3]) == 0
    assert ix.insert(1, [1, 2, 3, 4]) == 3
    assert ix.match_prefix([1, 2, 3, 9], [0, 1]) == (1, 3)
    assert ix.match_prefix([1, 2, 3], [0]) == (0, 0)
    assert ix.smallest([0, 1]) == 0
    ix.insert(1, list(range(10, 20)))  # over the cap: the index forgets, least recent first
    assert ix.size(1) <= 8
    with pytest.raises(ValueError, match="out of range"):
        ix.insert(2, [1])
    with pytest.raises(ValueError, match="out of range"):
        ix.match_prefix([1], [0, 5])
    with pytest.raises(ValueError, match="at least one replica"):
        PrefixIndex(0, 8)
    with pytest.raises(OverflowError):
        ix.insert(0, [-1])
    ix.clear(1)
    assert ix.size(1) == 0


def test_merge_stats() -> None:
    a = {"num_running": 1, "pool_size": 100, "used_tokens": 10, "hit_prompt_tokens": 10}
    a |= {"hit_cached_tokens": 5, "cache_hit_rate": 0.5, "new_token_ratio": 0.4}
    b = {"num_running": 2, "pool_size": 100, "used_tokens": 30, "hit_prompt_tokens": 30}
    b |= {"hit_cached_tokens": 25, "cache_hit_rate": 0.83, "new_token_ratio": 0.2}
    m = merge_stats([a, b])
    assert m["num_running"] == 3 and m["pool_size"] == 200
    assert m["token_usage"] == pytest.approx(0.2)
    assert m["cache_hit_rate"] == pytest.approx(0.75)
    assert m["new_token_ratio"] == pytest.approx(0.3)


# ---- live dp servers -------------------------------------------------------------------------

POOL = 2048
LONG_PREFIX = "You are a careful assistant who answers in full sentences. " * 6


class Live:
    def __init__(self, proc: object, base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

    def info(self) -> dict:
        r = httpx.get(self.base + "/server_info", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def routed(self) -> list[int]:
        return self.info()["stats"]["router"]["routed"]


def _start(tiny: dict, tmp: Path, name: str, extra: list[str]) -> Live:
    args = ["--model-path", tiny["llama"], "--max-total-tokens", str(POOL), *extra]
    proc, base = start_server(args, tmp / f"{name}.log", tmp)
    return Live(proc, base, tmp / f"{name}.log")


def _stop(live: Live) -> None:
    proc = live.proc
    if proc.poll() is None:  # type: ignore[attr-defined]
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        try:
            proc.wait(timeout=30)  # type: ignore[attr-defined]
        except Exception:
            proc.kill()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def dp2(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # NOTE: with overlap scheduling, dp1 without: their outputs are compared.
    flags = ["--dp-size", "2", "--enable-overlap-on-cpu"]
    live = _start(tiny_model_paths, tmp_path_factory.mktemp("dp2"), "dp2", flags)
    yield live
    _stop(live)


@pytest.fixture(scope="module")
def dp1(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    live = _start(tiny_model_paths, tmp_path_factory.mktemp("dp1"), "dp1", [])
    yield live
    _stop(live)


def _complete(live: Live, prompt: str, max_tokens: int = 12, **kw: object) -> object:
    return live.client.completions.create(
        model=None,  # type: ignore[arg-type]
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kw,  # type: ignore[arg-type]
    )


def test_server_info_shows_replicas(dp2: Live) -> None:
    info = dp2.info()
    assert info["dp_size"] == 2
    assert info["load_balance_method"] == "cache_aware"
    assert len(info["scheduler_pids"]) == 2
    stats = info["stats"]
    assert len(stats["replicas"]) == 2
    assert stats["pool_size"] == sum(r["pool_size"] for r in stats["replicas"]) == 2 * POOL


def test_greedy_outputs_equal_one_replica(dp1: Live, dp2: Live) -> None:
    """Concurrent greedy completions (spread over both replicas) match a dp-1 server's."""
    # Prompts that share no prefix, so cache-aware routing spreads them by tree size.
    words = ["Apples", "Bridges", "Clouds", "Dragons", "Engines", "Forests", "Gardens", "Harbors"]
    prompts = [f"{w} are the subject of this story" for w in words]

    async def run(live: Live) -> list[tuple[str, int]]:
        client = openai.AsyncOpenAI(base_url=live.base + "/v1", api_key="none", max_retries=0)
        outs = await asyncio.gather(
            *[
                client.completions.create(
                    model=None,  # type: ignore[arg-type]
                    prompt=p,
                    max_tokens=16,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for p in prompts
            ]
        )
        await client.close()
        return [(o.choices[0].text, o.usage.completion_tokens) for o in outs]

    before = dp2.routed()
    want = asyncio.run(run(dp1))
    got = asyncio.run(run(dp2))
    assert got == want
    after = dp2.routed()
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_shared_prefix_stays_on_one_replica_and_hits_the_cache(dp2: Live) -> None:
    before = dp2.routed()
    outs = [_complete(dp2, LONG_PREFIX + f"Question {q}: what is {q} + {q}?") for q in range(4)]
    after = dp2.routed()
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert sorted(delta) == [0, 4], delta
    prompt_tokens = outs[0].usage.prompt_tokens  # type: ignore[attr-defined]
    for o in outs[1:]:
        cached = o.usage.prompt_tokens_details.cached_tokens  # type: ignore[attr-defined]
        assert cached >= prompt_tokens // 2, (cached, prompt_tokens)
    # Another long prefix goes to the other replica (the one with room).
    other = "Translate every sentence you are given into formal English prose. " * 6
    _complete(dp2, other + "Hello")
    delta2 = [a - b for a, b in zip(dp2.routed(), after, strict=True)]
    assert delta2 == [int(d == 0) for d in delta], (delta, delta2)


def test_n_choices_stay_on_one_replica(dp2: Live) -> None:
    before = dp2.routed()
    out = _complete(dp2, "Pick a number between one and ten", n=3)
    delta = [a - b for a, b in zip(dp2.routed(), before, strict=True)]
    assert sorted(delta) == [0, 3], delta
    texts = {c.text for c in out.choices}  # type: ignore[attr-defined]
    assert len(texts) == 1  # greedy: every choice is the same


def _replicas_idle(live: Live, timeout: float = 20.0) -> list[dict]:
    """Polls /server_info until no replica holds a request; then no KV may be request-owned."""
    deadline = time.monotonic() + timeout
    while True:
        reps = live.info()["stats"]["replicas"]
        if all(r["num_running"] == 0 and r["num_waiting"] == 0 for r in reps):
            break
        assert time.monotonic() < deadline, reps
        time.sleep(0.2)
    loads = live.info()["stats"]["router"]["loads"]
    assert loads == [0, 0], loads
    for r in reps:
        assert r["request_owned"] == 0 and r["protected"] == 0, r
        assert r["available"] + r["evictable"] == r["pool_size"], r
    return reps


async def _drop_stream(base: str, i: int) -> None:
    body = {"prompt": f"{LONG_PREFIX} drop {i}", "max_tokens": 500, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                break  # one event, then hang up


async def _give_up(base: str, i: int) -> None:
    body = {"prompt": f"impatient {i}", "max_tokens": 900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.post("/v1/completions", json=body), 0.3)


def test_aborts_and_disconnects_leave_no_kv_on_any_replica(dp2: Live) -> None:
    async def main() -> None:
        await asyncio.gather(
            *[_drop_stream(dp2.base, i) for i in range(6)],
            *[_give_up(dp2.base, i) for i in range(4)],
        )
        # /abort_request of a request running on some replica.
        async with httpx.AsyncClient(base_url=dp2.base, timeout=30) as c:
            # NOTE: streamed, and aborted once its first chunk arrived: a sleep before the
            # abort lets the tiny model finish all its tokens first on a fast machine.
            body = {
                "text": "abort me",
                "rid": "dp-abort-1",
                "stream": True,
                "sampling_params": {"max_new_tokens": 900, "ignore_eos": True},
            }
            chunks = []
            async with c.stream("POST", "/generate", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunks.append(json.loads(line[len("data:") :]))
                    if len(chunks) == 1:
                        r = await c.post("/abort_request", json={"rid": "dp-abort-1"})
                        assert r.status_code == 200, r.text
            assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"

    asyncio.run(asyncio.wait_for(main(), 60))
    _replicas_idle(dp2)
    out = _complete(dp2, "after the aborts")
    assert out.usage.completion_tokens == 12  # type: ignore[attr-defined]
    _replicas_idle(dp2)


def test_flush_cache_empties_every_replica(dp2: Live) -> None:
    _replicas_idle(dp2)
    r = httpx.post(dp2.base + "/flush_cache", timeout=30)
    assert r.status_code == 200, r.text
    info = dp2.info()["stats"]
    assert all(rep["evictable"] == 0 for rep in info["replicas"])
    assert info["router"]["index_tokens"] == [0, 0]


@pytest.fixture(scope="module")
def rr(tiny_model_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    extra = ["--dp-size", "2", "--load-balance-method", "round_robin"]
    live = _start(tiny_model_paths, tmp_path_factory.mktemp("rr"), "rr", extra)
    yield live
    _stop(live)


def test_round_robin_alternates(rr: Live) -> None:
    prompt = LONG_PREFIX + "Same question every time."
    before = rr.routed()
    cached = []
    for _ in range(4):
        out = _complete(rr, prompt, max_tokens=2)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)  # type: ignore[attr-defined]
    delta = [a - b for a, b in zip(rr.routed(), before, strict=True)]
    assert delta == [2, 2]
    # Each replica computes the prompt once: requests 0 and 1 miss, 2 and 3 hit.
    assert cached[0] == 0 and cached[1] == 0, cached
    assert cached[2] > 0 and cached[3] > 0, cached


def test_killed_replica_stops_the_server_without_orphans(rr: Live) -> None:
    pids = rr.info()["scheduler_pids"]
    kids = child_pids(rr.proc.pid)  # type: ignore[attr-defined]
    assert set(pids) <= set(kids)
    os.kill(pids[1], signal.SIGKILL)
    code = rr.proc.wait(timeout=30)  # type: ignore[attr-defined]
    assert code != 0
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if alive(k)]
    assert "scheduler1 process died" in rr.log.read_text()
