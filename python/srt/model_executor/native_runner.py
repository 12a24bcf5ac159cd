"""NativeRunner: a single-rank CPU scheduler's model without torch, from a native bundle.

Where a bundle of this model and these flags exists (`native_bundle`: written by an earlier
scheduler whose torch `ModelRunner` found the native CPU step applies), the scheduler builds
this runner instead of the ModelRunner: the bundle's spec (memory-mapped weights), a KV pool
and request-to-token table of numpy arrays (`HostPools`, sized as the ModelRunner sizes them),
and srt-kernels' decoder running every prefill and decode step (`NativeStep`). Its steps are
the ModelRunner's native steps bit for bit (tests/test_native_runner.py). The host step worker
samples its logits; nothing in this path imports torch.
"""

from __future__ import annotations

import logging

import numpy as np

from srt.configs.model_config import ModelConfig
from srt.cpu_share import CoreShare
from srt.cpu_threads import scheduler_threads
from srt.mem_cache.host_pool import (
    REQ_TO_TOKEN_SLACK,
    HostPools,
    cpu_pool_tokens,
    host_memory_available,
)
from srt.model_executor.native_bundle import Bundle
from srt.model_executor.native_step import NativeStep
from srt.model_executor.step_input import StepInput
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


class NativeRunner:
    device = "cpu"

    def __init__(self, bundle: Bundle, model_config: ModelConfig, server_args: ServerArgs) -> None:
        meta = bundle.meta
        self.share = CoreShare(scheduler_threads(server_args), fixed=server_args.fixed_threads)
        self.dtype: str = meta["dtype"]
        self.kv_dtype: str = meta["kv_dtype"]
        page = server_args.page_size
        per_token = 2 * meta["num_layers"] * meta["num_kv_heads"] * meta["head_dim"]
        per_token *= 2 if self.kv_dtype == "bfloat16" else 4
        tokens = cpu_pool_tokens(
            server_args.max_total_tokens,
            server_args.mem_fraction_static,
            # NOTE: the bundle's weights are mapped, not read: this is the memory before them.
            host_memory_available(),
            meta["weight_bytes"],
            per_token,
        )
        tokens -= tokens % page
        if tokens < page:
            raise RuntimeError(
                f"not enough memory for the KV cache ({per_token} bytes per token); pass "
                "--max-total-tokens or raise --mem-fraction-static"
            )
        self.max_total_num_tokens = tokens
        self.max_running_requests = server_args.max_running_requests or min(
            256, max(8, tokens // 32)
        )
        # One spare row: the padding row, never handed to a request.
        self.pools = HostPools(
            self.max_running_requests + 1,
            model_config.context_len + REQ_TO_TOKEN_SLACK,
            tokens,
            page,
            meta["num_layers"],
            meta["num_kv_heads"],
            meta["head_dim"],
            self.kv_dtype,
        )
        kv = list(zip(self.pools.k, self.pools.v, strict=True))
        self.step = NativeStep(bundle.spec, kv, self.pools.table)
        logger.info(
            "model %s loaded without torch (native bundle): %.1f MiB weights, "
            "max_total_num_tokens=%d (KV pool, %s), %d running requests max, threads: %s",
            model_config.architecture,
            meta["weight_bytes"] / 2**20,
            tokens,
            self.kv_dtype,
            self.max_running_requests,
            self.share.describe(),
        )

    @property
    def threads(self) -> int:
        return self.share.threads()

    @property
    def table_rows(self) -> int:
        return self.pools.rows

    def forward_host(self, step: StepInput) -> np.ndarray:
        """Applies the step's table writes and runs it: float32 logits [rows, vocab] (each
        sequence's last token, then the step's extra logit rows)."""
        self.pools.apply(
            step.section("table_rows"), step.section("table_cols"), step.section("table_slots")
        )
        decode = step.decode
        extra = None if decode else np.asarray(step.extra_logit_indices, dtype=np.int64)
        return self.step.forward(
            decode,
            step.section("input_ids"),
            step.section("positions"),
            step.section("out_loc"),
            step.section("rows"),
            step.section("seq_lens"),
            None if decode else step.section("prefix_lens"),
            None if decode else step.section("extend_lens"),
            extra,
            self.threads,
        )
