"""ModelRunner: the model, its weights and the KV cache tensors, in the scheduler process.

Construction builds the model on the device in the configured dtype, loads the weights (or
dummy ones), sizes the KV pool (from --max-total-tokens or from memory) and allocates it, then
binds the attention backend to the pools. `forward(ForwardBatch)` applies the step's
req_to_token writes, runs one step and returns fp32 logits [B, vocab] of each sequence's last
token. The Rust scheduler owns slot and row bookkeeping; sampling is the step worker's.

Tensor / pipeline parallel (srt.distributed, initialized before the runner is built): every rank
builds its shard of the model and a KV pool of its heads and layers, all of the same size (the
smallest any rank can hold). Rank 0's `forward` broadcasts the step's `StepInput`; the other
ranks wait in `worker_loop`, rebuild the batch and run the same step. Under pipeline parallel
a step is cut into up to pp_size micro-batches that follow each other through the stages
(stage s works on micro-batch k while stage s + 1 works on k - 1), and the last stage sends
the logits to rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from srt.configs.model_config import ModelConfig, resolve_device
from srt.cpu_threads import set_scheduler_threads
from srt.distributed.parallel_state import (
    broadcast_bytes,
    cpu_all_reduce_min,
    get_parallel_state,
    recv,
    send_async,
)
from srt.layers.attention import create_attention_backend
from srt.layers.quantization import gguf_bytes
from srt.mem_cache.host_pool import REQ_TO_TOKEN_SLACK, cpu_pool_tokens, host_memory_available
from srt.mem_cache.memory_pool import KVPool, ReqToTokenPool
from srt.model_executor.cpu_step import CpuStepRunner
from srt.model_executor.cuda_graph_runner import DEFAULT_MAX_BS as CUDA_GRAPH_DEFAULT_MAX_BS
from srt.model_executor.cuda_graph_runner import CudaGraphRunner
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.step_input import StepInput
from srt.model_executor.step_job import RankFailure
from srt.model_loader.weight_format import WeightFormat, resolve_weight_format
from srt.model_loader.weights import init_dummy_weights, iterate_weights
from srt.models.registry import get_model_class
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

GPU_MEM_FRACTION_DEFAULT = 0.88
# GPU memory kept out of the KV pool for activations, the allocator's slack and the CUDA context.
GPU_RESERVE_BYTES = 1 << 30


def kv_cache_dtype(flag: str, dtype: torch.dtype, weights: WeightFormat) -> torch.dtype:
    """The KV pool's dtype for `--kv-cache-dtype` (see server_args): "auto" is bfloat16 for
    GGUF blocks run in float32 on a CPU (the native step and attention kernels read it), else
    the model's dtype."""
    if flag != "auto":
        return getattr(torch, flag)
    if weights.gguf_blocks and dtype == torch.float32:
        return torch.bfloat16
    return dtype


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
        if self.device.type == "cpu":
            # NOTE: a process-wide setting; the runner is what does this process's math.
            set_scheduler_threads(server_args)
        self.weight_format = resolve_weight_format(
            server_args.quantization,
            model_config.dtype,
            model_config.device,
            model_config.model_path,
        )
        # NOTE: the dtype "auto" resolves here, for all that reads the config after (attention
        # backend, KV pool): on a CPU it depends on the weights' format.
        model_config.dtype = self.weight_format.dtype
        logger.info("weights: %s", self.weight_format.reason)
        self.dtype: torch.dtype = model_config.torch_dtype
        self.kv_dtype = kv_cache_dtype(server_args.kv_cache_dtype, self.dtype, self.weight_format)
        if self.kv_dtype != self.dtype and self.device.type != "cpu":
            raise ValueError(
                f"--kv-cache-dtype {server_args.kv_cache_dtype} differs from the model's dtype "
                f"({self.dtype}): a KV cache of another dtype runs on a CPU only"
            )
        self.page_size = server_args.page_size
        self.parallel = get_parallel_state()
        free_before_load = _free_memory_bytes(self.device)

        self.attn_backend = create_attention_backend(server_args.attention_backend, model_config)
        self.model = self._load_model()
        self.weight_bytes = sum(
            p.numel() * p.element_size() for p in self.model.parameters()
        ) + gguf_bytes(self.model)
        self.start_layer, self.end_layer = self.model.layer_range
        self.num_kv_heads = self.model.kv_heads_per_rank

        # NOTE: every rank must hold the same slots, so all take the smallest pool.
        self.max_total_num_tokens = cpu_all_reduce_min(self._kv_pool_tokens(free_before_load))
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
            self.end_layer - self.start_layer,
            self.num_kv_heads,
            model_config.head_dim,
            self.kv_dtype,
            self.device,
            start_layer=self.start_layer,
        )
        self.attn_backend.bind_pools(self.req_to_token_pool, self.kv_pool)
        self.cuda_graph_runner = CudaGraphRunner.maybe_create(self)
        self.cpu_step = CpuStepRunner.maybe_create(self)
        shard = ""
        if self.parallel.world_size > 1:
            shard = (
                f" (tp rank {self.parallel.tp_rank}/{self.parallel.tp_size}, pp stage "
                f"{self.parallel.pp_rank}/{self.parallel.pp_size}: layers "
                f"{self.start_layer}..{self.end_layer - 1}, {self.num_kv_heads} KV heads)"
            )
        logger.info(
            "model %s loaded%s: %.1f MiB weights, max_total_num_tokens=%d (KV pool, %s), %d "
            "running requests max, attention %s, %s",
            model_config.architecture,
            shard,
            self.weight_bytes / 2**20,
            self.max_total_num_tokens,
            str(self.kv_dtype).removeprefix("torch."),
            self.max_running_requests,
            type(self.attn_backend).__name__,
            _step_kind(self),
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
                model.load_weights(iterate_weights(cfg.model_path, self.weight_format.gguf_blocks))
        return model.eval()

    def _graph_logits_bytes(self) -> int:
        """GPU memory the decode CUDA graphs' logits take beyond the fixed reserve: their shared
        fp32 output buffer, and the bf16 and fp32 logits the largest graph makes before copying
        into it (kept in the graphs' memory pool)."""
        args = self.server_args
        if args.disable_cuda_graph or self.parallel.world_size > 1:
            return 0
        max_bs = args.cuda_graph_max_bs or CUDA_GRAPH_DEFAULT_MAX_BS
        if args.max_running_requests is not None:
            max_bs = min(max_bs, args.max_running_requests)
        return max_bs * self.model_config.vocab_size * (4 + 4 + 2)

    def _kv_pool_tokens(self, free_before_load: int) -> int:
        cfg = self.model_config
        per_token = KVPool.bytes_per_token(
            self.end_layer - self.start_layer, self.num_kv_heads, cfg.head_dim, self.kv_dtype
        )
        if self.server_args.max_total_tokens is not None:
            tokens = self.server_args.max_total_tokens
        elif self.device.type == "cuda":
            fraction = self.server_args.mem_fraction_static or GPU_MEM_FRACTION_DEFAULT
            free_now, total = torch.cuda.mem_get_info(self.device)
            reserve = GPU_RESERVE_BYTES + self._graph_logits_bytes()
            budget = min(
                total * fraction - self.weight_bytes - reserve,
                free_now - reserve,
            )
            tokens = int(budget // per_token)
        else:
            args = self.server_args
            tokens = cpu_pool_tokens(
                None, args.mem_fraction_static, free_before_load, self.weight_bytes, per_token
            )
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
        rows of `batch.extra_logit_indices` when an extend batch sets them.

        With several ranks, only rank 0 calls this; it starts the same step on the others."""
        if self.parallel.world_size == 1:
            logits = self._run(batch)
        else:
            assert self.parallel.rank == 0, "only rank 0 plans steps"
            assert batch.step is not None, "a parallel step needs the batch's StepInput"
            try:
                broadcast_bytes(batch.step.encode())
                logits = self._run(batch)
            except Exception as e:
                # NOTE: the other ranks may be inside the step's collectives or gone; the step
                # cannot be retried or skipped alone.
                raise RankFailure(f"parallel step failed on rank 0: {e}") from e
        assert logits is not None
        return logits

    def native_meta(self) -> dict:
        """What a NativeRunner needs besides the native step's spec (see native_bundle)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "weight_bytes": int(self.weight_bytes),
            "num_layers": self.end_layer - self.start_layer,
            "num_kv_heads": int(self.num_kv_heads),
            "head_dim": int(self.model_config.head_dim),
        }

    @property
    def table_rows(self) -> int:
        return self.req_to_token_pool.size

    @property
    def threads(self) -> int:
        """Threads of the next step's native kernels (the native step's team, the sampler)."""
        if self.cpu_step is not None:
            return self.cpu_step.share.threads()
        return torch.get_num_threads()

    def forward_host(self, step: StepInput) -> np.ndarray:
        """`forward` of a step on a CPU runner, as numpy (the host step worker's view)."""
        return self.forward(ForwardBatch.from_step(step, self.device)).numpy()

    @torch.inference_mode()
    def worker_loop(self) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts, until it sends the stop."""
        while True:
            data = broadcast_bytes(None)
            if not data:
                return
            step = StepInput.decode_bytes(data)
            self._run(ForwardBatch.from_step(step, self.device))

    def stop_workers(self) -> None:
        """Rank 0: ends the other ranks' `worker_loop` (in-process use and clean exits)."""
        if self.parallel.world_size > 1 and self.parallel.rank == 0:
            broadcast_bytes(b"")

    def _run(self, batch: ForwardBatch) -> torch.Tensor | None:
        step = batch.step
        if step is not None and batch.device_ints is not None:
            self.req_to_token_pool.apply(
                batch.section("table_rows"),
                batch.section("table_cols"),
                batch.section("table_slots"),
            )
        if self.parallel.pp_size > 1:
            assert step is not None, "a pipeline step needs the batch's StepInput"
            return self._run_pipeline(batch, step)
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(batch):
            return self.cuda_graph_runner.replay(batch)
        if self.cpu_step is not None and self.cpu_step.can_run(batch):
            return self.cpu_step.run(batch)
        self.attn_backend.init_forward_metadata(batch)
        hidden_states = self.model(batch.input_ids, batch.positions, batch)
        return self.model.compute_logits(hidden_states, batch)

    def _run_pipeline(self, batch: ForwardBatch, step: StepInput) -> torch.Tensor | None:
        """This stage's part of a step, micro-batch after micro-batch; rank 0 gets the logits."""
        ps = self.parallel
        parts = step.split(ps.pp_size)
        batches = (
            [batch] if len(parts) == 1 else [ForwardBatch.from_step(p, self.device) for p in parts]
        )
        hidden = self.model_config.hidden_size
        works: list = []
        in_flight: list[torch.Tensor] = []  # sent tensors live until their sends complete
        for mb in batches:
            self.attn_backend.init_forward_metadata(mb)
            intermediate = None
            if not ps.is_first_stage:
                h = torch.empty((mb.num_tokens, hidden), dtype=self.dtype, device=self.device)
                r = torch.empty_like(h)
                recv([h, r], src=ps.stage_rank(ps.pp_rank - 1))
                intermediate = (h, r)
            out = self.model(mb.input_ids, mb.positions, mb, intermediate)
            if ps.is_last_stage:
                logits = self.model.compute_logits(out, mb)
                if ps.tp_rank == 0:
                    works += send_async([logits], dst=0)
                    in_flight.append(logits)
            else:
                works += send_async(list(out), dst=ps.stage_rank(ps.pp_rank + 1))
                in_flight.extend(out)
        result = None
        if ps.rank == 0:
            received = []
            last_stage_rank = ps.stage_rank(ps.pp_size - 1, 0)
            for part in parts:
                t = torch.empty(
                    (part.num_logit_rows, self.model_config.vocab_size),
                    dtype=torch.float32,
                    device=self.device,
                )
                recv([t], src=last_stage_rank)
                received.append(t)
            lasts = [t[: p.num_seqs] for t, p in zip(received, parts, strict=True)]
            extras = [t[p.num_seqs :] for t, p in zip(received, parts, strict=True)]
            result = torch.cat(lasts + extras)
        for w in works:
            w.wait()
        return result


def _step_kind(runner: ModelRunner) -> str:
    if runner.cuda_graph_runner is not None:
        return "CUDA graphs"
    if runner.cpu_step is not None:
        return f"native steps (prefill, decode up to batch {runner.cpu_step.max_bs})"
    return "no CUDA graphs" if runner.device.type == "cuda" else "torch decode step"


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
    return host_memory_available()
