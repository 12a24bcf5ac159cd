"""The CPU's fused layer ops (srt-kernels via srt._native) against the torch code they replace:
RMSNorm with and without the residual add (Llama's and Gemma's), and the gated SiLU, in fp32
and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srt.layers.activation import SiluAndMul
from srt.layers.norm import GemmaRMSNorm, RMSNorm


def _torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (x32 * (1.0 + w.float())).to(x.dtype)
    return w * x32.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
def test_native_rms_norm_matches_torch(dtype: torch.dtype, cls: type) -> None:
    g = torch.Generator().manual_seed(0)
    d = 96
    norm = cls(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    x = torch.randn(5, d, generator=g).to(dtype)
    res = torch.randn(5, d, generator=g).to(dtype)
    gemma = cls is GemmaRMSNorm
    # one rounding of the storage type apart at most (the sums run in another order)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}

    out = norm(x)
    torch.testing.assert_close(out, _torch_norm(x, norm.weight, 1e-5, gemma), **tol)

    want_res = res + x
    want = _torch_norm(want_res, norm.weight, 1e-5, gemma)
    res_in = res.clone()
    out, new_res = norm(x, res_in)
    assert new_res is res_in  # updated in place, as FlashInfer's fused norm does
    torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)
    torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    x = (torch.randn(7, 2 * 40, generator=torch.Generator().manual_seed(1)) * 6).to(dtype)
    out = SiluAndMul()(x)
    want = F.silu(x[:, :40]) * x[:, 40:]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(out, want, **tol)
    # Other shapes (3-D) keep the torch path and agree too.
    torch.testing.assert_close(SiluAndMul()(x[None]), want[None], **tol)


def test_native_kernels_reject_bad_shapes() -> None:
    from srt._native import rms_norm, silu_and_mul

    x = torch.zeros(2, 8)
    with pytest.raises(ValueError):
        rms_norm(x.numpy(), None, torch.zeros(4).numpy(), x.numpy().copy(), 1e-6)
    with pytest.raises(ValueError):
        silu_and_mul(torch.zeros(2, 7).numpy(), torch.zeros(2, 3).numpy())
