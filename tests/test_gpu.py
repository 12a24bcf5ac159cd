"""The GPU path (skipped without CUDA): FlashInfer attention and decode CUDA graphs, in bf16.

Models are tiny random-weight HF folders with head_dim 128 and 4 query heads per KV head (the
shape FlashInfer's kernels serve, and Llama-3-8B's), built on the spot. Agreement is
teacher-forced: along one reference token sequence, at every step the reference token's logit
must be within TOL of the max logit (greedy would pick it, up to bf16 noise); a near-tie never
sends the two runs down different paths.
- flashinfer vs torch_native: the same batches (mixed lengths, a cached prefix, page sizes 1
  and 16), both directions.
- flashinfer (with graphs) vs HF transformers on the GPU: one sequence at a time, so every
  matmul has the same shape on both sides.
- decode replayed from CUDA graphs equals eager decode exactly, padded batch sizes included.
- the Scheduler end to end with flashinfer and graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from srt.configs.model_config import ModelConfig
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.server_args import ServerArgs
from srt.testing.tiny_model import ARCHS, make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = 1e-2
STEPS = 12
# lm_head is scaled down so the logits lie within about +-1, where bf16 resolves steps of at most
# 2^-8 (the raw random model's logits reach ~40, where a bf16 step is 0.25: a tolerance of 1e-2
# would then be finer than the logits themselves can be).
LM_HEAD_SCALE = 0.02
# q/k projections are scaled so attention scores have a spread of ~1, as in trained models: the
# raw init (std 0.3 over 1024 inputs) gives scores of std ~90, a one-hot softmax whose winner a
# one-ulp change of q or k can flip, which no two bf16 implementations would agree on.
QK_SCALE = 0.125


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("gpu_models")
    paths = {}
    for arch in ARCHS:
        path = make_tiny_model(
            root / arch,
            arch,
            seed=11,
            hidden_size=1024,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=512,
        )
        weights = Path(path) / "model.safetensors"
        tensors = load_file(weights)
        tensors["lm_head.weight"] *= LM_HEAD_SCALE
        for name in tensors:
            if ".q_proj." in name or ".k_proj." in name:
                tensors[name] *= QK_SCALE
        save_file(tensors, weights, metadata={"format": "pt"})
        paths[arch] = path
    return paths


def make_runner(path: str, backend: str, graphs: bool = True, **kw: object) -> ModelRunner:
    args = ServerArgs(
        model_path=path,
        device="cuda",
        dtype="bfloat16",
        attention_backend=backend,
        disable_cuda_graph=not graphs,
        **{"max_total_tokens": 8192, "max_running_requests": 16, **kw},
    )
    config = ModelConfig(path, dtype="bfloat16", device="cuda")
    return ModelRunner(config, args)


@dataclass
class Req:
    row: int
    slots: list[int] = field(default_factory=list)


class Sched:
    """Hands out page-aligned KV slots per sequence and builds ForwardBatches on the GPU."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.page = runner.page_size
        self.next_page = 1  # page 0 is padding
        self.reqs: list[Req] = []

    def new_req(self) -> Req:
        row = len(self.reqs)
        assert row < self.runner.req_to_token_pool.pad_row
        self.reqs.append(Req(row))
        return self.reqs[-1]

    def _slots_for(self, req: Req, n: int) -> list[int]:
        """The next n slots of `req`: a fresh page at each page boundary, else the next slot."""
        out: list[int] = []
        prev = req.slots[-1] if req.slots else -1
        for i in range(n):
            if (len(req.slots) + i) % self.page == 0:
                prev = self.next_page * self.page
                self.next_page += 1
            else:
                prev += 1
            out.append(prev)
        return out

    def extend(self, reqs: list[Req], new_ids: list[list[int]]) -> torch.Tensor:
        prefix = [len(r.slots) for r in reqs]
        lens = [len(ids) for ids in new_ids]
        out_loc: list[int] = []
        for r, n in zip(reqs, lens, strict=True):
            s = self._slots_for(r, n)
            self.runner.req_to_token_pool.write_runs([r.row], [len(r.slots)], s, [n])
            r.slots += s
            out_loc += s
        flat = [t for ids in new_ids for t in ids]
        batch = ForwardBatch.extend(flat, out_loc, [r.row for r in reqs], prefix, lens, "cuda")
        return self.runner.forward(batch).clone()

    def decode(self, reqs: list[Req], tokens: list[int]) -> torch.Tensor:
        out_loc = []
        for r in reqs:
            s = self._slots_for(r, 1)
            self.runner.req_to_token_pool.write_runs([r.row], [len(r.slots)], s)
            r.slots += s
            out_loc += s
        seq_lens = [len(r.slots) for r in reqs]
        batch = ForwardBatch.decode(tokens, out_loc, [r.row for r in reqs], seq_lens, "cuda")
        return self.runner.forward(batch).clone()

    def close(self) -> None:
        self.reqs.clear()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_forced(
    runner: ModelRunner, prompts: list[list[int]], forced: list[list[int]] | None, steps: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefills `prompts` as one batch (the second prompt in two chunks, so one sequence extends
    a cached prefix), then decodes `steps - 1` steps. Each step feeds `forced[i][t]` when given,
    else the argmax (greedy). Returns the tokens fed/picked and the logits [B, V] of each step."""
    sched = Sched(runner)
    reqs = [sched.new_req() for _ in prompts]
    if len(prompts) > 1 and len(prompts[1]) > 8:
        sched.extend([reqs[1]], [prompts[1][:8]])
        chunks = [p[8:] if i == 1 else p for i, p in enumerate(prompts)]
    else:
        chunks = prompts
    logits = [sched.extend(reqs, chunks)]
    tokens: list[list[int]] = [[] for _ in prompts]
    for t in range(steps):
        picked = logits[-1].argmax(-1).tolist()
        for i in range(len(prompts)):
            tokens[i].append(forced[i][t] if forced is not None else picked[i])
        if t + 1 < steps:
            logits.append(sched.decode(reqs, [tok[-1] for tok in tokens]))
    sched.close()
    return tokens, logits


def gaps(logits: list[torch.Tensor], tokens: list[list[int]]) -> torch.Tensor:
    """[steps, B]: max logit minus the logit of the given token (0 where it is the argmax)."""
    out = []
    for t, step in enumerate(logits):
        chosen = torch.tensor([tok[t] for tok in tokens], device=step.device)
        out.append(step.max(-1).values - step.gather(1, chosen[:, None]).squeeze(1))
    return torch.stack(out).float().cpu()


def assert_agree(name: str, g: torch.Tensor) -> None:
    flips = int((g > 0).sum())
    assert float(g.max()) <= TOL, (
        f"{name}: the reference token's logit is {float(g.max()):.4f} below the max "
        f"(tolerance {TOL}); {flips} of {g.numel()} steps pick another token"
    )


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_flashinfer_agrees_with_torch_native(
    arch: str, page_size: int, gpu_models: dict[str, str]
) -> None:
    path = gpu_models[arch]
    prompts = [prompt(n, seed=n) for n in (5, 37, 1, 20, 130)]
    native = make_runner(path, "torch_native", page_size=page_size)
    assert native.cuda_graph_runner is None  # torch_native has no graph support
    ref_tokens, ref_logits = run_forced(native, prompts, None, STEPS)
    del native
    fi = make_runner(path, "flashinfer", page_size=page_size)
    assert type(fi.attn_backend).__name__ == "FlashInferAttnBackend"
    assert fi.cuda_graph_runner is not None
    _, fi_logits = run_forced(fi, prompts, ref_tokens, STEPS)
    # torch_native's greedy path, scored by flashinfer; and flashinfer's picks, by torch_native.
    assert_agree("flashinfer on torch_native's tokens", gaps(fi_logits, ref_tokens))
    fi_picks = [[int(lg[i].argmax()) for lg in fi_logits] for i in range(len(prompts))]
    assert_agree("torch_native on flashinfer's picks", gaps(ref_logits, fi_picks))
    diff = max(float((a - b).abs().max()) for a, b in zip(fi_logits, ref_logits, strict=True))
    scale = max(float(a.abs().max()) for a in ref_logits)
    assert diff < 0.05 * scale, f"logits differ by {diff} (scale {scale})"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_flashinfer_matches_hf_transformers(
    arch: str, fused: bool, gpu_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fused norm/activation/RoPE kernels (the default on CUDA), and without them (the
    torch ops HF runs, in its order): only attention differs from HF then."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from srt.layers import flashinfer_ops

    if not fused:
        monkeypatch.setenv(flashinfer_ops.DISABLE_ENV, "1")
    path = gpu_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=STEPS, eos_token_id=None, pad_token_id=0)
    runner = make_runner(path, "flashinfer")
    norm = runner.model.model.norm
    assert (norm._fused is not None) == fused
    for seed, n in ((1, 23), (2, 70)):
        ids = prompt(n, seed=seed)
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids], device="cuda"),
                generation_config=gen,
                output_logits=True,
                return_dict_in_generate=True,
            )
        hf_tokens = [out.sequences[0, n:].tolist()]
        hf_logits = [s.float() for s in out.logits]
        _, srt_logits = run_forced(runner, [ids], hf_tokens, STEPS)
        assert_agree(f"srt on HF's tokens (prompt {n})", gaps(srt_logits, hf_tokens))
        srt_picks = [[int(lg[0].argmax()) for lg in srt_logits]]
        assert_agree(f"HF on srt's picks (prompt {n})", gaps(hf_logits, srt_picks))


@pytest.mark.parametrize("page_size", [1, 16])
def test_cuda_graph_decode_equals_eager(page_size: int, gpu_models: dict[str, str]) -> None:
    path = gpu_models["llama"]
    graph = make_runner(path, "flashinfer", graphs=True, page_size=page_size)
    eager = make_runner(path, "flashinfer", graphs=False, page_size=page_size)
    assert graph.cuda_graph_runner is not None and eager.cuda_graph_runner is None
    assert graph.cuda_graph_runner.batch_sizes == [1, 2, 4, 8, 16]
    for bs in (1, 3, 4, 5, 16):  # 3 and 5 replay padded graphs (4 and 8)
        prompts = [prompt(3 + 9 * i, seed=100 + i) for i in range(bs)]
        tokens, g_logits = run_forced(graph, prompts, None, STEPS)
        _, e_logits = run_forced(eager, prompts, tokens, STEPS)
        for t, (g, e) in enumerate(zip(g_logits, e_logits, strict=True)):
            assert torch.equal(g, e), (
                f"bs {bs} step {t}: graph and eager logits differ by {(g - e).abs().max()}"
            )


def test_scheduler_end_to_end_with_graphs(gpu_models: dict[str, str]) -> None:
    from test_scheduler import Harness

    path = gpu_models["qwen3"]
    outs = {}
    for graphs, overlap in ((True, True), (False, True), (True, False)):
        h = Harness(
            path,
            overlap,
            device="cuda",
            dtype="bfloat16",
            attention_backend="flashinfer",
            disable_cuda_graph=not graphs,
            max_total_tokens=4096,
            max_running_requests=12,
            page_size=4,
        )
        try:
            assert (h.sched.runner.cuda_graph_runner is not None) == graphs
            for i in range(10):
                h.submit(f"r{i}", prompt(4 + 13 * i, seed=i), max_new_tokens=6 + i, ignore_eos=True)
            h.run()
            assert all(len(h.outputs[f"r{i}"]) == 6 + i for i in range(10))
            outs[graphs, overlap] = h.outputs
            h.assert_pool_returned()
        finally:
            h.close()
    # The scheduler's decode batches shrink as requests finish: padded replays included;
    # overlap (a second step prepared while one runs) changes no token.
    assert outs[True, True] == outs[False, True] == outs[True, False]


def test_auto_picks_flashinfer_on_cuda(gpu_models: dict[str, str]) -> None:
    runner = make_runner(gpu_models["llama"], "auto", max_total_tokens=1024)
    assert type(runner.attn_backend).__name__ == "FlashInferAttnBackend"
    assert runner.kv_pool.k_buffers[0].dtype == torch.bfloat16


def test_kv_pool_sized_from_memory_fraction(gpu_models: dict[str, str], tmp_path: Path) -> None:
    args = ServerArgs(
        model_path=gpu_models["llama"],
        device="cuda",
        mem_fraction_static=0.2,
        max_running_requests=8,
        cuda_graph_max_bs=8,
    )
    config = ModelConfig(gpu_models["llama"], device="cuda")
    runner = ModelRunner(config, args)
    assert config.torch_dtype == torch.bfloat16  # --dtype auto on GPU
    free, total = torch.cuda.mem_get_info()
    per_token = 2 * 2 * 2 * 128 * 2  # K and V, 2 layers, 2 KV heads, head_dim 128, bf16
    # Capped by the fraction (and by what was free): at most 0.2 of the GPU.
    assert 0 < runner.max_total_num_tokens * per_token <= 0.2 * total
