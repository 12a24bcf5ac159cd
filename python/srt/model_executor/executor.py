"""Which runner and step worker a scheduler rank 0 gets, in the scheduler process.

- A single-rank CPU scheduler whose model has a native bundle (`native_bundle`): the
  `NativeRunner` and the `HostStepWorker`; torch is never imported.
- Else the torch `ModelRunner`; on a single-rank CPU with the `HostStepWorker` (numpy
  sampling, as above), on a GPU or with several ranks with the torch `StepWorker`. Where the
  native CPU step applies to the loaded model, its bundle is saved for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from srt.configs.model_config import ModelConfig
from srt.model_executor import native_bundle
from srt.model_executor.host_worker import HostStepWorker
from srt.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class Executor:
    # NativeRunner or ModelRunner: max_total_num_tokens, max_running_requests, dtype, device.
    runner: Any
    # HostStepWorker or StepWorker: submit(StepJob) -> PendingStep, close().
    worker: Any
    device: str  # "cpu", "cuda", "cuda:1", ...
    overlap: bool


def create_executor(
    model_config: ModelConfig,
    server_args: ServerArgs,
    grammar_apply: Callable[[Any, Any], None] | None,
) -> Executor:
    device = model_config.device
    cpu = device == "cpu"
    overlap = not server_args.disable_overlap_schedule and (
        not cpu or server_args.enable_overlap_on_cpu
    )
    vocab = model_config.vocab_size
    bundle_path = native_bundle.bundle_dir(server_args, device)
    bundle = native_bundle.load(bundle_path)
    if bundle is not None:
        from srt.model_executor.native_runner import NativeRunner

        try:
            runner: Any = NativeRunner(bundle, model_config, server_args)
        except (ValueError, KeyError, TypeError) as e:
            # NOTE: a bundle the decoder refuses (damaged on disk): the torch load rewrites it.
            logger.warning("native bundle %s refused (%s); loading through torch", bundle_path, e)
        else:
            worker = HostStepWorker(runner, vocab, overlap, grammar_apply)
            return Executor(runner, worker, "cpu", overlap)
    from srt.model_executor.model_runner import ModelRunner

    runner = ModelRunner(model_config, server_args)
    device = str(runner.device)
    if runner.parallel.world_size == 1 and runner.device.type == "cpu":
        worker: Any = HostStepWorker(runner, vocab, overlap, grammar_apply)
    else:
        from srt.model_executor.step_worker import StepWorker

        worker = StepWorker(runner, vocab, overlap, grammar_apply=grammar_apply)
    if bundle_path is not None and runner.cpu_step is not None:
        native_bundle.save(bundle_path, runner.cpu_step.step.spec, runner.native_meta())
    return Executor(runner, worker, device, overlap)
