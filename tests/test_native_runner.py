"""The torch-free CPU path: a native bundle saved from the torch ModelRunner, the NativeRunner
built from it, and a scheduler that starts from it without importing torch.

- The NativeRunner runs the ModelRunner's steps bit for bit (prefill in chunks with extra logit
  rows, decode), each applying the steps' table writes to its own pools.
- Two scheduler processes over the same model and cache: the first loads through torch and
  saves the bundle, the second starts from it, never imports torch, and gives the same
  tokens and logprobs for greedy, seeded sampled and penalized requests.
- A bundle is keyed by the model's files, the flags that shape the model and srt's files; a
  damaged one is loaded through torch instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cpu_step import DEFAULT_TYPES, gguf_folder  # noqa: E402
from test_gguf_quant import make_runner  # noqa: E402
from test_model_runner import prompt  # noqa: E402

from srt.model_executor import native_bundle
from srt.model_executor.native_runner import NativeRunner
from srt.model_executor.step_input import StepInput


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SRT_CACHE_DIR", str(root))
    return root


def steps_of(prompts: list[list[int]], chunk: int, first_slot: int) -> list[StepInput]:
    """Prefill steps of `prompts` (rows 0..), `chunk` tokens of each at a time, the last with
    prompt-logprob rows; KV slots from `first_slot` on, table writes included."""
    out = []
    done = [0] * len(prompts)
    slot = first_slot
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        parts: dict[str, list[int]] = {k: [] for k in ("ids", "rows", "seq_lens")}
        parts.update({k: [] for k in ("prefix_lens", "extend_lens", "seq_flags")})
        parts.update({k: [] for k in ("input_ids", "positions", "out_loc")})
        parts.update({k: [] for k in ("table_rows", "table_cols", "table_slots")})
        for row, p in enumerate(prompts):
            start = done[row]
            new = p[start : start + chunk]
            if not new:
                continue
            parts["ids"].append(row)
            parts["rows"].append(row)
            parts["seq_lens"].append(start + len(new))
            parts["prefix_lens"].append(start)
            parts["extend_lens"].append(len(new))
            parts["seq_flags"].append(0)
            for j, tok in enumerate(new):
                parts["input_ids"].append(tok)
                parts["positions"].append(start + j)
                parts["out_loc"].append(slot)
                parts["table_rows"].append(row)
                parts["table_cols"].append(start + j)
                parts["table_slots"].append(slot)
                slot += 1
            done[row] += len(new)
        step = StepInput.pack(False, parts)
        step.extra_logit_indices = [0, len(parts["input_ids"]) - 1]
        out.append(step)
    return out


def decode_step(tokens: list[int], lens: list[int], first_slot: int) -> StepInput:
    n = len(tokens)
    slots = list(range(first_slot, first_slot + n))
    return StepInput.pack(
        True,
        {
            "ids": list(range(n)),
            "rows": list(range(n)),
            "seq_lens": [k + 1 for k in lens],
            "seq_flags": [0] * n,
            "input_ids": tokens,
            "positions": lens,
            "out_loc": slots,
            "table_rows": list(range(n)),
            "table_cols": lens,
            "table_slots": slots,
        },
    )


def test_a_bundle_runs_the_model_runners_steps_bit_for_bit(tmp_path: Path, cache: Path) -> None:
    folder = gguf_folder(tmp_path, DEFAULT_TYPES, tie_word_embeddings=True)
    runner = make_runner(folder, quantization="gguf")
    assert runner.cpu_step is not None
    path = native_bundle.bundle_dir(runner.server_args, "cpu")
    assert path is not None and path.is_relative_to(cache)
    native_bundle.save(path, runner.cpu_step.step.spec, runner.native_meta())
    bundle = native_bundle.load(path)
    assert bundle is not None
    native = NativeRunner(bundle, runner.model_config, runner.server_args)
    assert native.kv_dtype == "bfloat16" and native.dtype == "float32"
    assert native.max_total_num_tokens == runner.max_total_num_tokens
    assert native.table_rows == runner.table_rows
    prompts = [prompt(9, 1), prompt(4, 2), prompt(13, 3)]
    slot = runner.page_size
    for step in steps_of(prompts, 5, slot):
        want = runner.forward_host(step)
        got = native.forward_host(step)
        assert got.shape == (step.num_seqs + 2, native.step.vocab)
        np.testing.assert_array_equal(got, want)
        slot += step.num_tokens
    lens = [len(p) for p in prompts]
    tokens = want[:3].argmax(-1).tolist()
    for _ in range(4):
        step = decode_step(tokens, lens, slot)
        want = runner.forward_host(step)
        np.testing.assert_array_equal(native.forward_host(step), want)
        tokens = want.argmax(-1).tolist()
        lens = [k + 1 for k in lens]
        slot += 3
    # Every KV row the steps wrote, in both pools.
    for k_t, k_n in zip(runner.kv_pool.k_buffers, native.pools.k, strict=True):
        np.testing.assert_array_equal(k_t[:slot].view(torch.int16).numpy(), k_n[:slot])


def test_bundle_keys(tmp_path: Path, cache: Path) -> None:
    folder = gguf_folder(tmp_path, DEFAULT_TYPES, tie_word_embeddings=True)
    runner = make_runner(folder, quantization="gguf")
    args = runner.server_args
    key = native_bundle.bundle_dir(args, "cpu")
    assert key is not None
    assert native_bundle.bundle_dir(args, "cuda") is None
    assert (
        native_bundle.bundle_dir(dataclasses.replace(args, disable_native_decode=True), "cpu")
        is None
    )
    assert native_bundle.bundle_dir(dataclasses.replace(args, tp_size=2), "cpu") is None
    other = native_bundle.bundle_dir(dataclasses.replace(args, kv_cache_dtype="float32"), "cpu")
    assert other is not None and other != key and other.parent == key.parent
    assert native_bundle.load(key) is None  # nothing saved yet
    assert runner.cpu_step is not None
    spec, meta = runner.cpu_step.step.spec, runner.native_meta()
    native_bundle.save(key, spec, meta)
    assert native_bundle.load(key) is not None
    # Another bundle of the same model replaces it.
    native_bundle.save(other, spec, meta)
    assert native_bundle.load(key) is None and native_bundle.load(other) is not None
    # An edited model file is another model.
    config = Path(folder) / "config.json"
    config.write_text(config.read_text() + " ")
    assert native_bundle.bundle_dir(args, "cpu") != key


SCHEDULER = r"""
import json, sys
import numpy as np
import zmq
from srt.managers.io_struct import BatchTokenIDOut, GenerateReq, decode
from srt.managers.scheduler import Scheduler
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

path, requests = sys.argv[1], json.loads(sys.argv[2])
port_args = PortArgs.new()
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL)
pull.bind(port_args.detokenizer_ipc)
args = ServerArgs(model_path=path, tokenizer_path=path, max_total_tokens=4096)
sched = Scheduler(args, port_args)
for i, (ids, params, fields) in enumerate(requests):
    if "logit_bias" in params:  # JSON keys are strings
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    sched.add_request(
        GenerateReq(id=i + 1, input_ids=ids, sampling_params=SamplingParams(**params), **fields)
    )
while sched.has_work():
    sched.run_step()
tokens, logprobs = {}, {}
while pull.poll(300):
    msg = decode(pull.recv())
    if not isinstance(msg, BatchTokenIDOut):
        continue
    ids = np.frombuffer(msg.ids, dtype=np.int64).tolist()
    toks = np.frombuffer(msg.tokens, dtype=np.int64).tolist()
    for rid, tok in zip(ids, toks):
        tokens.setdefault(rid, []).append(tok)
    for rid, delta in msg.logprobs:
        logprobs.setdefault(rid, []).extend(delta.output_logprobs)
sched.close()
print(json.dumps({
    "tokens": tokens,
    "logprobs": logprobs,
    "runner": type(sched.runner).__name__,
    "torch": "torch" in sys.modules,
}))
"""


def run_scheduler(folder: str, cache: Path, requests: list) -> dict:
    env = {**os.environ, "SRT_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", SCHEDULER, folder, json.dumps(requests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_scheduler_starts_without_torch_and_answers_the_same(
    tmp_path: Path, cache: Path
) -> None:
    folder = gguf_folder(tmp_path, DEFAULT_TYPES, tie_word_embeddings=True)
    logprobs = {"return_logprob": True, "top_logprobs_num": 2}
    requests = [
        (prompt(12, 1), {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}, {}),
        (
            prompt(30, 2),
            {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 10},
            {},
        ),
        (
            prompt(5, 3),
            {"frequency_penalty": 0.5, "logit_bias": {"9": 3.0}, "max_new_tokens": 6},
            logprobs,
        ),
        (prompt(12, 1), {"temperature": 0, "max_new_tokens": 4}, logprobs),  # a cached prefix
    ]
    first = run_scheduler(folder, cache, requests)
    assert first["runner"] == "ModelRunner" and first["torch"]
    assert list((cache / "native").glob("*/*/spec.json")), "no bundle saved"
    second = run_scheduler(folder, cache, requests)
    assert second["runner"] == "NativeRunner"
    assert not second["torch"], "the scheduler imported torch"
    assert second["tokens"] == first["tokens"]
    assert len(second["tokens"]) == 4 and len(second["tokens"]["1"]) == 8
    assert second["logprobs"] == first["logprobs"] and second["logprobs"]["3"]
    # A bundle the decoder refuses (damaged on disk): the next start loads through torch.
    (spec_file,) = (cache / "native").glob("*/*/spec.json")
    doc = json.loads(spec_file.read_text())
    doc["spec"]["d"]["hidden"] += 1
    spec_file.write_text(json.dumps(doc))
    third = run_scheduler(folder, cache, requests)
    assert third["runner"] == "ModelRunner" and third["tokens"] == first["tokens"]
