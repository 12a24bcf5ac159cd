"""srt-kernels on the CPU against the torch expressions they replace: the sampler's draw and
the rotary embedding, bit for bit (the decode attention kernel is checked against a float64
reference in test_attention_backends.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srt._native import rope_neox_inplace, sample_draw
from srt.layers.rotary import RotaryEmbedding, rotate_half
from srt.layers.sampler import _drop_below, _inverse_cdf, _top_k_top_p, seeded_uniforms


def _torch_draw(probs, top_k, top_p, min_p, seeds, steps, candidates) -> torch.Tensor:
    """The sampler's torch path (what runs on a GPU), on the CPU."""
    probs = _top_k_top_p(probs.clone(), top_k, top_p, candidates)
    if min_p is not None:
        probs = _drop_below(probs, min_p[:, None] * probs.amax(dim=-1, keepdim=True))
    return _inverse_cdf(probs, seeded_uniforms(seeds, steps))


@pytest.mark.parametrize("seed", range(6))
def test_native_draw_equals_the_torch_path(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    S, V = 64, 96 if seed % 2 else 517
    logits = torch.randn(S, V, generator=g) * (1 + seed)
    if seed >= 3:
        logits = (logits * 2).round() / 2  # many exact ties, also at the cuts
    probs = torch.softmax(logits, dim=-1)
    top_k = torch.randint(1, V + 1, (S,), generator=g)
    top_k[::4] = V  # no top-k
    top_p = torch.rand(S, generator=g) * 0.9 + 0.1
    top_p[1::3] = 1.0  # no top-p
    min_p = torch.rand(S, generator=g) * 0.3
    min_p[::5] = 0.0
    seeds = torch.randint(0, 1 << 62, (S,), generator=g)
    steps = torch.randint(0, 1000, (S,), generator=g)
    for candidates in (V, int(top_k[top_k < V].max())):
        k = top_k.clone()
        if candidates < V:
            # Rows keep at most `candidates`: top-p alone would need them all.
            k = k.clamp(max=candidates)
        for mp in (min_p, None):
            want = _torch_draw(probs, k, top_p, mp, seeds, steps, candidates)
            got = sample_draw(
                probs.numpy(),
                np.sort(probs.numpy(), axis=-1),
                candidates,
                k.numpy(),
                top_p.numpy(),
                None if mp is None else mp.numpy(),
                seeds.numpy(),
                steps.numpy(),
            )
            assert np.array_equal(got, want.numpy()), (candidates, mp is None)
    # No filters at all: the same draw without a sort.
    ones = torch.ones(S)
    full = torch.full((S,), V)
    want = _torch_draw(probs, full, ones, None, seeds, steps, V)
    got = sample_draw(
        probs.numpy(), None, V, full.numpy(), ones.numpy(), None, seeds.numpy(), steps.numpy()
    )
    assert np.array_equal(got, want.numpy())


def test_native_draw_rejects_mismatched_rows() -> None:
    probs = np.full((2, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="2 entries"):
        sample_draw(
            probs,
            None,
            4,
            np.array([4]),
            np.ones(2, np.float32),
            None,
            np.zeros(2, np.int64),
            np.zeros(2, np.int64),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rope_equals_the_torch_expression(dtype: torch.dtype) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    rope = RotaryEmbedding(32, 1024, 500000.0, scaling)
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(77, (6 + 2 + 2) * 32, generator=g) * 3).to(dtype)
    # q and k as the models take them: strided views of the fused projection's output.
    q, k = qkv[:, : 6 * 32].view(77, 6, 32), qkv[:, 6 * 32 : 8 * 32].view(77, 2, 32)
    positions = torch.randint(0, 1024, (77,), generator=g)
    cos = rope.cos_cache[positions].unsqueeze(1).to(dtype)
    sin = rope.sin_cache[positions].unsqueeze(1).to(dtype)
    want_q, want_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    v_before = qkv[:, 8 * 32 :].clone()
    got_q, got_k = rope(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[:, 8 * 32 :], v_before)  # v untouched


def test_native_rope_rejects_positions_past_the_table() -> None:
    cos = np.ones((8, 4), np.float32)
    x = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="position 8"):
        rope_neox_inplace(x, np.array([0, 8]), cos, cos)


def test_native_softmax_applies_penalties_and_temperature() -> None:
    from srt._native import sample_softmax

    g = torch.Generator().manual_seed(3)
    S, V = 40, 300
    logits = torch.randn(S, V, generator=g) * 4
    counts = torch.randint(0, 3, (50, V), generator=g).float()
    rows = torch.randperm(50, generator=g)[:S]
    temperature = torch.rand(S, generator=g) + 0.2
    frequency, presence = torch.rand(S, generator=g), torch.rand(S, generator=g)
    c = counts[rows]
    penalized = logits - c * frequency[:, None] - (c > 0).float() * presence[:, None]
    want = torch.softmax(penalized / temperature[:, None], dim=-1)
    probs, argmax = sample_softmax(
        logits.numpy(),
        temperature.numpy(),
        counts.numpy(),
        rows.numpy(),
        frequency.numpy(),
        presence.numpy(),
    )
    assert np.allclose(probs, want.numpy(), rtol=1e-5, atol=1e-7)
    assert np.array_equal(argmax, penalized.argmax(dim=-1).numpy())
    # Without penalties: the plain softmax.
    probs, argmax = sample_softmax(
        logits.numpy(), temperature.numpy(), None, rows.numpy(), frequency.numpy(), None
    )
    assert np.allclose(probs, torch.softmax(logits / temperature[:, None], -1).numpy(), 1e-5, 1e-7)
    assert np.array_equal(argmax, logits.argmax(dim=-1).numpy())


def test_cpu_sampler_agrees_with_the_torch_path() -> None:
    # The whole CPU sampler (native kernels) against the torch path a GPU runs, on the same
    # rows: a mixed batch of greedy and sampled rows with every feature on.
    from srt._native import (
        FLAG_GREEDY,
        FLAG_MIN_P,
        FLAG_OUTPUT_PENALTY,
        FLAG_PRESENCE_PENALTY,
        FLAG_SAMPLED,
        FLAG_TOP_K_P,
    )
    from srt.layers import sampler as S

    g = torch.Generator().manual_seed(5)
    rows_n, V, B = 80, 256, 64
    state = S.SamplingState(rows_n, V, "cpu")
    rows = torch.randperm(rows_n, generator=g)[:B]
    state.floats[rows, S.TEMPERATURE] = torch.rand(B, generator=g) + 0.3
    state.floats[rows, S.TOP_P] = torch.rand(B, generator=g) * 0.5 + 0.5
    state.floats[rows, S.MIN_P] = torch.rand(B, generator=g) * 0.1
    state.floats[rows, S.FREQUENCY] = torch.rand(B, generator=g)
    state.floats[rows, S.PRESENCE] = torch.rand(B, generator=g)
    state.top_k[rows] = torch.randint(1, 60, (B,), generator=g)
    state.greedy[rows] = torch.rand(B, generator=g) < 0.25
    state.seeds[rows] = torch.randint(0, 1 << 40, (B,), generator=g)
    state.counts = torch.randint(0, 3, (rows_n, V), generator=g).float()
    flags = (
        FLAG_SAMPLED
        | FLAG_GREEDY
        | FLAG_TOP_K_P
        | FLAG_MIN_P
        | FLAG_OUTPUT_PENALTY
        | FLAG_PRESENCE_PENALTY
    )
    logits = torch.randn(B, V, generator=g) * 3
    steps = torch.randint(0, 100, (B,), generator=g)
    got = state.sample(logits, rows, steps, flags, top_k_max=60)
    # The torch path, spelled out.
    f = state.floats[rows]
    x = state.process_logits(logits, rows, flags)
    probs = torch.softmax(x / f[:, S.TEMPERATURE : S.TEMPERATURE + 1], dim=-1)
    probs = _top_k_top_p(probs, state.top_k[rows], f[:, S.TOP_P], 60)
    probs = _drop_below(probs, f[:, S.MIN_P : S.MIN_P + 1] * probs.amax(-1, keepdim=True))
    want = _inverse_cdf(probs, seeded_uniforms(state.seeds[rows], steps))
    want = torch.where(state.greedy[rows], x.argmax(dim=-1), want)
    assert torch.equal(got, want)
