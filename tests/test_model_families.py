"""The model families beyond Llama/Qwen (Mistral, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE) against
HF transformers in fp32 on CPU, on tiny random-weight models whose distinguishing features are
switched on (srt.testing.tiny_model): greedy tokens and logits equal HF's alone, and batched
with other requests while one arrives in chunks and one reuses another's cached prefix, with a
sliding window (8 tokens) shorter than the prompts; through the scheduler with a KV pool small
enough to force retraction; removing a feature from srt's config makes it disagree with HF (so
the tests see each feature); tensor and pipeline parallel 2 through the server (Gemma 2 tp 2
always, the rest marked slow). FlashInfer's plan arguments are checked on the CPU; on a GPU
FlashInfer with CUDA graphs is compared with torch_native.

The ModelRunner-level steps reuse test_model_runner's `Sched` stand-in for the scheduler, the
scheduler-level ones test_scheduler's `Harness`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from _live import start_server
from test_model_runner import ATOL, Sched, hf_greedy, make_runner, prompt, srt_greedy
from test_parallel import hf_greedy as hf_greedy_many
from test_parallel import stop
from test_scheduler import Harness, make_prompts
from test_scheduler import hf_greedy as hf_greedy_recomputed
from transformers import AutoModelForCausalLM

from srt.layers.attention.torch_native import TorchNativeAttnBackend
from srt.layers.moe import GroupedExperts, SparseMoE
from srt.model_executor.model_runner import ModelRunner
from srt.testing.tiny_model import FAMILY_ARCHS, make_tiny_model

WINDOW = 8
# Phi-3 with LongRoPE (short factors up to 24 positions, long ones past them) and, as Phi-4-mini,
# rotary on 3/4 of each head (12 of 16 dims: 6 frequencies).
LONGROPE = {
    "rope_type": "longrope",
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0 + 0.1 * i for i in range(6)],
    "long_factor": [2.0 + 0.5 * i for i in range(6)],
    "original_max_position_embeddings": 24,
}


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    paths = {a: make_tiny_model(root / a, a, sliding_window=WINDOW) for a in FAMILY_ARCHS}
    paths["phi3_longrope"] = make_tiny_model(root / "phi3_lr", "phi3", rope_scaling=LONGROPE)
    paths["gemma3_mm"] = make_tiny_model(root / "g3mm", "gemma3_mm", sliding_window=WINDOW, seed=2)
    return paths


# The families, and Gemma 3's multimodal checkpoint served as a text model.
TEXT_ARCHS = (*FAMILY_ARCHS, "gemma3_mm")


@pytest.fixture(scope="module")
def runners(family_paths: dict[str, str]) -> dict[str, ModelRunner]:
    return {a: make_runner(family_paths[a], page_size=4) for a in TEXT_ARCHS}


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=msg)


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_greedy_matches_hf(
    arch: str, family_paths: dict[str, str], runners: dict[str, ModelRunner]
) -> None:
    # 21 prompt tokens and 14 generated: every layer's window (8) slides all along.
    path, ids, steps = family_paths[arch], prompt(21, seed=1), 14
    ref_tokens, ref_logits = hf_greedy(path, ids, steps)
    tokens, logits = srt_greedy(runners[arch], ids, steps)
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert_close_logits(got, want, f"{arch} step {step}")
    assert tokens == ref_tokens
    assert len(set(tokens)) > 1, "a model that repeats one token tests little"


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_batched_with_chunks_and_cached_prefix_match_hf(
    arch: str, family_paths: dict[str, str], runners: dict[str, ModelRunner]
) -> None:
    """Three requests decoded together: A prefilled in two chunks, B reusing the KV slots of
    A's first 8 tokens (a page-aligned prefix-cache hit) for its own 21-token prompt, C a fresh 5-token prompt whose
    generation runs past the window. Each must produce HF's greedy tokens and logits."""
    runner, path, steps = runners[arch], family_paths[arch], 10
    a_ids = prompt(25, seed=3)
    b_ids = a_ids[:8] + prompt(13, seed=4)
    c_ids = prompt(5, seed=5)
    sched = Sched(runner)
    a, c = sched.new_req(), sched.new_req()
    first = sched.extend([a], [a_ids[:10]])
    b = sched.new_req(shared_prefix=a.slots[:8])
    logits = list(sched.extend([a, b, c], [a_ids[10:], b_ids[8:], c_ids]))
    got: list[list[torch.Tensor]] = [[x] for x in logits]
    for _ in range(steps - 1):
        logits = list(sched.decode([a, b, c], [int(x.argmax()) for x in logits]))
        for seq, x in zip(got, logits, strict=True):
            seq.append(x)
    ref_first = hf_greedy(path, a_ids[:10], 1)[1][0]
    assert_close_logits(first[0], ref_first, f"{arch} first chunk")
    for name, ids, seq in (("A", a_ids, got[0]), ("B", b_ids, got[1]), ("C", c_ids, got[2])):
        ref_tokens, ref_logits = hf_greedy(path, ids, steps)
        for step, (x, want) in enumerate(zip(seq, ref_logits, strict=True)):
            assert_close_logits(x, want, f"{arch} request {name} step {step}")
        assert [int(x.argmax()) for x in seq] == ref_tokens


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sdpa_paths_match_hf(
    arch: str, family_paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode and extend paths of non-CPU pools (batched SDPA, or the explicit soft-capped
    softmax), run here on the CPU in place of the native kernels, windows and soft-caps
    included."""
    monkeypatch.setattr(TorchNativeAttnBackend, "_native_cpu", lambda self: False)
    path, ids, steps = family_paths[arch], prompt(13, seed=8), 8
    ref_tokens, ref_logits = hf_greedy(path, ids, steps)
    tokens, logits = srt_greedy(make_runner(path, page_size=4), ids, steps)
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert_close_logits(got, want, f"{arch} step {step}")
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_bf16_on_cpu_runs_close_to_fp32(
    arch: str, family_paths: dict[str, str], runners: dict[str, ModelRunner]
) -> None:
    """bf16 weights, activations and KV cache (the native kernels' bf16 paths, windows and
    soft-caps included) follow the fp32 run, fed the fp32 run's tokens, past the window. The
    bound is loose: these random models' activations are large, and bf16 rounding alone
    moves some logits by up to ~15% of the largest (the SDPA path's bf16 as much)."""
    ids, steps = prompt(13, seed=9), 8
    tokens, want = srt_greedy(runners[arch], ids, steps)
    runner = make_runner(family_paths[arch], dtype="bfloat16", page_size=4, max_total_tokens=256)
    sched = Sched(runner)
    req = sched.new_req()
    got = [sched.extend([req], [ids])[0]]
    for tok in tokens[:-1]:
        got.append(sched.decode([req], [tok])[0])
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() < 0.25 * w.abs().max(), f"{arch} step {step}"


def test_phi3_longrope_matches_hf(family_paths: dict[str, str]) -> None:
    """Long factors for a prompt past the original context (24), short ones within it; a
    partial rotary dim."""
    path = family_paths["phi3_longrope"]
    runner = make_runner(path, page_size=4)
    assert runner.model.model.rotary_emb.rotary_dim == 12
    for ids, steps in ((prompt(30, seed=6), 8), (prompt(6, seed=7), 12)):
        ref_tokens, ref_logits = hf_greedy(path, ids, steps)
        tokens, logits = srt_greedy(runner, ids, steps)
        for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
            assert_close_logits(got, want, f"{len(ids)}-token prompt, step {step}")
        assert tokens == ref_tokens


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_scheduler_with_retraction_matches_hf(arch: str, family_paths: dict[str, str]) -> None:
    """The scheduler in-process over a KV pool too small for its requests: continuous
    batching, shared prefixes from the cache, prompts in 16-token chunks, eviction and
    retraction (a retracted request comes back with its output so far); every request gives
    HF's greedy output and no KV slot leaks."""
    path = family_paths[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    h = Harness(
        path,
        max_total_tokens=192,
        page_size=4,
        chunked_prefill_size=16,
        max_running_requests=16,
        schedule_policy="lpm",
    )
    try:
        prompts = make_prompts(h.sched.vocab_size, 12, seed=3)
        for i, p in enumerate(prompts):
            h.submit(f"r{i}", p, max_new_tokens=32, temperature=0.0, ignore_eos=True)
        h.run()
        assert h.retracted > 0, "the pool was meant to be too small to avoid retraction"
        assert sum(h.cached.values()) > 0, "shared prefixes were never reused"
        for i, p in enumerate(prompts):
            assert h.outputs[f"r{i}"] == hf_greedy_recomputed(hf, p, 32), f"request r{i}"
        h.assert_pool_returned()
    finally:
        h.close()


def _without(path: str, dest: Path, **overrides: object) -> str:
    """A copy of the model folder whose config.json has `overrides` applied."""
    dest.mkdir()
    for f in Path(path).iterdir():
        (dest / f.name).symlink_to(f)
    config = json.loads((Path(path) / "config.json").read_text())
    (dest / "config.json").unlink()
    (dest / "config.json").write_text(json.dumps({**config, **overrides}))
    return str(dest)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": None}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("gemma2", {"query_pre_attn_scalar": 16}),
        ("gemma3", {"layer_types": ["full_attention"] * 2}),
        ("gemma3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ("mixtral", {"num_experts_per_tok": 1}),
        ("qwen3_moe", {"norm_topk_prob": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_each_feature_is_seen(
    arch: str, overrides: dict, family_paths: dict[str, str], tmp_path: Path
) -> None:
    """srt without one feature of the family disagrees with HF: the tests above would see
    that feature done wrong."""
    path = family_paths[arch]
    ids = prompt(21, seed=1)
    _, ref_logits = hf_greedy(path, ids, 1)
    runner = make_runner(_without(path, tmp_path / "changed", **overrides))
    _, logits = srt_greedy(runner, ids, 1)
    assert (logits[0] - ref_logits[0]).abs().max() > 100 * ATOL


def test_phi3_fused_weights_split_per_rank() -> None:
    """Phi-3's fused qkv_proj and gate_up_proj are cut into q/k/v and gate/up before each rank
    takes its slice: a wrong cut would load k rows as q rows."""
    from srt.models.phi3 import Phi3ForCausalLM

    class Cfg:
        num_attention_heads, num_key_value_heads, hidden_size, intermediate_size = 4, 2, 16, 8

    model = Phi3ForCausalLM.__new__(Phi3ForCausalLM)
    model.config = Cfg()
    qkv = torch.arange(32.0)[:, None].expand(32, 16)  # q: rows 0-15, k 16-23, v 24-31
    parts = dict(model.checkpoint_tensors("model.layers.0.self_attn.qkv_proj.weight", qkv))
    assert [int(parts[f"model.layers.0.self_attn.{p}_proj.weight"][0, 0]) for p in "qkv"] == [
        0,
        16,
        24,
    ]
    gate_up = torch.arange(16.0)[:, None].expand(16, 16)
    parts = dict(model.checkpoint_tensors("model.layers.0.mlp.gate_up_proj.weight", gate_up))
    assert int(parts["model.layers.0.mlp.up_proj.weight"][0, 0]) == 8
    with pytest.raises(ValueError, match="q, k and v need"):
        list(model.checkpoint_tensors("model.layers.0.self_attn.qkv_proj.weight", qkv[:30]))


def test_moe_dense_path_equals_grouped() -> None:
    """The path a CUDA graph captures (every expert on every token) sums as the grouped one."""
    torch.manual_seed(0)
    moe = SparseMoE(16, 12, num_experts=5, top_k=2, renormalize=False)
    for p in moe.parameters():
        p.data.normal_()
    x = torch.randn(7, 16)
    weights, ids = moe.route(x)
    grouped = moe.grouped(x, weights, ids)
    torch.testing.assert_close(moe.dense(x, weights, ids), grouped, atol=1e-4, rtol=1e-5)
    assert len(set(ids.view(-1).tolist())) > 2, "the tokens should spread over the experts"


def test_grouped_and_per_expert_checkpoints_load_alike() -> None:
    """Experts stored one tensor per expert and projection (Mixtral, Qwen3-MoE on the hub) or
    grouped [E, ...] (transformers 5) load into the same parameters."""
    E, H, inter = 3, 8, 6
    gate_up, down = torch.randn(E, 2 * inter, H), torch.randn(E, H, inter)
    grouped, per_expert = GroupedExperts(E, H, inter), GroupedExperts(E, H, inter)
    grouped.weight_loader(grouped.gate_up_proj, gate_up)
    grouped.weight_loader(grouped.down_proj, down)
    for e in range(E):
        per_expert.weight_loader(per_expert.gate_up_proj, gate_up[e, :inter], f"{e}.gate")
        per_expert.weight_loader(per_expert.gate_up_proj, gate_up[e, inter:], f"{e}.up")
        per_expert.weight_loader(per_expert.down_proj, down[e], f"{e}.down")
    torch.testing.assert_close(grouped.gate_up_proj, gate_up, atol=0, rtol=0)
    torch.testing.assert_close(per_expert.gate_up_proj, gate_up, atol=0, rtol=0)
    torch.testing.assert_close(per_expert.down_proj, grouped.down_proj, atol=0, rtol=0)
    with pytest.raises(ValueError, match="expert 0 gate weight"):
        per_expert.weight_loader(per_expert.gate_up_proj, torch.zeros(inter, H + 1), "0.gate")


TP_PROMPTS = [prompt(23, seed=11), prompt(5, seed=12), prompt(14, seed=13)]


def _parallel_matches_hf(path: str, tmp_path: Path, parallel: list[str]) -> None:
    """The server under `parallel` flags with chunks of 8 tokens, twice (the second time from
    the prefix cache)."""
    args = ["--model-path", path, "--max-total-tokens", "2048", *parallel]
    proc, base = start_server([*args, "--chunked-prefill-size", "8"], tmp_path / "log", tmp_path)
    body = {
        "input_ids": TP_PROMPTS,
        "sampling_params": {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True},
    }
    try:
        outs = [httpx.post(base + "/generate", json=body, timeout=120) for _ in range(2)]
    finally:
        assert stop(proc) == 0
    want = hf_greedy_many(path, TP_PROMPTS, 10)
    for r in outs:
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == want
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs[1].json())


TP2, PP2 = ["--tp-size", "2"], ["--pp-size", "2"]


def test_tp2_gemma2_matches_hf(family_paths: dict[str, str], tmp_path: Path) -> None:
    _parallel_matches_hf(family_paths["gemma2"], tmp_path, TP2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "parallel"),
    [(a, TP2) for a in FAMILY_ARCHS if a != "gemma2"] + [(a, PP2) for a in FAMILY_ARCHS],
    ids=lambda v: v if isinstance(v, str) else v[0].strip("-").split("-")[0] + "2",
)
def test_parallel_matches_hf(
    arch: str, parallel: list[str], family_paths: dict[str, str], tmp_path: Path
) -> None:
    _parallel_matches_hf(family_paths[arch], tmp_path, parallel)


def test_flashinfer_plans_each_layer_kind_with_hf_window_semantics(
    runners: dict[str, ModelRunner],
) -> None:
    """Gemma 2's layers come in two kinds (local: 8-token window, global); FlashInfer plans
    each with window_left = W - 1 (it counts the keys left of the query, HF's W counts the
    query's own) and the soft-cap. Checked on the CPU without flashinfer: the plan arguments
    are host-side."""
    from types import SimpleNamespace

    from srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    kinds = runners["gemma2"].attn_backend.layer_kinds
    fi = FlashInferAttnBackend.__new__(FlashInferAttnBackend)
    fi.layer_kinds, fi.num_qo_heads, fi.dtype = kinds, 4, torch.bfloat16
    fi.kv_pool = SimpleNamespace(num_kv_heads=2, page_size=4)
    plans = {k.sliding_window: fi._plan_args(k) for k in fi._kinds()}
    assert set(plans) == {WINDOW, None}
    assert plans[WINDOW]["window_left"] == WINDOW - 1 and plans[None]["window_left"] == -1
    assert {p["logits_soft_cap"] for p in plans.values()} == {3.0}
    assert {p["sm_scale"] for p in plans.values()} == {32**-0.5}  # query_pre_attn_scalar 32


GPU_ARCHS = ("mistral", "gemma2", "gemma3", "qwen3_moe")


@pytest.fixture(scope="module")
def gpu_family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """test_gpu's model shape (head_dim 128, 4 query heads per KV head) and its scaling of
    lm_head and q/k, so bf16 runs agree up to noise; a 16-token window."""
    from safetensors.torch import load_file, save_file
    from test_gpu import LM_HEAD_SCALE, QK_SCALE

    root = tmp_path_factory.mktemp("gpu_families")
    paths = {}
    for arch in GPU_ARCHS:
        path = make_tiny_model(
            root / arch,
            arch,
            seed=11,
            hidden_size=1024,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=512,
            sliding_window=16,
        )
        weights = Path(path) / "model.safetensors"
        tensors = load_file(weights)
        if "lm_head.weight" in tensors:  # Gemma ties it to the (already small) embedding
            tensors["lm_head.weight"] *= LM_HEAD_SCALE
        for name in tensors:
            if ".q_proj." in name or ".k_proj." in name:
                tensors[name] *= QK_SCALE
        save_file(tensors, weights, metadata={"format": "pt"})
        paths[arch] = path
    return paths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_flashinfer_agrees_with_torch_native(arch: str, gpu_family_models: dict[str, str]) -> None:
    """FlashInfer's window_left / logits_soft_cap / per-kind plans (decode from CUDA graphs,
    where the MoE runs its dense path) against torch_native's masks, teacher-forced both ways
    in bf16, on prompts longer than the window."""
    from test_gpu import STEPS, assert_agree, gaps, run_forced
    from test_gpu import make_runner as gpu_runner
    from test_gpu import prompt as gpu_prompt

    path = gpu_family_models[arch]
    prompts = [gpu_prompt(n, seed=n) for n in (5, 37, 1, 20, 70)]
    native = gpu_runner(path, "torch_native", page_size=16)
    ref_tokens, ref_logits = run_forced(native, prompts, None, STEPS)
    del native
    fi = gpu_runner(path, "flashinfer", page_size=16)
    assert fi.cuda_graph_runner is not None
    _, fi_logits = run_forced(fi, prompts, ref_tokens, STEPS)
    assert_agree(f"{arch}: flashinfer on torch_native's tokens", gaps(fi_logits, ref_tokens))
    fi_picks = [[int(lg[i].argmax()) for lg in fi_logits] for i in range(len(prompts))]
    assert_agree(f"{arch}: torch_native on flashinfer's picks", gaps(ref_logits, fi_picks))
