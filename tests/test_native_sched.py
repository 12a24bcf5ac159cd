"""Tests of the `srt._native.BatchScheduler` binding: a driver loop that plays the scheduler
process and the model runner (it applies each step's table writes to its own table, checks
what each sequence reads, samples, commits one step late as overlap does), the finishes the
request record decides, the admission arrays, and the errors that bad input raises."""

from __future__ import annotations

import numpy as np
import pytest

from srt._native import (
    FLAG_GREEDY,
    FLAG_SAMPLED,
    FLAG_TOP_K_P,
    STEP_FLOAT_SECTIONS,
    STEP_SECTIONS,
    BatchScheduler,
    CommitResult,
    Step,
)
from srt.model_executor.step_input import StepInput

ROWS = 8
COLS = 512


def drive(sched: BatchScheduler, overlap: bool, max_steps: int = 500) -> dict[int, list[int]]:
    """Runs every request to its end; returns the committed tokens per request. Sampled tokens
    are a function of the sequence, so overlap must not change them."""
    table = np.full((ROWS, COLS), -1, dtype=np.int64)
    seqs: dict[int, list[int]] = {}  # every token the "device" knows, per request
    prompt_len: dict[int, int] = {}
    out: dict[int, list[int]] = {}
    uncommitted: list[tuple[list[int], np.ndarray]] = []

    def commit() -> None:
        ids, tokens = uncommitted.pop(0)
        res = sched.commit(tokens)
        assert isinstance(res, CommitResult)
        for rid, tok in zip(res.ids.tolist(), res.tokens.tolist(), strict=True):
            out.setdefault(rid, []).append(tok)
        for rid, kind, value, completion, _ in res.finished:
            assert kind == "length" and value == completion == len(out[rid])

    for _ in range(max_steps):
        native = sched.schedule()
        assert isinstance(native, Step)
        step = StepInput.from_native(native)
        if native.kind == "idle":
            while uncommitted:
                commit()
            if sched.num_requests == 0:
                return out
            continue
        table[step.section("table_rows"), step.section("table_cols")] = step.section("table_slots")
        ids = step.section("ids").tolist()
        rows = step.section("rows")
        seq_lens = step.section("seq_lens")
        for i, rid in enumerate(ids):
            if rid not in seqs:
                seqs[rid] = list(sched.tokens(rid) or [])
                prompt_len[rid] = len(seqs[rid])
            written = table[rows[i], : seq_lens[i]]
            assert (written > 0).all(), f"request {rid} reads an unwritten table entry"
            assert len(set(written.tolist())) == len(written), "a slot twice in one row"
        positions = step.section("positions")
        inputs = step.section("input_ids")
        owner = np.arange(len(ids))
        if not step.decode:
            owner = np.repeat(owner, step.section("extend_lens"))
        for t, pos in enumerate(positions.tolist()):
            seq = seqs[ids[owner[t]]]
            assert inputs[t] in (-1, seq[pos]), "input id of the wrong position"
            assert step.section("out_loc")[t] == table[rows[owner[t]], pos]
        sampled = []
        for k, pos in enumerate(step.section("sample_pos").tolist()):
            seq = seqs[ids[pos]]
            assert step.section("sample_steps")[k] == len(seq) - prompt_len[ids[pos]]
            tok = (sum(seq) * 31 + len(seq)) % 97
            seq.append(tok)
            sampled.append(tok)
        uncommitted.append((ids, np.asarray(sampled, dtype=np.int64)))
        while len(uncommitted) > (1 if overlap else 0):
            commit()
        sched.check_invariants()
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("overlap", [False, True])
def test_steps_commits_and_finishes_return_to_baseline(overlap: bool) -> None:
    sched = BatchScheduler(
        pool_size=256, policy="lpm", chunked_prefill_size=16, max_running_requests=ROWS
    )
    base = sched.stats()
    assert base["num_requests"] == 0 and base["available"] == 256
    assert base["rows_free"] == ROWS and base["in_flight"] == 0
    prompt = list(range(100, 140))
    sched.add_request(1, prompt, 5)
    sched.add_request(2, list(range(500, 510)), 3, namespace="salt")
    assert sched.num_waiting == 2 and 1 in sched and sched.contains(2)
    out = drive(sched, overlap)
    assert [len(out[1]), len(out[2])] == [5, 3]
    st = sched.stats()
    assert st["num_requests"] == 0 and st["request_owned"] == 0 and st["rows_free"] == ROWS
    assert st["available"] + st["evictable"] == 256 and st["protected"] == 0
    # The finished prompt is cached: an extension of it reuses its KV.
    sched.add_request(3, prompt + [70, 80], 1)
    step = StepInput.from_native(sched.schedule())
    assert step.section("prefix_lens").tolist() == [40]
    assert step.section("extend_lens").tolist() == [2]
    res = sched.commit(np.asarray([7], dtype=np.int64))
    assert res.first == [(3, 40)]
    assert res.finished == [(3, "length", 1, 1, 40)]
    sched.flush_cache()
    assert sched.stats()["available"] == 256


def test_overlap_does_not_change_outputs() -> None:
    outs = []
    for overlap in (False, True):
        sched = BatchScheduler(
            64, init_new_token_ratio=0.1, min_new_token_ratio=0.1, max_running_requests=ROWS
        )
        for rid in range(4):
            sched.add_request(rid, list(range(rid * 100, rid * 100 + 6)), 12)
        outs.append(drive(sched, overlap))
        assert sched.stats()["retracted_total"] > 0, "4 x 18 tokens cannot all fit in 64 slots"
    assert outs[0] == outs[1]


def test_the_request_record_decides_stop_ids_and_stop_strings(tiny_model_paths: dict) -> None:
    from tokenizers import Tokenizer

    path = tiny_model_paths["llama"]
    tok = Tokenizer.from_file(f"{path}/tokenizer.json")
    sched = BatchScheduler(256, tokenizer_path=path)
    sched.add_request(1, [5, 6], 10, stop_ids=[9], min_new_tokens=2)
    text_ids = tok.encode("the quick brown fox").ids
    sched.add_request(2, [5, 6], 20, stop=["brown"])
    first = sched.schedule()
    assert first.flags & FLAG_GREEDY and not first.flags & FLAG_SAMPLED
    mask = StepInput.from_native(first).section("mask_tokens")
    assert mask.tolist() == [9], "stop id 9 is masked before min_new_tokens"
    feed = {1: [9, 3, 9], 2: text_ids}
    finished = {}
    for n in range(len(text_ids)):
        if n:
            sched.schedule()
        ids = [1, 2] if 1 not in finished else [2]
        toks = [feed[r][n] if n < len(feed[r]) else 0 for r in ids]
        res = sched.commit(np.asarray(toks, dtype=np.int64))
        for rid, kind, value, completion, _ in res.finished:
            finished[rid] = (kind, value, completion)
        if 2 in finished:
            break
    assert finished[1] == ("stop", 9, 3), "a stop id only ends after min_new_tokens"
    assert finished[2][:2] == ("stop", "brown")
    assert sched.num_requests == 0


def test_admission_arrays_carry_the_sampling_parameters() -> None:
    sched = BatchScheduler(256, max_running_requests=ROWS)
    sched.add_request(
        1,
        [1, 2, 3],
        4,
        temperature=0.5,
        top_p=0.8,
        top_k=7,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
        seed=2**64 - 1,
        logit_bias=[(5, 1.5)],
    )
    native = sched.schedule()
    assert native.flags & FLAG_TOP_K_P and native.top_k_max == 7
    step = StepInput.from_native(native)
    assert len(STEP_SECTIONS) == len(step.offsets) - 1
    assert len(STEP_FLOAT_SECTIONS) == len(step.float_offsets) - 1
    assert step.section("admit_rows").tolist() == [0]
    assert step.section("admit_top_k").tolist() == [7]
    assert step.section("admit_seed").tolist() == [-1]
    assert step.float_section("admit_floats").tolist() == pytest.approx(
        [0.5, 0.8, 0.0, 1.1, 0.2, 0.0]
    )
    assert step.section("bias_tokens").tolist() == [5]
    assert step.float_section("bias_values").tolist() == [1.5]
    assert step.section("seen_tokens").tolist() == [1, 2, 3]


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
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        BatchScheduler(64, tokenizer_path="/nonexistent")
    BatchScheduler(64, chunked_prefill_size=None)  # no chunking is allowed


def test_misuse_raises_value_error_with_the_reason() -> None:
    sched = BatchScheduler(64)
    with pytest.raises(ValueError, match="no input tokens"):
        sched.add_request(1, [], 4)
    sched.add_request(1, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request(1, [4], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        sched.add_request(2, [4], -1)
    with pytest.raises(ValueError, match="no stop checker"):
        sched.add_request(3, [4], 4, stop=["x"])
    with pytest.raises(ValueError, match="unknown request 9"):
        sched.finish(9)
    with pytest.raises(ValueError, match="no step is waiting"):
        sched.commit(np.zeros(1, dtype=np.int64))
    assert sched.schedule().kind == "prefill"
    with pytest.raises(ValueError, match="sampled 1"):
        sched.commit(np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="is not a token id"):
        sched.commit(np.asarray([-5], dtype=np.int64))
    assert sched.schedule().kind == "decode"  # one step may stay uncommitted
    with pytest.raises(ValueError, match="2 steps are uncommitted"):
        sched.schedule()
    sched.commit(np.asarray([5], dtype=np.int64))
    sched.commit(np.asarray([6], dtype=np.int64))
    assert sched.tokens(1) == [1, 2, 3, 5, 6]
    assert sched.finish(1) == (2, 0)
    assert not sched.contains(1)
    sched.flush_cache()
    assert sched.schedule().kind == "idle"
