"""ModelRunner on CPU (fp32) against HF transformers as the oracle, on tiny random-weight models.

A small `Sched` stands in for the scheduler: it hands out KV slots from `page_size` upward (page
0 is the padding sink), writes `req_to_token` and builds ForwardBatches the way the real one does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from srt.configs.model_config import ModelConfig
from srt.layers.rotary import rope_settings
from srt.mem_cache.memory_pool import ReqToTokenPool
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.server_args import ServerArgs
from srt.testing.tiny_model import ARCHS, make_tiny_model

ATOL = 1e-4


@dataclass
class Req:
    row: int
    slots: list[int] = field(default_factory=list)  # KV slot of each cached position


class Sched:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_slot = runner.page_size
        self.next_row = 0

    def new_req(self, shared_prefix: list[int] | None = None) -> Req:
        row = self.next_row
        self.next_row += 1
        assert row < self.runner.req_to_token_pool.pad_row
        req = Req(row, list(shared_prefix or []))
        if req.slots:
            self.runner.req_to_token_pool.write_runs([row], [0], req.slots, [len(req.slots)])
        return req

    def _alloc(self, n: int) -> list[int]:
        slots = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        assert self.next_slot <= self.runner.page_size + self.runner.max_total_num_tokens
        return slots

    def extend(self, reqs: list[Req], new_ids: list[list[int]]) -> torch.Tensor:
        prefix = [len(r.slots) for r in reqs]
        lens = [len(ids) for ids in new_ids]
        out_loc = self._alloc(sum(lens))
        self.runner.req_to_token_pool.write_runs([r.row for r in reqs], prefix, out_loc, lens)
        start = 0
        for r, n in zip(reqs, lens, strict=True):
            r.slots += out_loc[start : start + n]
            start += n
        flat = [t for ids in new_ids for t in ids]
        batch = ForwardBatch.extend(flat, out_loc, [r.row for r in reqs], prefix, lens, "cpu")
        return self.runner.forward(batch)

    def decode(self, reqs: list[Req], tokens: list[int]) -> torch.Tensor:
        out_loc = self._alloc(len(reqs))
        self.runner.req_to_token_pool.write_runs(
            [r.row for r in reqs], [len(r.slots) for r in reqs], out_loc
        )
        for r, s in zip(reqs, out_loc, strict=True):
            r.slots.append(s)
        seq_lens = [len(r.slots) for r in reqs]
        return self.runner.forward(
            ForwardBatch.decode(tokens, out_loc, [r.row for r in reqs], seq_lens, "cpu")
        )


def make_runner(path: str, **kwargs: object) -> ModelRunner:
    args = ServerArgs(model_path=path, device="cpu", **{"max_total_tokens": 2048, **kwargs})
    config = ModelConfig(path, context_length=args.context_length, dtype=args.dtype)
    return ModelRunner(config, args)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(path: str, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """HF generate(do_sample=False): the tokens and the raw logits of every step."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    out = hf.generate(
        torch.tensor([ids]), generation_config=gen, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    assert len(tokens) == steps
    return tokens, [s[0] for s in out.logits]


def srt_greedy(
    runner: ModelRunner, ids: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    sched = Sched(runner)
    req = sched.new_req()
    logits = [sched.extend([req], [ids])[0]]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < steps:
        logits.append(sched.decode([req], [tokens[-1]])[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def assert_matches_hf(
    path: str, ids: list[int], steps: int, runner: ModelRunner | None = None
) -> None:
    runner = runner or make_runner(path)
    ref_tokens, ref_logits = hf_greedy(path, ids, steps)
    tokens, logits = srt_greedy(runner, ids, steps)
    assert logits[0].dtype == torch.float32 and logits[0].shape == ref_logits[0].shape
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
    assert tokens == ref_tokens


@pytest.fixture(scope="module")
def runners(tiny_model_paths: dict[str, str]) -> dict[str, ModelRunner]:
    return {arch: make_runner(p, page_size=4) for arch, p in tiny_model_paths.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_greedy_decode_match_hf(
    arch: str, tiny_model_paths: dict[str, str], runners: dict[str, ModelRunner]
) -> None:
    assert_matches_hf(tiny_model_paths[arch], prompt(21, seed=1), 16, runners[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_extend_on_cached_prefix_and_chunked_prefill(
    arch: str, runners: dict[str, ModelRunner]
) -> None:
    runner = runners[arch]
    sched = Sched(runner)
    ids = prompt(30, seed=2)
    full = sched.extend([sched.new_req()], [ids])

    # Second half on top of the first half computed by an earlier step of the same request.
    req = sched.new_req()
    sched.extend([req], [ids[:13]])
    torch.testing.assert_close(sched.extend([req], [ids[13:]]), full, atol=ATOL, rtol=0)

    # A new request reusing those prefix slots (a prefix-cache hit) computes only its suffix.
    shared = sched.new_req(shared_prefix=req.slots[:13])
    torch.testing.assert_close(sched.extend([shared], [ids[13:]]), full, atol=ATOL, rtol=0)

    # Chunked prefill in 3 chunks, each chunk's last-token logits equal a prefill of that length.
    req = sched.new_req()
    for end, chunk in ((7, ids[:7]), (19, ids[7:19]), (30, ids[19:])):
        got = sched.extend([req], [chunk])
        want = Sched(runner).extend([Sched(runner).new_req()], [ids[:end]])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_alone(arch: str, runners: dict[str, ModelRunner]) -> None:
    runner = runners[arch]
    prompts = [prompt(n, seed=10 + n) for n in (5, 17, 1, 9)]
    alone_sched = Sched(runner)
    alone = []
    for ids in prompts:  # each sequence alone: prefill, then 4 decode steps
        req = alone_sched.new_req()
        steps = [alone_sched.extend([req], [ids])[0]]
        for _ in range(4):
            steps.append(alone_sched.decode([req], [int(steps[-1].argmax())])[0])
        alone.append(steps)

    sched = Sched(runner)
    reqs = [sched.new_req() for _ in prompts]
    # The 17-token request already has 6 tokens in the pool (an earlier chunk): the batch mixes
    # sequences with and without a cached prefix, and of different lengths.
    sched.extend([reqs[1]], [prompts[1][:6]])
    logits = sched.extend(reqs, [p[6:] if i == 1 else p for i, p in enumerate(prompts)])
    for step in range(5):
        for i in range(len(prompts)):
            torch.testing.assert_close(logits[i], alone[i][step], atol=ATOL, rtol=0)
        if step < 4:
            logits = sched.decode(reqs, [int(x.argmax()) for x in logits])


def test_tied_word_embeddings_match_hf(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True, seed=3)
    runner = make_runner(path)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert_matches_hf(path, prompt(11, seed=4), 8, runner)


def test_llama3_rope_scaling_matches_hf(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = make_tiny_model(tmp_path / "l3", "llama", rope_scaling=scaling, seed=5)
    assert rope_settings(ModelConfig(path).hf_config)[1]["rope_type"] == "llama3"
    assert_matches_hf(path, prompt(90, seed=6), 8)


def test_sharded_checkpoint_with_index(tiny_model_paths: dict[str, str], tmp_path: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_paths["qwen3"])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(tiny_model_paths["qwen3"]) / name, tmp_path / name)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_matches_hf(str(tmp_path), prompt(9, seed=7), 4)


def test_missing_weight_is_an_error(tiny_model_paths: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = Path(tiny_model_paths["llama"])
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"qkv_proj.weight\[k\]"):
        make_runner(str(tmp_path))


def test_dummy_load_format_from_config_alone(
    tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    shutil.copy(Path(tiny_model_paths["qwen3"]) / "config.json", tmp_path / "config.json")
    runner = make_runner(str(tmp_path), load_format="dummy", max_total_tokens=64)
    logits = Sched(runner).extend([Sched(runner).new_req()], [prompt(10)])
    assert logits.shape == (1, runner.model_config.vocab_size)
    assert torch.isfinite(logits).all()
    w = runner.model.model.layers[0].mlp.down_proj.weight
    assert w.abs().max() <= 1e-3 and w.std() > 0


def test_bf16_on_cpu_runs_close_to_fp32(
    tiny_model_paths: dict[str, str], runners: dict[str, ModelRunner]
) -> None:
    runner = make_runner(tiny_model_paths["llama"], dtype="bfloat16", max_total_tokens=64)
    assert runner.kv_pool.k_buffers[0].dtype == torch.bfloat16
    ids = prompt(10, seed=8)
    got = Sched(runner).extend([Sched(runner).new_req()], [ids])
    want = Sched(runners["llama"]).extend([Sched(runners["llama"]).new_req()], [ids])
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_kv_pool_sizing(tiny_model_paths: dict[str, str]) -> None:
    path = tiny_model_paths["llama"]
    runner = make_runner(path, max_total_tokens=100, page_size=16)
    assert runner.max_total_num_tokens == 96
    assert runner.kv_pool.k_buffers[0].shape == (96 + 16, 2, 16)
    assert runner.max_running_requests == 8
    assert runner.req_to_token_pool.size == 9
    runner = make_runner(path, max_total_tokens=4096, max_running_requests=3)
    assert runner.max_running_requests == 3 and runner.req_to_token_pool.size == 4
    assert runner.max_total_num_tokens == 4096

    # From memory: capped on CPU, a multiple of the page size.
    args = ServerArgs(model_path=path, device="cpu", page_size=7)
    runner = ModelRunner(ModelConfig(path), args)
    assert 0 < runner.max_total_num_tokens <= 65536
    assert runner.max_total_num_tokens % 7 == 0
    assert runner.max_running_requests == min(256, max(8, runner.max_total_num_tokens // 32))


def test_req_to_token_pool() -> None:
    pool = ReqToTokenPool(3, 10, "cpu")
    assert pool.pad_row == 2
    pool.write_runs([0, 2], [3, 0], [7, 8, 9, 10, 11], [2, 3])
    assert pool.req_to_token[0, 3:5].tolist() == [7, 8]
    assert pool.req_to_token[2, :3].tolist() == [9, 10, 11]
    pool.write_runs([0, 2], [5, 3], [12, 13])  # one slot per row (decode)
    assert pool.req_to_token[0, :6].tolist() == [0, 0, 0, 7, 8, 12]
    assert pool.req_to_token[2, :4].tolist() == [9, 10, 11, 13]
    with pytest.raises(ValueError):
        pool.write_runs([0], [9], [1, 2], [2])  # past max_context_len
    # A step's writes: (row, column, slot) triples.
    pool.apply(torch.tensor([1, 1]), torch.tensor([0, 4]), torch.tensor([5, 6]))
    assert pool.req_to_token[1, :5].tolist() == [5, 0, 0, 0, 6]


def test_model_config(
    tiny_model_paths: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tiny_model_paths["qwen3"]
    cfg = ModelConfig(path)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        "Qwen3ForCausalLM",
        2,
        4,
        2,
    )
    assert (cfg.head_dim, cfg.hidden_size, cfg.vocab_size, cfg.context_len) == (16, 64, 512, 1024)
    assert cfg.torch_dtype == torch.float32 and cfg.eos_token_ids == {2}
    assert ModelConfig(path, context_length=100).context_len == 100
    assert ModelConfig(path, context_length=4096).context_len == 4096
    assert "exceeds" in caplog.text
    assert ModelConfig(path, dtype="bfloat16").torch_dtype == torch.bfloat16

    config = json.loads((Path(path) / "config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    # Old-style rope settings (rope_theta + rope_scaling with "type") are read too.
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    old |= {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = ModelConfig(str(tmp_path))
    assert cfg.eos_token_ids == {2, 7, 9}
    theta, scaling = rope_settings(cfg.hf_config)
    assert theta == 500000.0 and scaling["rope_type"] == "linear" and scaling["factor"] == 2.0

    (tmp_path / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig(str(tmp_path))
