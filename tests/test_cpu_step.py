"""The native step on CPU (`CpuStepRunner`, srt-kernels' decoder) against the torch forward of
the same model, step by step: a prompt in two chunks (the second with extra logit rows, as
prompt logprobs ask), then decode steps.

Each step runs twice on one runner: the native call, then the torch forward (whose K/V writes
to the same slots stand for the next step), so both always see the same cache. For a model of
packed GGUF weights the two agree to the bit. Dense parts and the ops the torch path computes
with torch (q/k norms, GELU, soft-caps) differ by float rounding, which the next packed product
can amplify: its input is rounded to int8 per 32 values, and a last-bit change can move a value
across a rounding boundary (one int8 step: ~0.4% of the block's largest value). Hence the
looser tolerance there (`INT8_TOL`); a wrong weight or a wrong op moves logits by O(1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from test_gguf_quant import TYPES as MIXED_TYPES  # noqa: E402
from test_gguf_quant import make_runner  # noqa: E402
from test_model_runner import Sched, prompt  # noqa: E402

from srt.layers.linear import Linear, RowParallelLinear
from srt.layers.quantization import GGUFLinear, GGUFWeight
from srt.model_executor.cpu_step import MAX_BATCH, CpuStepRunner
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.model_runner import ModelRunner
from srt.model_loader.gguf import ensure_hf_folder
from srt.testing.tiny_gguf import make_tiny_gguf
from srt.testing.tiny_model import make_tiny_model

# The default model's formats: Q4_1 layers, a tied Q8_0 embedding.
DEFAULT_TYPES = {"token_embd": "Q8_0", "blk": "Q4_1"}
# See the module docstring; measured: up to 0.0041 on logits of magnitude ~1.7.
INT8_TOL = 2e-2


def gguf_folder(root: Path, types: dict[str, str], **kwargs: object) -> str:
    gguf_file = make_tiny_gguf(root / "model.gguf", types, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRT_CACHE_DIR", str(root / "cache"))
        return ensure_hf_folder(str(gguf_file))


@pytest.fixture(scope="module")
def default_like(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    root = tmp_path_factory.mktemp("cpu_step_default")
    folder = gguf_folder(root, DEFAULT_TYPES, tie_word_embeddings=True)
    return make_runner(folder, quantization="gguf")


@pytest.fixture(scope="module")
def default_f32_kv(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    root = tmp_path_factory.mktemp("cpu_step_f32_kv")
    folder = gguf_folder(root, DEFAULT_TYPES, tie_word_embeddings=True)
    return make_runner(folder, quantization="gguf", kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    return make_runner(
        gguf_folder(tmp_path_factory.mktemp("cpu_step_mixed"), MIXED_TYPES), quantization="gguf"
    )


def both(
    runner: ModelRunner, make: Callable[[], ForwardBatch], out_loc: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """One step through the native call, then the torch forward (`make` builds its batch):
    (native logits, torch logits, each layer's K and V rows the native call wrote)."""
    native = runner.cpu_step
    assert native is not None
    got = native.run(make())
    pool = runner.kv_pool
    # NOTE: .float(): a bf16 pool's values exactly (numpy has no bfloat16).
    written = [b[out_loc].float().numpy() for b in (*pool.k_buffers, *pool.v_buffers)]
    runner.cpu_step = None
    try:
        want = runner.forward(make())
    finally:
        runner.cpu_step = native
    return got, want, written


def step_both(
    runner: ModelRunner, sched: Sched, reqs: list, tokens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """One decode step, as `both`."""
    out_loc = sched._alloc(len(reqs))
    runner.req_to_token_pool.write_runs(
        [r.row for r in reqs], [len(r.slots) for r in reqs], out_loc
    )
    for r, s in zip(reqs, out_loc, strict=True):
        r.slots.append(s)
    lens = [len(r.slots) for r in reqs]
    rows = [r.row for r in reqs]
    return both(runner, lambda: ForwardBatch.decode(tokens, out_loc, rows, lens, "cpu"), out_loc)


def extend_both(
    runner: ModelRunner, sched: Sched, reqs: list, new_ids: list[list[int]], extra: list[int]
) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """One extend step of `new_ids` on top of what each request holds, with the logits of the
    tokens at `extra` too (prompt logprobs), as `both`."""
    prefix = [len(r.slots) for r in reqs]
    lens = [len(ids) for ids in new_ids]
    out_loc = sched._alloc(sum(lens))
    runner.req_to_token_pool.write_runs([r.row for r in reqs], prefix, out_loc, lens)
    start = 0
    for r, n in zip(reqs, lens, strict=True):
        r.slots += out_loc[start : start + n]
        start += n
    flat = [t for ids in new_ids for t in ids]
    rows = [r.row for r in reqs]

    def make() -> ForwardBatch:
        batch = ForwardBatch.extend(flat, out_loc, rows, prefix, lens, "cpu")
        batch.extra_logit_indices = torch.tensor(extra, dtype=torch.int64)
        return batch

    return both(runner, make, out_loc)


def run_steps(
    runner: ModelRunner, steps: int, exact: bool, atol: float = 0.0, batch: int = 3
) -> None:
    """Prompts in two chunks (the second with extra logit rows), then decode steps: each
    step's logits and K/V from the native call against the torch forward's."""
    sched = Sched(runner)
    reqs = [sched.new_req() for _ in range(batch)]
    lens = (5, 9, 3)
    prompts = [prompt(lens[i % 3] + i // 3, i + 1) for i in range(batch)]
    first = [p[: len(p) // 2] for p in prompts]
    rest = [p[len(p) // 2 :] for p in prompts]
    pool = runner.kv_pool

    def check(what: str, got: torch.Tensor, want: torch.Tensor, written: list) -> None:
        # The torch forward rewrote the same slots: the native call's K/V match them.
        out_loc = slots[-1]
        kv_now = [b[out_loc].float().numpy() for b in (*pool.k_buffers, *pool.v_buffers)]
        if exact:
            assert torch.equal(got, want), f"{what}: {(got - want).abs().max()}"
            assert all(np.array_equal(a, b) for a, b in zip(written, kv_now, strict=True))
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
            for a, b in zip(written, kv_now, strict=True):
                np.testing.assert_allclose(a, b, rtol=0, atol=atol)

    slots: list[list[int]] = []
    for what, chunk, extra in (("prefill", first, [0]), ("second chunk", rest, [0, 2, 1])):
        before = [len(r.slots) for r in reqs]
        got, want, written = extend_both(runner, sched, reqs, chunk, extra)
        slots.append([s for r, n in zip(reqs, before, strict=True) for s in r.slots[n:]])
        assert got.shape == (batch + len(extra), got.shape[1])
        check(what, got, want, written)
    tokens = want[:batch].argmax(-1).tolist()
    for step in range(steps):
        got, want, written = step_both(runner, sched, reqs, tokens)
        slots.append([r.slots[-1] for r in reqs])
        check(f"step {step}", got, want, written)
        tokens = want.argmax(-1).tolist()


def test_default_formats_match_the_torch_forward_bit_for_bit(default_like: ModelRunner) -> None:
    assert default_like.cpu_step is not None
    assert default_like.kv_pool.dtype == torch.bfloat16  # --kv-cache-dtype auto with GGUF blocks
    run_steps(default_like, steps=6, exact=True)


def test_a_float32_pool_matches_the_torch_forward_bit_for_bit(
    default_f32_kv: ModelRunner,
) -> None:
    assert default_f32_kv.cpu_step is not None
    assert default_f32_kv.kv_pool.dtype == torch.float32
    run_steps(default_f32_kv, steps=6, exact=True, batch=9)


@pytest.mark.parametrize("batch", [8, 19])
def test_batches_match_the_torch_forward_bit_for_bit(default_like: ModelRunner, batch: int) -> None:
    """Batches of 8 sequences and more take the batch kernel (AMX-BF16 tiles where the CPU has
    them, else f32 FMA), in the native step and in the torch forward's packed products alike."""
    run_steps(default_like, steps=4, exact=True, batch=batch)


def test_every_gguf_format_and_dense_parts(mixed: ModelRunner) -> None:
    """Q4_0, Q4_1, Q8_0, Q4_K (packed), Q6_K (blocks) and an F32 layer in one model."""
    assert mixed.cpu_step is not None
    run_steps(mixed, steps=6, exact=False, atol=INT8_TOL)


def test_thread_counts_give_the_same_logits(default_like: ModelRunner) -> None:
    sched = Sched(default_like)
    reqs = [sched.new_req() for _ in range(4)]
    sched.extend(reqs, [prompt(4, s) for s in range(4)])
    out_loc = sched._alloc(4)
    default_like.req_to_token_pool.write_runs([r.row for r in reqs], [4] * 4, out_loc)
    batch = ForwardBatch.decode([7, 8, 9, 10], out_loc, [r.row for r in reqs], [5] * 4, "cpu")
    native = default_like.cpu_step
    assert native is not None
    results = []
    for threads in (1, 2, 3):
        logits = torch.empty((4, native.step.vocab))
        native.step.decoder.decode(
            batch.input_ids.numpy(),
            batch.positions.numpy(),
            batch.out_cache_loc.numpy(),
            native.step.table,
            batch.req_pool_indices.numpy(),
            batch.seq_lens.numpy(),
            logits.numpy(),
            threads,
        )
        results.append(logits)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_bad_inputs_are_errors_and_the_runner_keeps_working(default_like: ModelRunner) -> None:
    native = default_like.cpu_step
    assert native is not None
    sched = Sched(default_like)
    req = sched.new_req()
    sched.extend([req], [prompt(3, 7)])
    loc = sched._alloc(1)
    default_like.req_to_token_pool.write_runs([req.row], [3], loc)
    logits = torch.empty((1, native.step.vocab))

    def call(ids: list[int], positions: list[int], out: list[int], lens: list[int]) -> None:
        arr = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        native.step.decoder.decode(
            arr(ids),
            arr(positions),
            arr(out),
            native.step.table,
            arr([req.row]),
            arr(lens),
            logits.numpy(),
            2,
        )

    with pytest.raises(ValueError, match="outside the vocabulary"):
        call([native.step.vocab], [3], loc, [4])
    with pytest.raises(ValueError, match="outside the pool"):
        call([5], [3], [10**9], [4])
    with pytest.raises(ValueError, match="RoPE table"):
        call([5], [10**7], loc, [4])
    with pytest.raises(ValueError, match="length"):
        call([5], [3], loc, [10**7])
    with pytest.raises(ValueError, match="positions"):
        call([5, 6], [3], loc, [4])
    call([5], [3], loc, [4])  # and a good call still works
    assert torch.isfinite(logits).all()


def test_large_batches_take_the_torch_forward(default_like: ModelRunner) -> None:
    native = default_like.cpu_step
    assert native is not None
    n = MAX_BATCH + 1
    big = ForwardBatch.decode([1] * n, list(range(n)), list(range(n)), [1] * n, "cpu")
    small = ForwardBatch.decode([1], [0], [0], [1], "cpu")
    assert not native.can_run(big) and native.can_run(small)


def to_q8_blocks(model: torch.nn.Module) -> None:
    """Every linear layer of `model` (not the embedding / lm_head) re-held as Q8_0 blocks of its
    own weights: a GGUF model of any family."""

    def blocks(w: torch.Tensor) -> GGUFWeight:
        q = quantize(w.detach().float().numpy(), GGMLQuantizationType.Q8_0)
        return GGUFWeight("Q8_0", torch.from_numpy(np.ascontiguousarray(q)), w.shape[1])

    for m in model.modules():
        if isinstance(m, Linear) and m.gguf is None:
            m._keep_blocks([blocks(m.weight)])
        elif isinstance(m, RowParallelLinear) and m.gguf is None:
            m.gguf = GGUFLinear(m.in_per_rank, [blocks(m.weight)])
            m.weight = None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
def test_families_match_the_torch_forward(arch: str, tmp_path: Path) -> None:
    """Biases (Qwen2), q/k norms (Qwen3, Gemma 3), windows (Mistral, Gemma), sandwich norms,
    GELU, scaled embeddings and soft-caps (Gemma 2), local RoPE (Gemma 3); dense embedding and
    lm_head."""
    path = make_tiny_model(tmp_path / arch, arch, sliding_window=4)
    runner = make_runner(path)
    assert runner.cpu_step is None  # no GGUF weights: the torch forward
    to_q8_blocks(runner.model)
    runner.cpu_step = CpuStepRunner.maybe_create(runner)
    assert runner.cpu_step is not None
    run_steps(runner, steps=8, exact=False, atol=INT8_TOL)


def test_unsupported_models_say_why(tmp_path: Path) -> None:
    from srt.model_executor.cpu_step import unsupported

    runner = make_runner(make_tiny_model(tmp_path / "moe", "mixtral"))
    to_q8_blocks(runner.model)
    assert unsupported(runner) == "mixture-of-experts layers"
    runner = make_runner(make_tiny_model(tmp_path / "llama", "llama"))
    assert "no GGUF weights" in (unsupported(runner) or "")
    to_q8_blocks(runner.model)
    assert unsupported(runner) is None
    runner.server_args = dataclasses.replace(runner.server_args, disable_native_decode=True)
    assert unsupported(runner) == "--disable-native-decode"
