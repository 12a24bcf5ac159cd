"""StepWorker: runs planned steps on the model's device, in plan order, in the scheduler process:
on a GPU, and on the ranks-0 of multi-rank CPU replicas (a single-rank CPU scheduler has the
`HostStepWorker`, host_worker.py).

In: a `StepJob` (a step's `StepInput` plus the host work rank 0 prepared for it: grammar
bitmasks, which rows want logprobs, prompt-logprob targets). Per step it applies the table
writes and the admitted rows' sampling state, takes each decode input from the previous
step's sample of the same row (the sampled ids never leave the device for that), runs the
forward, samples, records the tokens, and starts the copy of the ids to the host.
Out: a `PendingStep` whose `result()` is the step's `StepOutput` (ids as a numpy array, and the
logprobs that were asked for).

Overlap (on by default on GPU): steps run on one worker thread, so the scheduler plans step
N + 1 and processes step N's output while N + 1 runs (on a GPU the thread launches kernels and
records an event per step, and `result()` waits for that event; on the CPU torch releases the
GIL inside its kernels, but the forward's Python between them holds it, which is why overlap
is opt-in there). Every device-side effect of a step happens on this one thread in plan order,
which is what lets the planner reuse a slot or a row as soon as it frees it: a later step never
runs before an earlier one. Without overlap `submit` runs the step inline.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from srt.layers.logprobs import token_logprobs
from srt.layers.sampler import SamplingState
from srt.model_executor.forward_batch import ForwardBatch, to_device
from srt.model_executor.step_job import Logprobs, PendingStep, StepJob, StepOutput, submit

if TYPE_CHECKING:
    from srt.model_executor.model_runner import ModelRunner


class StepWorker:
    def __init__(
        self,
        runner: ModelRunner,
        vocab_size: int,
        overlap: bool,
        grammar_apply: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        self.runner = runner
        self.device = runner.device
        # One row beyond the scheduler's: the padding row of padded batches.
        self.state = SamplingState(runner.req_to_token_pool.size, vocab_size, self.device)
        self.multi_rank = runner.parallel.world_size > 1
        self.overlap = overlap
        self._grammar_apply = grammar_apply
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="srt-step") if overlap else None
        )
        if self._executor is not None:
            # NOTE: per-thread settings the worker thread must share with this one: the CUDA
            # device and torch's intra-op thread count.
            threads = torch.get_num_threads()
            cuda_index = None
            if self.device.type == "cuda":
                # NOTE: a single-rank runner's device is a bare "cuda", which set_device refuses.
                cuda_index = self.device.index
                if cuda_index is None:
                    cuda_index = torch.cuda.current_device()
            self._executor.submit(self._init_thread, threads, cuda_index).result()

    def _init_thread(self, threads: int, cuda_index: int | None) -> None:
        torch.set_num_threads(threads)
        if cuda_index is not None:
            torch.cuda.set_device(cuda_index)

    def submit(self, job: StepJob) -> PendingStep:
        return submit(self._executor, self._execute, job, _finish)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @torch.inference_mode()
    def _execute(self, job: StepJob) -> tuple[torch.Tensor, Any, Logprobs | None, Logprobs | None]:
        if job.fail is not None:
            raise RuntimeError(job.fail)
        step = job.step
        state = self.state
        if step.decode and self.multi_rank:
            # The other ranks need the input ids in the step they receive.
            rows = torch.from_numpy(step.section("rows")).to(self.device)
            step.section("input_ids")[:] = state.last_token.index_select(0, rows).cpu().numpy()
        batch = ForwardBatch.from_step(step, self.device)
        state.admit(batch)
        if step.decode and not self.multi_rank:
            batch.input_ids = state.last_token.index_select(0, batch.req_pool_indices)
        logits = self.runner.forward(batch)
        b = step.num_seqs
        prompt_logprobs = None
        if job.prompt_targets is not None:
            targets = to_device(job.prompt_targets, logits.device)
            prompt_logprobs = token_logprobs(logits[b:], targets, job.prompt_tops)
        rows = batch.section("sample_rows")
        if rows.numel() == 0:
            return torch.zeros(0, dtype=torch.int64), None, None, prompt_logprobs
        last = logits[:b] if step.decode else logits.index_select(0, batch.section("sample_pos"))
        sample_from = last
        if job.grammar_bitmask is not None and self._grammar_apply is not None:
            # NOTE: a masked copy; logprobs stay those of the raw distribution.
            sample_from = last.clone()
            idx = to_device(job.grammar_samples, last.device)
            sub = sample_from.index_select(0, idx)
            self._grammar_apply(sub, job.grammar_bitmask)
            sample_from[idx] = sub
        mask_sample = batch.section("mask_sample")
        ids = state.sample(
            sample_from,
            rows,
            batch.section("sample_steps"),
            step.flags,
            mask_sample if mask_sample.numel() else None,
            batch.section("mask_tokens"),
            step.top_k_max,
        )
        logprobs = None
        if job.logprob_samples is not None:
            idx = to_device(job.logprob_samples, last.device)
            logprobs = token_logprobs(
                last.index_select(0, idx), ids.index_select(0, idx), job.logprob_tops
            )
        # NOTE: last, so a step that raised left no token in the sampling state (it may run
        # again without some of its requests).
        state.record(rows, ids, step.flags)
        if ids.is_cuda:
            # NOTE: into pinned memory, or the copy would wait for the device here and the
            # worker could not launch the next step before this one finished.
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event, logprobs, prompt_logprobs
        return ids, None, logprobs, prompt_logprobs


def _finish(done: tuple[torch.Tensor, Any, Logprobs | None, Logprobs | None]) -> StepOutput:
    ids, event, logprobs, prompt_logprobs = done
    if event is not None:
        event.synchronize()
    return StepOutput(ids.numpy(), logprobs, prompt_logprobs)
