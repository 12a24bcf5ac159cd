"""HostStepWorker: runs planned steps of a single-rank CPU model, in plan order, on numpy
arrays, in the scheduler process; importing it does not import torch.

The CPU's step worker (`StepWorker` serves GPUs and multi-rank replicas). Per step it has the
runner apply the table writes and compute the logits (`HostRunner.forward_host`: the torch
`ModelRunner`, or the torch-free `NativeRunner`), writes the admitted rows' sampling state,
takes each decode input from the row's last sampled token, samples (`HostSamplingState`), and
records the tokens. Out: a `PendingStep` whose `result()` is the step's `StepOutput`.

Grammar masks are applied by the grammar backend (xgrammar, torch tensors): torch is imported
for them when a step first carries one.

Overlap (`--enable-overlap-on-cpu`): steps run on one worker thread, so the scheduler plans
step N + 1 while step N runs (the native step releases the GIL); every step's effects happen on
that thread in plan order. Without overlap `submit` runs the step inline.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from srt.layers.host_sampler import HostSamplingState, host_token_logprobs
from srt.model_executor.step_input import StepInput
from srt.model_executor.step_job import PendingStep, StepJob, StepOutput, submit

_NO_IDS = np.zeros(0, dtype=np.int64)


class HostRunner(Protocol):
    """What the host worker needs of a runner."""

    # Rows of the request-to-token table (the sampling state has one per row).
    table_rows: int
    # Threads the runner computes with (the sampler uses as many).
    threads: int

    def forward_host(self, step: StepInput) -> np.ndarray:
        """Applies the step's table writes and runs it: float32 logits [rows, vocab] (each
        sequence's last token, then the step's extra logit rows)."""
        ...


class HostStepWorker:
    def __init__(
        self,
        runner: HostRunner,
        vocab_size: int,
        overlap: bool,
        grammar_apply: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self.runner = runner
        self.state = HostSamplingState(runner.table_rows, vocab_size)
        self._grammar_apply = grammar_apply
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="srt-step") if overlap else None
        )

    def submit(self, job: StepJob) -> PendingStep:
        return submit(self._executor, self._execute, job)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _execute(self, job: StepJob) -> StepOutput:
        if job.fail is not None:
            raise RuntimeError(job.fail)
        step = job.step
        state = self.state
        state.admit(step)
        b = step.num_seqs
        if step.decode:
            # NOTE: the planner leaves -1 where the previous step's token was not known yet.
            step.section("input_ids")[:] = state.last_token[step.section("rows")]
        logits = self.runner.forward_host(step)
        prompt_logprobs = None
        if job.prompt_targets is not None:
            prompt_logprobs = host_token_logprobs(logits[b:], job.prompt_targets, job.prompt_tops)
        rows = step.section("sample_rows")
        if not len(rows):
            return StepOutput(_NO_IDS, None, prompt_logprobs)
        last = logits[:b] if step.decode else logits[step.section("sample_pos")]
        sample_from = last
        if job.grammar_bitmask is not None and self._grammar_apply is not None:
            import torch

            # NOTE: a masked copy; logprobs stay those of the raw distribution.
            sample_from = last.copy()
            sub = np.ascontiguousarray(sample_from[job.grammar_samples])
            self._grammar_apply(torch.from_numpy(sub), job.grammar_bitmask)
            sample_from[job.grammar_samples] = sub
        mask_sample = step.section("mask_sample")
        ids = state.sample(
            sample_from,
            rows,
            step.section("sample_steps"),
            step.flags,
            mask_sample if len(mask_sample) else None,
            step.section("mask_tokens"),
            step.top_k_max,
            self.runner.threads,
        )
        logprobs = None
        if job.logprob_samples is not None:
            idx = job.logprob_samples
            logprobs = host_token_logprobs(last[idx], ids[idx], job.logprob_tops)
        # NOTE: last, so a step that raised left no token in the sampling state (it may run
        # again without some of its requests).
        state.record(rows, ids, step.flags)
        return StepOutput(ids, logprobs, prompt_logprobs)
