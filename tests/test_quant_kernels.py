"""The GGUF block kernels of srt._native against gguf-py, llama.cpp's own Python reader:
dequantization bit for bit, and the quantized matmul within the rounding of its int8
activations (32-weight blocks) or float error (K-quants)."""

from __future__ import annotations

import numpy as np
import pytest

from srt._native import quant_dequantize, quant_matmul

gguf = pytest.importorskip("gguf")

# type: (weights per block, bytes per block, offsets of the block's f16 scales)
FORMATS = {
    "Q4_0": (32, 18, [0]),
    "Q4_1": (32, 20, [0, 2]),
    "Q8_0": (32, 34, [0]),
    "Q4_K": (256, 144, [0, 2]),
    "Q6_K": (256, 210, [208]),
}


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random blocks whose f16 scales are ordinary numbers (no NaN or inf)."""
    be, bb, halves = FORMATS[name]
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 256, (n, k // be * bb), dtype=np.uint8)
    blocks = w.reshape(n, k // be, bb)
    for at in halves:
        scales = rng.uniform(-0.2, 0.2, (n, k // be)).astype(np.float16)
        blocks[:, :, at : at + 2] = scales.view(np.uint8).reshape(n, k // be, 2)
    return w


@pytest.mark.parametrize("name", list(FORMATS))
def test_dequantize_matches_gguf_py(name: str) -> None:
    n, k = 7, 512
    w = random_blocks(name, n, k)
    want = gguf.quants.dequantize(w, getattr(gguf.GGMLQuantizationType, name))
    out = np.empty((n, k), np.float32)
    quant_dequantize(name, w, k, out, 2)
    np.testing.assert_array_equal(out, want.astype(np.float32))


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("b", [1, 5])
def test_matmul_matches_the_dequantized_product(name: str, b: int) -> None:
    n, k = 300, 768
    w = random_blocks(name, n, k, seed=1)
    wf = np.empty((n, k), np.float32)
    quant_dequantize(name, w, k, wf, 1)
    x = np.random.default_rng(2).standard_normal((b, k)).astype(np.float32)
    out = np.full((b, n + 3), np.nan, np.float32)
    quant_matmul(name, w, k, x, out, 2, 2)
    want = x.astype(np.float64) @ wf.T.astype(np.float64)
    if FORMATS[name][0] == 32:
        # x is taken as int8 per 32 values: each is off by at most amax / 254.
        amax = np.abs(x.reshape(b, k // 32, 32)).max(-1)
        wsum = np.abs(wf.reshape(n, k // 32, 32)).sum(-1)
        bound = amax @ wsum.T / 254 + 1e-4
    else:  # f32 sums: relative to the size of the terms, not of their (cancelling) sum
        bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wf).T) + 1e-4
    assert (np.abs(out[:, 2:-1] - want) <= bound).all()
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, -1]).all()  # only its columns


def test_bad_calls_are_value_errors() -> None:
    w = random_blocks("Q4_0", 4, 64)
    out = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="unsupported GGUF block type"):
        quant_matmul("Q5_K", w, 64, np.zeros((1, 64), np.float32), out, 0, 1)
    with pytest.raises(ValueError, match="cannot take"):
        quant_matmul("Q4_0", w, 64, np.zeros((1, 64), np.float32), out, 1, 1)
    with pytest.raises(ValueError):
        quant_matmul("Q4_0", w, 32, np.zeros((1, 32), np.float32), out, 0, 1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("b", [1, 3])
def test_packed_matmul_matches_the_blocks(name: str, b: int) -> None:
    """Packing keeps the weights; the packed product is the blocks' within int8 rounding."""
    from srt._native import quant_matmul_packed, quant_pack

    n, k = 70, 1536
    w = random_blocks(name, n, k, seed=3)
    wf = np.empty((n, k), np.float32)
    quant_dequantize(name, w, k, wf, 1)
    bits, data, d, m = quant_pack(name, w, k)
    assert bits == (8 if name == "Q8_0" else 4)
    x = np.random.default_rng(4).standard_normal((b, k)).astype(np.float32)
    out = np.full((b, n + 1), np.nan, np.float32)
    quant_matmul_packed(bits, data, d, m, k, x, out, 1, 2)
    want = x.astype(np.float64) @ wf.T.astype(np.float64)
    amax = np.abs(x.reshape(b, k // 32, 32)).max(-1)
    wsum = np.abs(wf.reshape(n, k // 32, 32)).sum(-1)
    bound = amax @ wsum.T / 254 + 1e-3 * (1 + np.abs(want))
    assert (np.abs(out[:, 1:] - want) <= bound).all()
    assert np.isnan(out[:, 0]).all()
    with pytest.raises(ValueError):
        quant_pack("Q6_K", random_blocks("Q6_K", 2, 256), 256)
