"""Scheduler process logic in-process: continuous batching over the Rust plan, prefix reuse,
chunked prefill, eviction and retraction under a small KV pool, against HF transformers, with
overlap scheduling on and off.

The scheduler runs without its process wrapper: requests go straight to `add_request`, steps
run one by one, and its `BatchTokenIDOut` messages are read from the detokenizer socket.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
import zmq

from srt.managers.io_struct import BatchTokenIDOut, GenerateReq, LogprobDelta, decode
from srt.managers.scheduler import Scheduler
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

OVERLAP = [pytest.param(True, id="overlap"), pytest.param(False, id="no-overlap")]


class Harness:
    """A Scheduler driven in-process; requests are named by strings here and get integer ids
    as main gives them."""

    def __init__(self, model_path: str, overlap: bool = True, **server_kwargs: object) -> None:
        self.port_args = PortArgs.new()
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.port_args.detokenizer_ipc)
        args = ServerArgs(
            model_path=model_path,
            tokenizer_path=model_path,
            disable_overlap_schedule=not overlap,
            enable_overlap_on_cpu=overlap,
            **server_kwargs,
        )
        self.sched = Scheduler(args, self.port_args)
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, dict] = {}
        self.cached: dict[str, int] = {}
        self.kinds: list[str] = []
        self.messages: list[BatchTokenIDOut] = []
        self.logprobs: dict[str, LogprobDelta] = {}

    @property
    def retracted(self) -> int:
        return int(self.sched.core.stats()["retracted_total"])

    def req(
        self, name: str, ids: list[int], fields: dict | None = None, **params: object
    ) -> GenerateReq:
        """The GenerateReq main would send: `fields` are its own fields (logprobs, cache
        salt, created_time), `params` the sampling parameters."""
        rid = self.ids.setdefault(name, len(self.ids) + 1)
        self.names[rid] = name
        return GenerateReq(
            id=rid, input_ids=ids, sampling_params=SamplingParams(**params), **(fields or {})
        )

    def submit(
        self, name: str, ids: list[int], fields: dict | None = None, **params: object
    ) -> None:
        self.sched.add_request(self.req(name, ids, fields, **params))

    def step(self) -> str:
        kind = self.sched.run_step()
        self.kinds.append(kind)
        self.sched.core.check_invariants()
        return kind

    def settle(self) -> None:
        """Waits for the steps in flight and processes them (tests that change the runner
        between steps must not race the step worker)."""
        self.sched.process_in_flight(keep=0)

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                break
            self.step()
        assert not self.sched.has_work(), "requests still in the system after max_steps"
        self.collect()

    def collect(self) -> None:
        """Reads every message the scheduler sent so far."""
        while self.pull.poll(100):
            msg = decode(self.pull.recv())
            assert isinstance(msg, BatchTokenIDOut)
            self.messages.append(msg)
            ids = np.frombuffer(msg.ids, dtype=np.int64).tolist()
            tokens = np.frombuffer(msg.tokens, dtype=np.int64).tolist()
            assert len(set(ids)) == len(ids), "two tokens of one request in one message"
            for rid, tok in zip(ids, tokens, strict=True):
                name = self.names[rid]
                assert name not in self.finished, "a token after the finish"
                self.outputs.setdefault(name, []).append(tok)
            for rid, cached in msg.cached:
                self.cached[self.names[rid]] = cached
            for rid, delta in msg.logprobs:
                acc = self.logprobs.setdefault(self.names[rid], LogprobDelta())
                for field in LogprobDelta.__struct_fields__:
                    getattr(acc, field).extend(getattr(delta, field))
            for f in msg.finished:
                name = self.names[f.id]
                assert name not in self.finished, "a request finished twice"
                self.finished[name] = f.reason.to_json()
                self.cached[name] = f.cached_tokens
                assert f.completion_tokens == len(self.outputs.get(name, []))

    def assert_pool_returned(self) -> None:
        stats = self.sched.core.stats()
        assert stats["request_owned"] == 0
        assert stats["num_requests"] == 0 and stats["in_flight"] == 0
        tree = stats["evictable"] + stats["protected"]
        assert stats["protected"] == 0
        assert stats["available"] + tree == self.sched.pool_size
        assert stats["rows_free"] == self.sched.max_running

    def close(self) -> None:
        self.pull.close(linger=0)
        self.sched.close()
        self.ctx.term()
        self.port_args.cleanup()


def hf_greedy(model: transformers.PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """Reference greedy continuation (no EOS stop), recomputing the whole sequence each step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def make_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Prompts drawn from a few shared prefixes, so the prefix cache has work to do."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))] for _ in range(3)]
    return [
        rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))]
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def hf_models(tiny_model_paths: dict[str, str]) -> dict[str, transformers.PreTrainedModel]:
    return {
        arch: transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        for arch, path in tiny_model_paths.items()
    }


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_equals_hf(
    arch: str, overlap: bool, tiny_model_paths: dict, hf_models: dict
) -> None:
    """Many requests batched together (continuous batching, shared prefixes) give HF's greedy
    output for every architecture."""
    h = Harness(tiny_model_paths[arch], overlap, max_total_tokens=4096, chunked_prefill_size=32)
    try:
        prompts = make_prompts(h.sched.vocab_size, 8, seed=1)
        for i, p in enumerate(prompts):
            h.submit(f"r{i}", p, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        h.run()
        for i, p in enumerate(prompts):
            assert h.outputs[f"r{i}"] == hf_greedy(hf_models[arch], p, 12), f"request r{i}"
            assert h.finished[f"r{i}"] == {"type": "length", "length": 12}
        assert sum(h.cached.values()) > 0, "shared prefixes were never reused"
        h.assert_pool_returned()
    finally:
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize("page_size", [1, 4])
def test_small_pool_evicts_and_retracts_without_changing_outputs(
    page_size: int, overlap: bool, tiny_model_paths: dict, hf_models: dict
) -> None:
    """A KV pool too small for all requests at once forces eviction and retraction; every
    request still completes with its greedy output and no slot leaks."""
    h = Harness(
        tiny_model_paths["llama"],
        overlap,
        max_total_tokens=192,
        page_size=page_size,
        chunked_prefill_size=16,
        max_running_requests=16,
        schedule_policy="lpm",
    )
    try:
        prompts = make_prompts(h.sched.vocab_size, 12, seed=2)
        for i, p in enumerate(prompts):
            h.submit(f"r{i}", p, max_new_tokens=40, temperature=0.0, ignore_eos=True)
        h.run()
        assert h.retracted > 0, "the pool was meant to be too small to avoid retraction"
        for i, p in enumerate(prompts):
            assert h.outputs[f"r{i}"] == hf_greedy(hf_models["llama"], p, 40), f"request r{i}"
        h.assert_pool_returned()
    finally:
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_long_prompt_is_chunked(overlap: bool, tiny_model_paths: dict, hf_models: dict) -> None:
    h = Harness(tiny_model_paths["qwen2"], overlap, max_total_tokens=1024, chunked_prefill_size=16)
    try:
        prompt = make_prompts(h.sched.vocab_size, 1, seed=3)[0] * 4  # > 3 chunks
        h.submit("long", prompt, max_new_tokens=6, temperature=0.0, ignore_eos=True)
        h.submit("short", prompt[:5], max_new_tokens=6, temperature=0.0, ignore_eos=True)
        h.run()
        assert h.kinds.count("prefill") >= len(prompt) // 16
        assert h.outputs["long"] == hf_greedy(hf_models["qwen2"], prompt, 6)
        assert h.outputs["short"] == hf_greedy(hf_models["qwen2"], prompt[:5], 6)
        h.assert_pool_returned()
    finally:
        h.close()


def test_prefix_reuse_reports_cached_tokens(tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], max_total_tokens=1024)
    try:
        prompt = list(range(10, 50))
        h.submit("first", prompt, max_new_tokens=4, temperature=0.0)
        h.run()
        h.submit("second", prompt, max_new_tokens=4, temperature=0.0)
        h.run()
        assert h.cached["first"] == 0
        assert h.cached["second"] >= len(prompt) - 1
        assert h.outputs["first"] == h.outputs["second"]
    finally:
        h.close()


def test_disabled_radix_cache_reuses_nothing(tiny_model_paths: dict) -> None:
    h = Harness(tiny_model_paths["llama"], max_total_tokens=1024, disable_radix_cache=True)
    try:
        prompt = list(range(10, 50))
        h.submit("first", prompt, max_new_tokens=4, temperature=0.0)
        h.run()
        h.submit("second", prompt, max_new_tokens=4, temperature=0.0)
        h.run()
        assert h.cached["second"] == 0
        assert h.outputs["first"] == h.outputs["second"]
        stats = h.sched.core.stats()
        assert stats["available"] == h.sched.pool_size
    finally:
        h.close()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_finish_reasons(overlap: bool, tiny_model_paths: dict, hf_models: dict) -> None:
    """EOS / stop_token_ids, stop strings, max_new_tokens and the context length, decided
    once, in the scheduler (with overlap, one step late: the extra token never shows)."""
    from srt._native import Detokenizer

    path = tiny_model_paths["llama"]
    h = Harness(path, overlap, max_total_tokens=2048, context_length=64)
    try:
        prompt = list(range(10, 30))
        ref = hf_greedy(hf_models["llama"], prompt, 30)
        h.submit("stop_id", prompt, max_new_tokens=30, temperature=0.0, stop_token_ids=[ref[3]])
        h.submit("length", prompt, max_new_tokens=5, temperature=0.0, ignore_eos=True)
        h.submit("context", prompt, max_new_tokens=None, temperature=0.0, ignore_eos=True)
        tok = Detokenizer(path)
        text = tok.decode(ref[:8], True)
        stop = text[len(tok.decode(ref[:5], True)) :][:2] if len(text) > 2 else None
        if stop:
            h.submit("stop_str", prompt, max_new_tokens=30, temperature=0.0, stop=[stop])
        h.submit("zero", prompt, max_new_tokens=0)
        h.submit("abort_empty", [], max_new_tokens=3)
        h.run()
        first = ref.index(ref[3])
        assert h.finished["stop_id"] == {"type": "stop", "matched": ref[3]}
        assert h.outputs["stop_id"] == ref[: first + 1]
        assert h.finished["length"] == {"type": "length", "length": 5}
        assert len(h.outputs["context"]) == 64 - len(prompt)
        assert h.finished["context"]["type"] == "length"
        if stop:
            assert h.finished["stop_str"] == {"type": "stop", "matched": stop}
            assert len(h.outputs["stop_str"]) <= 8
        assert h.finished["zero"] == {"type": "length", "length": 0}
        assert h.outputs.get("zero", []) == []
        assert h.finished["abort_empty"]["type"] == "abort"
        h.assert_pool_returned()
    finally:
        h.close()


def test_tokenizer_eos_counts_as_eos(tmp_path, tiny_model_paths: dict) -> None:
    """EOS comes from generation_config, config.json and the tokenizer's eos_token."""
    import json
    import shutil

    from srt.managers.admission import tokenizer_eos_id

    model = tmp_path / "model"
    shutil.copytree(tiny_model_paths["llama"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"  # differs from generation_config's <|im_end|>
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_eos_id(str(model)) == 0
    h = Harness(str(model), max_total_tokens=512)
    try:
        assert h.sched.eos_ids == {0, 2}
    finally:
        h.close()
