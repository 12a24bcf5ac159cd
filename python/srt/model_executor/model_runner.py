"""ModelRunner: the model, its weights and the KV cache tensors, in the scheduler process.

Construction builds the model on the device in the configured dtype, loads the weights (or
dummy ones), sizes the KV pool (from --max-total-tokens or from memory) and allocates it, then
binds the attention backend to the pools. `forward(ForwardBatch)` runs one step and returns fp32
logits [B, vocab] of each sequence's last token. The scheduler owns slot and row bookkeeping and
writes `req_to_token_pool` before each forward.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from srt.configs.model_config import ModelConfig, resolve_device
from srt.layers.attention import create_attention_backend
from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool
from srt.model_executor.cuda_graph_runner import CudaGraphRunner
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_loader.weights import init_dummy_weights, iterate_safetensors
from srt.models.registry import get_model_class
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

GPU_MEM_FRACTION_DEFAULT = 0.88
CPU_MEM_FRACTION_DEFAULT = 0.3
CPU_MAX_TOTAL_TOKENS_DEFAULT = 65536
# GPU memory kept out of the KV pool for activations, the allocator's slack and the CUDA context.
GPU_RESERVE_BYTES = 1 << 30
# Extra columns of the request-to-token table beyond the context length (cheap safety margin).
REQ_TO_TOKEN_SLACK = 4


class ModelRunner:
    def __init__(self, model_config: ModelConfig, server_args: ServerArgs) -> None:
        self.model_config = model_config
        self.server_args = server_args
        wanted = resolve_device(server_args.device)
        if (
            server_args.device != "auto"
            and wanted.split(":")[0] != model_config.device.split(":")[0]
        ):
            raise ValueError(
                f"--device {server_args.device} differs from the ModelConfig's {model_config.device}"
            )
        self.device = torch.device(model_config.device)
        self.dtype: torch.dtype = model_config.torch_dtype
        self.page_size = server_args.page_size
        free_before_load = _free_memory_bytes(self.device)

        self.attn_backend = create_attention_backend(server_args.attention_backend, model_config)
        self.model = self._load_model()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

        self.max_total_num_tokens = self._kv_pool_tokens(free_before_load)
        self.max_running_requests = server_args.max_running_requests or min(
            256, max(8, self.max_total_num_tokens // 32)
        )
        # One spare row: a padding row for padded batches, never handed to a request.
        self.req_to_token_pool = ReqToTokenPool(
            self.max_running_requests + 1,
            model_config.context_len + REQ_TO_TOKEN_SLACK,
            self.device,
        )
        self.kv_pool = KVPool(
            self.max_total_num_tokens,
            self.page_size,
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            self.dtype,
            self.device,
        )
        self.attn_backend.bind_pools(self.req_to_token_pool, self.kv_pool)
        self.cuda_graph_runner = CudaGraphRunner.maybe_create(self)
        logger.info(
            "model %s loaded: %.1f MiB weights, max_total_num_tokens=%d (KV pool), %d running "
            "requests max, attention %s, %s",
            model_config.architecture,
            self.weight_bytes / 2**20,
            self.max_total_num_tokens,
            self.max_running_requests,
            type(self.attn_backend).__name__,
            "CUDA graphs" if self.cuda_graph_runner else "no CUDA graphs",
        )

    def _load_model(self) -> nn.Module:
        cfg = self.model_config
        model_cls = get_model_class(cfg.architecture)
        with _default_dtype(self.dtype), self.device:
            model = model_cls(cfg.hf_config, self.attn_backend, max_position=cfg.context_len)
        with torch.no_grad():
            if self.server_args.load_format == "dummy":
                init_dummy_weights(model, seed=self.server_args.random_seed)
            else:
                model.load_weights(iterate_safetensors(cfg.model_path))
        return model.eval()

    def _kv_pool_tokens(self, free_before_load: int) -> int:
        cfg = self.model_config
        per_token = KVPool.bytes_per_token(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype
        )
        if self.server_args.max_total_tokens is not None:
            tokens = self.server_args.max_total_tokens
        elif self.device.type == "cuda":
            fraction = self.server_args.mem_fraction_static or GPU_MEM_FRACTION_DEFAULT
            free_now, total = torch.cuda.mem_get_info(self.device)
            budget = min(
                total * fraction - self.weight_bytes - GPU_RESERVE_BYTES,
                free_now - GPU_RESERVE_BYTES,
            )
            tokens = int(budget // per_token)
        else:
            fraction = self.server_args.mem_fraction_static or CPU_MEM_FRACTION_DEFAULT
            budget = free_before_load * fraction - self.weight_bytes
            tokens = min(int(budget // per_token), CPU_MAX_TOTAL_TOKENS_DEFAULT)
        tokens -= tokens % self.page_size
        if tokens < self.page_size:
            raise RuntimeError(
                f"not enough memory for the KV cache ({per_token} bytes per token, weights "
                f"{self.weight_bytes / 2**20:.0f} MiB); pass --max-total-tokens or raise "
                "--mem-fraction-static"
            )
        return tokens

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """One step: fp32 logits [B, vocab] of the last token of each sequence, followed by the
        rows of `batch.extra_logit_indices` when an extend batch sets them."""
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        self.attn_backend.init_forward_metadata(batch)
        hidden_states = self.model(batch.input_ids, batch.positions, batch)
        return self.model.compute_logits(hidden_states, batch)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
