"""FlashInfer's fused elementwise kernels for the CUDA path of the model layers.

RMSNorm, residual-add + RMSNorm, SiLU-and-mul and RoPE are each a chain of small torch kernels
(an RMSNorm alone is ~9 launches); in a batch-1 decode step of a 32-layer model they would add
a thousand kernels to the matmuls. On a CUDA device in bf16/fp16 the layers take FlashInfer's
one-kernel versions instead (computed in fp32 and rounded once, so results differ from the
torch path in the last bf16 bit). The choice is made when a layer is built, from where its
tensors live; CPU models and fp32 never use it.

`kernels(device, dtype)` returns the flashinfer module to call, or None: CPU, fp32, flashinfer
missing, or SRT_DISABLE_FUSED_KERNELS=1 (to compare with the plain torch path).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "SRT_DISABLE_FUSED_KERNELS"


@functools.cache
def _flashinfer() -> Any:
    try:
        import flashinfer
    except Exception as e:  # missing or broken: the torch path serves
        logger.info("flashinfer unavailable (%s): model layers use plain torch kernels", e)
        return None
    return flashinfer


def kernels(device: torch.device | str, dtype: torch.dtype) -> Any:
    """The flashinfer module when its fused kernels serve tensors of this device and dtype."""
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    return _flashinfer()
