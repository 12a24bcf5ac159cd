"""CudaGraphRunner: decode steps replayed from captured CUDA graphs, in the scheduler process.

Built by the ModelRunner once the KV pool is bound (`maybe_create`); then `can_run(batch)` /
`replay(batch)` stand in for the eager forward of a decode batch. One graph is captured per
batch size in `capture_batch_sizes` (1, 2, 4, 8, then steps of 8 up to --cuda-graph-max-bs),
largest first, all in one shared memory pool. A batch of B sequences replays the graph of the
smallest captured size >= B; the extra rows are padding: token 0 at position 0, KV written to
slot 0 (the padding page) and a one-token sequence in the ReqToTokenPool's spare row. Each row of
a decode step is computed independently of the others, so padding changes no real row, and the
rows B.. of the output are dropped.

What the graphs read lives in fixed buffers: the static inputs here and the attention backend's
index buffers (`AttentionBackend.init_cuda_graph_state`); before each replay the inputs are
copied in and the backend replans on the host.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from srt.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 256


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, up to and including max_bs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.model = runner.model
        self.backend = runner.attn_backend
        self.device = runner.device
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        pool = runner.req_to_token_pool
        # NOTE: padding rows read only column 0 of this row (one-token sequences) and write KV
        # only to slot 0; whatever they compute stays in their own rows, which are dropped.
        self.pad_row = pool.pad_row
        self.backend.init_cuda_graph_state(self.max_bs, pool.max_context_len)
        n = self.max_bs
        with torch.inference_mode():
            self.input_ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            self.positions = torch.zeros(n, dtype=torch.int64, device=self.device)
            self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=self.device)
            self.req_pool_indices = torch.full(
                (n,), self.pad_row, dtype=torch.int64, device=self.device
            )
            self.seq_lens = torch.ones(n, dtype=torch.int64, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # One fp32 logits buffer [max_bs, vocab] every graph writes its rows of. NOTE: a
        # graph's own output would stay allocated in the graph pool, one [bs, vocab] tensor per
        # captured size: ~2 GiB for an 8B model's 35 graphs up to 256, ~8.5 GiB up to 512.
        self.logits: torch.Tensor | None = None
        self.mempool = torch.cuda.graph_pool_handle()
        # NOTE: one capture stream for every graph: the allocator reuses a freed block only on
        # the stream it was allocated on, so a stream per capture made each graph keep its own
        # activations in the pool (7.8 GiB by the graph of batch 352 when capturing up to 512).
        self.stream = torch.cuda.Stream(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), _no_gc_cycles():
            for bs in reversed(self.batch_sizes):  # largest first: the pool fits the rest
                self._capture(bs)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            _ranges(self.batch_sizes),
            time.perf_counter() - t0,
        )

    @classmethod
    def maybe_create(cls, runner: ModelRunner) -> CudaGraphRunner | None:
        """The graph runner the server args ask for, or None (eager decode)."""
        args = runner.server_args
        if runner.device.type != "cuda" or args.disable_cuda_graph:
            return None
        if runner.parallel.world_size > 1:
            # NOTE: graphs with tensor-parallel collectives or pipeline sends are not validated.
            logger.info("tp/pp ranks run decode eagerly (CUDA graphs are single-rank for now)")
            return None
        if not runner.attn_backend.supports_cuda_graph:
            logger.info(
                "attention backend %s has no CUDA graph support; decode runs eagerly",
                type(runner.attn_backend).__name__,
            )
            return None
        max_bs = min(args.cuda_graph_max_bs or DEFAULT_MAX_BS, runner.max_running_requests)
        return cls(runner, max_bs)

    # ---- capture -------------------------------------------------------------------------

    def _batch(self, bs: int, seq_lens_cpu: np.ndarray) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=seq_lens_cpu,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.positions, batch)
        return self.model.compute_logits(hidden, batch)

    def _capture(self, bs: int) -> None:
        # All padding: the captured values do not matter.
        batch = self._batch(bs, np.ones(bs, dtype=np.int64))
        self.backend.init_forward_metadata_cuda_graph(batch)
        # Warm up outside the capture (cuBLAS handles, lazy kernel loading, allocator).
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                out = self._forward(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.logits is None:  # the largest size comes first
            self.logits = torch.empty(
                (self.max_bs, *out.shape[1:]), dtype=out.dtype, device=self.device
            )
        del out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
            self.logits[:bs].copy_(self._forward(batch))
        self.graphs[bs] = graph

    # ---- replay --------------------------------------------------------------------------

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs

    def padded_size(self, bs: int) -> int:
        return next(s for s in self.batch_sizes if s >= bs)

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits [B, vocab], as ModelRunner.forward. NOTE: a view of the graphs' shared
        output buffer, valid until the next replay (work enqueued on the stream before it
        reads it in time)."""
        bs = batch.batch_size
        pbs = self.padded_size(bs)
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if pbs > bs:  # a bigger batch earlier may have left real rows here
            self.input_ids[bs:pbs].zero_()
            self.positions[bs:pbs].zero_()
            self.out_cache_loc[bs:pbs].zero_()
            self.req_pool_indices[bs:pbs].fill_(self.pad_row)
            self.seq_lens[bs:pbs].fill_(1)
        seq_lens_cpu = batch.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = batch.seq_lens.cpu().numpy()
        padded = np.ones(pbs, dtype=np.int64)
        padded[:bs] = seq_lens_cpu
        self.backend.init_forward_metadata_cuda_graph(self._batch(pbs, padded))
        self.graphs[pbs].replay()
        assert self.logits is not None
        return self.logits[:bs]


@contextmanager
def _no_gc_cycles() -> Iterator[None]:
    """No cyclic garbage collection inside: a collection during a capture could free an
    earlier runner's graphs or pool blocks, which CUDA forbids while a stream captures (the
    capture fails with cudaErrorStreamCaptureInvalidated, as it did on the H100 with a test's
    runners). Garbage from before is collected first."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ranges(sizes: list[int]) -> str:
    if len(sizes) <= 5:
        return ", ".join(map(str, sizes))
    return f"{', '.join(map(str, sizes[:5]))}, ..., {sizes[-1]}"
