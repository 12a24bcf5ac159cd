"""Tests of the `srt._native.BatchScheduler` binding: a driver loop that plays the scheduler
process (prefill, decode, commit, finish) and the errors that bad input raises."""

from __future__ import annotations

import pytest

from srt._native import BatchScheduler, Plan, PrefillEntry


def drive(
    sched: BatchScheduler, max_new: dict[int, int], slots: dict[int, list[int]]
) -> dict[int, list[int]]:
    """Runs every request to max_new_tokens the way the scheduler process does, keeping each
    request's KV slots in `slots`; returns the sampled tokens per request."""
    out: dict[int, list[int]] = {rid: [] for rid in max_new}
    for _ in range(500):
        plan = sched.schedule()
        sampled: list[int] = []
        if plan.kind == "prefill":
            assert plan.entries and not plan.ids
            for e in plan.entries:
                assert isinstance(e, PrefillEntry)
                row = slots.setdefault(e.rid, [])
                del row[e.slots_from :]
                row.extend(e.slots)
                assert len(row) == e.prefix_len + e.extend_len
                if e.is_last_chunk:
                    sampled.append(e.rid)
        elif plan.kind == "decode":
            assert not plan.entries and len(plan.ids) == len(plan.slots)
            for rid in plan.retracted:
                slots.pop(rid, None)
            for rid, slot in zip(plan.ids, plan.slots, strict=True):
                slots[rid].append(slot)
            sampled = list(plan.ids)
        else:
            assert plan.kind == "idle"
            if not any(sched.contains(r) for r in max_new):
                return out
            raise AssertionError("idle with requests in the system")
        tokens = [(rid * 7 + len(out[rid])) % 100 for rid in sampled]
        sched.commit(sampled, tokens)
        for rid, tok in zip(sampled, tokens, strict=True):
            out[rid].append(tok)
            if len(out[rid]) == max_new[rid]:
                sched.finish(rid)
                slots.pop(rid)
        sched.check_invariants()
    raise AssertionError("requests did not finish")


def test_prefill_decode_commit_finish_returns_to_baseline() -> None:
    sched = BatchScheduler(pool_size=256, policy="lpm", chunked_prefill_size=16)
    base = sched.stats()
    assert base == {
        "num_waiting": 0,
        "num_running": 0,
        "pool_size": 256,
        "available": 256,
        "evictable": 0,
        "protected": 0,
        "request_owned": 0,
        "new_token_ratio": pytest.approx(0.7),
    }
    prompt = list(range(100, 140))
    sched.add_request(1, prompt, 5)
    sched.add_request(2, list(range(500, 510)), 3, namespace="salt")
    assert sched.num_waiting == 2 and 1 in sched and sched.contains(2)

    first = sched.schedule()
    assert first.kind == "prefill"
    (e,) = first.entries  # the 40-token prompt is chunked: 16 tokens this step
    assert (e.rid, e.prefix_len, e.extend_len, e.slots_from, e.is_last_chunk) == (
        1,
        0,
        16,
        0,
        False,
    )
    assert len(e.slots) == 16 and 0 not in e.slots  # slot 0 is the padding sink
    assert "PrefillEntry(rid=1" in repr(e)
    sched.check_invariants()

    out = drive(sched, {1: 5, 2: 3}, {1: list(e.slots)})
    assert [len(v) for v in out.values()] == [5, 3]
    st = sched.stats()
    assert st["num_running"] == 0 and st["num_waiting"] == 0 and st["request_owned"] == 0
    assert st["available"] + st["evictable"] == 256 and st["protected"] == 0

    # The finished prompt is cached: an extension of it reuses its KV.
    sched.add_request(3, prompt + [70, 80], 1)
    plan = sched.schedule()
    (e,) = plan.entries
    assert (e.prefix_len, e.cached_len) == (40, 40)
    assert e.extend_len == 2 and e.is_last_chunk
    sched.commit([3], [1])
    sched.finish(3)
    sched.flush_cache()
    assert sched.stats() == base


def test_decode_plan_and_retraction_under_a_small_pool() -> None:
    sched = BatchScheduler(32, init_new_token_ratio=0.1, min_new_token_ratio=0.1)
    for rid in range(3):
        sched.add_request(rid, list(range(rid * 100, rid * 100 + 6)), 12)
    kinds: set[str] = set()
    retracted: list[int] = []
    out = {rid: 0 for rid in range(3)}
    for _ in range(300):
        plan = sched.schedule()
        assert isinstance(plan, Plan)
        kinds.add(plan.kind)
        if plan.kind == "idle":
            break
        retracted += plan.retracted
        ids = (
            [e.rid for e in plan.entries if e.is_last_chunk] if plan.kind == "prefill" else plan.ids
        )
        sched.commit(ids, [1] * len(ids))
        for rid in ids:
            out[rid] += 1
            if out[rid] == 12:
                sched.finish(rid)
        sched.check_invariants()
    assert kinds == {"prefill", "decode", "idle"}
    assert retracted, "3 x 18 tokens cannot all fit in 32 slots"
    assert out == {0: 12, 1: 12, 2: 12}
    assert sched.stats()["request_owned"] == 0


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unknown schedule policy"):
        BatchScheduler(64, policy="sjf")
    with pytest.raises(ValueError, match="multiple of page_size"):
        BatchScheduler(pool_size=30, page_size=4)
    with pytest.raises(ValueError, match="pool_size must be >= 0"):
        BatchScheduler(-1)
    with pytest.raises(ValueError, match="max_running_requests"):
        BatchScheduler(64, max_running_requests=0)
    with pytest.raises(ValueError, match="new_token_ratio"):
        BatchScheduler(64, min_new_token_ratio=0.9)
    # No chunking is allowed.
    BatchScheduler(64, chunked_prefill_size=None)


def test_misuse_raises_value_error_with_the_reason() -> None:
    sched = BatchScheduler(64)
    with pytest.raises(ValueError, match="no input tokens"):
        sched.add_request(1, [], 4)
    sched.add_request(1, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request(1, [4], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        sched.add_request(2, [4], -1)
    with pytest.raises(ValueError, match="unknown request 9"):
        sched.finish(9)
    with pytest.raises(ValueError, match="not waiting for a sampled token"):
        sched.commit([1], [5])
    with pytest.raises(ValueError, match="differ in length"):
        sched.commit([1], [])
    with pytest.raises(ValueError, match="cannot flush the cache while 1 requests"):
        sched.flush_cache()
    assert sched.schedule().kind == "prefill"
    with pytest.raises(ValueError, match="still waits for its sampled token"):
        sched.schedule()
    sched.commit([1], [5])
    sched.finish(1)
    assert not sched.contains(1)
    sched.flush_cache()
    assert sched.schedule().kind == "idle"
