"""What a step worker takes and gives: `StepJob` in, a `PendingStep` whose `result()` is the
step's `StepOutput`. Shared by the torch step worker (step_worker.py) and the host one of single-rank CPU schedulers
(host_worker.py); importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srt.model_executor.step_input import StepInput

# (logprob of each target, top values, top ids) per row, as lists.
Logprobs = tuple[list[float], list[list[float]], list[list[int]]]


@dataclass
class StepJob:
    step: StepInput
    # Sample indices (into the step's S sampling rows) whose grammar masks their logits, and
    # the host bitmask rows for them (xgrammar's int32 layout).
    grammar_samples: np.ndarray | None = None
    grammar_bitmask: Any = None  # torch.Tensor (the grammar backend's layout)
    # Sample indices whose output logprobs are wanted, with their top-k counts.
    logprob_samples: np.ndarray | None = None
    logprob_tops: list[int] = field(default_factory=list)
    # Prompt logprobs: the target token of each extra logit row, with its top-k count.
    prompt_targets: np.ndarray | None = None
    prompt_tops: list[int] = field(default_factory=list)
    # Test-only fault injection: the step raises this message inside the worker.
    fail: str | None = None


@dataclass
class StepOutput:
    ids: np.ndarray  # [S] int64, the sampled token of each sampling row
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None


class PendingStep:
    """A submitted step; `result()` waits for it (and raises what the step raised). The
    worker's raw result (from `future`, or `done` when the step ran inline) becomes the
    StepOutput through `finish`."""

    def __init__(
        self,
        future: Future | None = None,
        done: Any = None,
        error: Exception | None = None,
        finish: Callable[[Any], StepOutput] | None = None,
    ) -> None:
        self._future = future
        self._done = done
        self._error = error
        self._finish = finish

    def result(self) -> StepOutput:
        if self._error is not None:
            raise self._error
        done = self._future.result() if self._future is not None else self._done
        return done if self._finish is None else self._finish(done)


def submit(
    executor: Any, run: Callable[[StepJob], Any], job: StepJob, finish: Any = None
) -> PendingStep:
    """`run(job)` on `executor` (a one-thread pool: overlap), or inline when it is None."""
    if executor is not None:
        return PendingStep(future=executor.submit(run, job), finish=finish)
    try:
        return PendingStep(done=run(job), finish=finish)
    except Exception as e:  # raised by result(), as from the worker thread
        return PendingStep(error=e)


class RankFailure(RuntimeError):
    """A step of a multi-rank replica failed: the ranks are out of step, the replica is lost."""
