"""Tensor and pipeline parallel on CPU (gloo), through the HTTP server: greedy output is token
for token that of HF transformers (and so of tp 1) on every tiny model; prompt logprobs
survive the pipeline's micro-batching; several nodes meet over --dist-init-addr; a dead rank
takes the server down with no orphans; a bad split is a clear startup error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from _live import alive, child_pids, free_port, start_server, subprocess_env
from transformers import AutoModelForCausalLM, GenerationConfig

from srt.model_executor.step_input import StepInput
from srt.testing.tiny_model import make_tiny_model

# Prompts of different lengths, so a step's micro-batches differ in size.
PROMPTS = [
    [5 + (i * 37) % 400 for i in range(23)],
    [7 + (i * 11) % 300 for i in range(5)],
    [9 + (i * 53) % 450 for i in range(14)],
    [3, 4, 5],
]
STEPS = 12


def hf_greedy(path: str, prompts: list[list[int]], steps: int) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    outs = []
    for ids in prompts:
        seq = hf.generate(torch.tensor([ids]), generation_config=gen)
        outs.append(seq[0, len(ids) :].tolist())
    return outs


def generate(base: str, prompts: list[list[int]], **extra: object) -> list[dict]:
    body = {
        "input_ids": prompts,
        "sampling_params": {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True},
        **extra,
    }
    r = httpx.post(base + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("parallel", [["--tp-size", "2"], ["--pp-size", "2"]], ids=["tp2", "pp2"])
def test_parallel_greedy_equals_hf(
    arch: str, parallel: list[str], tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    path = tiny_model_paths[arch]
    proc, base = start_server(
        ["--model-path", path, "--max-total-tokens", "2048", *parallel], tmp_path / "log", tmp_path
    )
    try:
        outs = generate(base, PROMPTS)
        # The same prompts again: now served from the prefix cache, on every rank's KV.
        again = generate(base, PROMPTS)
    finally:
        assert stop(proc) == 0
    want = hf_greedy(path, PROMPTS, STEPS)
    assert [o["output_ids"] for o in outs] == want
    assert [o["output_ids"] for o in again] == want
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again[:3])
    log = (tmp_path / "log").read_text()
    assert "scheduler-rank1 process ready" in log


def test_tp4_pp2_tied_replicated_kv_heads_and_logprobs(tmp_path: Path) -> None:
    """tp 4 over a model of 2 KV heads (each held by two ranks) times 2 stages (8 ranks), with
    tied embeddings (the last stage holds its own copy for the lm_head); prompt and output
    logprobs cross the pipeline's micro-batches intact. With overlap scheduling (off by
    default on CPU, which the other tests here run): rank 0 plans a step while the ranks run
    the one before."""
    path = make_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    flags = ["--tp-size", "4", "--pp-size", "2", "--enable-overlap-on-cpu"]
    proc, base = start_server(
        ["--model-path", path, "--max-total-tokens", "1024", *flags],
        tmp_path / "log",
        tmp_path,
        timeout=240,
    )
    try:
        outs = generate(base, PROMPTS, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    finally:
        assert stop(proc) == 0
    assert [o["output_ids"] for o in outs] == hf_greedy(path, PROMPTS, STEPS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for ids, out in zip(PROMPTS, outs, strict=True):
        full = ids + out["output_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)
        meta = out["meta_info"]
        got_in = [v for v, _, _ in meta["input_token_logprobs"][1:]]
        want_in = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
        assert got_in == pytest.approx(want_in, abs=1e-4)
        got_out = [v for v, _, _ in meta["output_token_logprobs"]]
        n = len(ids)
        want_out = [float(ref[n - 1 + j, t]) for j, t in enumerate(out["output_ids"])]
        assert got_out == pytest.approx(want_out, abs=1e-4)
    log = (tmp_path / "log").read_text()
    assert "scheduler-rank7 process ready" in log
    assert "1 KV heads" in log


def test_dp2_tp2_replicas_each_sharded(tiny_model_paths: dict[str, str], tmp_path: Path) -> None:
    """Two round-robin replicas of two TP ranks each (own rendezvous, own KV pools)."""
    path = tiny_model_paths["qwen3"]
    flags = ["--dp-size", "2", "--tp-size", "2", "--load-balance-method", "round_robin"]
    proc, base = start_server(
        ["--model-path", path, "--max-total-tokens", "1024", *flags], tmp_path / "log", tmp_path
    )
    try:
        outs = [generate(base, [ids])[0] for ids in PROMPTS]
        info = httpx.get(base + "/server_info", timeout=10).json()
    finally:
        assert stop(proc) == 0
    assert [o["output_ids"] for o in outs] == hf_greedy(path, PROMPTS, STEPS)
    assert info["stats"]["router"]["routed"] == [2, 2]
    log = (tmp_path / "log").read_text()
    assert "scheduler1-rank1 process ready" in log


def test_two_nodes_meet_over_dist_init_addr(
    tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    """--nnodes 2: node 0 serves HTTP with rank 0, node 1 runs rank 1 alone; stopping node 0
    ends node 1 too."""
    path = tiny_model_paths["qwen2"]
    common = ["--model-path", path, "--max-total-tokens", "1024", "--tp-size", "2"]
    dist = ["--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    node1_log = tmp_path / "node1.log"
    with open(node1_log, "wb") as out:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "srt", "serve", *common, *dist, "--node-rank", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(TMPDIR=str(tmp_path)),
        )
    try:
        proc, base = start_server(
            [*common, *dist, "--node-rank", "0"], tmp_path / "log", tmp_path, timeout=180
        )
        try:
            outs = generate(base, PROMPTS[:2])
            node1_text = node1_log.read_text()
            assert "srt node 1: ranks 1..1 of 2 ready" in node1_text
            found = re.search(r"scheduler-rank1 process ready \(pid (\d+)\)", node1_text)
            node1_kids = child_pids(node1.pid)
            assert found and int(found.group(1)) in node1_kids
            assert "detokenizer" not in node1_text  # node 0 runs it
        finally:
            assert stop(proc) == 0
        # Node 1's rank loses its peer and ends; node 1 follows, leaving no process behind.
        code = node1.wait(timeout=60)
        assert code != 0
        # NOTE: a child may take a moment after its parent's exit to finish its own (it
        # failed once that way on a loaded CI machine); an orphan would never end.
        deadline = time.monotonic() + 15
        while any(alive(p) for p in node1_kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in node1_kids)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert [o["output_ids"] for o in outs] == hf_greedy(path, PROMPTS[:2], STEPS)


def test_dead_rank_stops_the_server(tiny_model_paths: dict[str, str], tmp_path: Path) -> None:
    proc, base = start_server(
        ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "1024", "--pp-size", "2"],
        tmp_path / "log",
        tmp_path,
    )
    try:
        kids = child_pids(proc.pid)
        found = re.search(
            r"scheduler-rank1 process ready \(pid (\d+)\)", (tmp_path / "log").read_text()
        )
        assert found and int(found.group(1)) in kids
        os.kill(int(found.group(1)), signal.SIGKILL)
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in kids), "a rank outlived the server"
        assert not list(tmp_path.glob("srt-ipc-*"))
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tp-size", "3"], "4 attention heads are not divisible by --tp-size 3"),
        (["--pp-size", "3"], "--pp-size 3 exceeds the model's 2 layers"),
    ],
)
def test_bad_split_is_a_startup_error(
    flags: list[str], message: str, tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "srt", "serve", "--model-path", tiny_model_paths["llama"]]
    result = subprocess.run(
        [*cmd, "--max-total-tokens", "512", "--port", str(free_port()), *flags],
        capture_output=True,
        text=True,
        timeout=180,
        env=subprocess_env(TMPDIR=str(tmp_path)),
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert not list(tmp_path.glob("srt-ipc-*"))


def test_step_split_keeps_logit_rows_in_order() -> None:
    """Micro-batches of an extend step: tokens, sequences and prompt-logprob rows partition
    the step, and last-rows-then-extras of each concatenate to the step's own layout; the
    wire form a rank receives rebuilds the same step."""
    step = StepInput.build(
        False,
        input_ids=list(range(10)),
        out_cache_loc=list(range(100, 110)),
        rows=[0, 1, 2],
        seq_lens=[4, 3, 5],
        prefix_lens=[0, 1, 2],
        extend_lens=[4, 2, 4],
    )
    step.extra_logit_indices = [1, 2, 7, 8]
    parts = step.split(2)
    assert [p.section("rows").tolist() for p in parts] == [[0], [1, 2]]
    assert [p.section("input_ids").tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert [p.section("positions").tolist() for p in parts] == [[0, 1, 2, 3], [1, 2, 2, 3, 4, 5]]
    assert [p.extra_logit_indices for p in parts] == [[1, 2], [3, 4]]
    assert [p.num_logit_rows for p in parts] == [3, 4]
    assert len(step.split(5)) == len(step.split(3)) == 3  # never more parts than sequences
    wire = StepInput.decode_bytes(step.encode())
    assert wire.decode is False and wire.extra_logit_indices == [1, 2, 7, 8]
    assert wire.ints.tolist() == step.ints.tolist() and wire.offsets == step.offsets
    decode = StepInput.build(
        True, input_ids=[1, 2, 3], out_cache_loc=[7, 8, 9], rows=[0, 1, 2], seq_lens=[5, 6, 7]
    )
    assert [p.section("seq_lens").tolist() for p in decode.split(2)] == [[5], [6, 7]]
    assert decode.section("positions").tolist() == [4, 5, 6]


def test_one_batch_refuses_parallel_flags(
    tiny_model_paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """one-batch runs one in-process rank: it must not silently measure an unsharded model."""
    from srt.bench.__main__ import main

    argv = ["one-batch", "--model-path", tiny_model_paths["llama"], "--tp-size", "2"]
    assert main(argv) == 1
    assert "measure --tp-size" in capsys.readouterr().err
