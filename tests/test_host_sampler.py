"""HostSamplingState (numpy, the CPU's host step worker) against SamplingState (torch) on the
same admitted rows, histories and logits: the same tokens for every parameter the sampler
takes, and the same logprobs."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from srt._native import BatchScheduler
from srt.layers.host_sampler import HostSamplingState, host_token_logprobs
from srt.layers.logprobs import token_logprobs
from srt.layers.sampler import SamplingState
from srt.managers.admission import Admission, Admitted
from srt.managers.host_requests import HostRequests
from srt.managers.io_struct import GenerateReq
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.step_input import StepInput
from srt.sampling_params import SamplingParams as SP

V = 300

CASES = {
    "greedy": [SP(temperature=0.0)] * 3,
    "temperature": [SP(temperature=0.7), SP(temperature=1.3), SP(temperature=1.0)],
    "top_k_p_min_p": [SP(top_k=5), SP(top_p=0.8, top_k=40), SP(min_p=0.05, temperature=0.9)],
    "mixed_greedy": [SP(temperature=0.0), SP(temperature=0.8, top_p=0.9), SP(top_k=1)],
    "penalties": [
        SP(frequency_penalty=0.7, presence_penalty=0.3),
        SP(temperature=0.0, frequency_penalty=1.5),
        SP(repetition_penalty=1.3, temperature=0.9),
    ],
    "greedy_penalties": [
        SP(temperature=0.0, repetition_penalty=1.2),
        SP(temperature=0.0, presence_penalty=1.0),
        SP(temperature=0.0, logit_bias={7: 5.0}),
    ],
    "logit_bias": [
        SP(logit_bias={3: 4.0, 11: -100.0}, temperature=0.8),
        SP(temperature=0.9),
        SP(logit_bias={5: 2.5}, top_k=20),
    ],
}


def admitted(params: list[SP]) -> tuple[StepInput, int, int]:
    """One planned step admitting a row per request, as the scheduler plans it."""
    n = len(params)
    core = BatchScheduler(pool_size=8192, max_running_requests=n)
    host = HostRequests("", V, set())
    admission = Admission(4096, V, 8192, set(), host, seed=0)
    for i, p in enumerate(params):
        p = msgspec.structs.replace(p, max_new_tokens=8, seed=100 + i)
        prompt = [1 + i, 7, 7, 20 + i]
        decision = admission.admit(GenerateReq(id=i + 1, input_ids=prompt, sampling_params=p))
        assert isinstance(decision, Admitted)
        core.add_request(**decision.core_args)
    native = core.schedule()
    return StepInput.from_native(native), native.flags, native.top_k_max


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_sampler_draws_the_torch_samplers_tokens(case: str) -> None:
    params = CASES[case]
    step, flags, top_k_max = admitted(params)
    n = len(params)
    torch_state = SamplingState(n + 1, V, "cpu")
    torch_state.admit(ForwardBatch.from_step(step, "cpu"))
    host_state = HostSamplingState(n + 1, V)
    host_state.admit(step)
    rows = step.section("sample_rows").copy()
    gen = np.random.default_rng(5)
    for t in range(6):
        # Each row's history grows as decode steps add to it.
        logits = (gen.standard_normal((n, V)) * 3).astype(np.float32)
        steps = np.full(n, t, dtype=np.int64)
        masks = (np.array([0, 2]), np.array([7, 11])) if t < 2 else (None, None)
        want = torch_state.sample(
            torch.from_numpy(logits),
            torch.from_numpy(rows),
            torch.from_numpy(steps),
            flags,
            None if masks[0] is None else torch.from_numpy(masks[0]),
            None if masks[1] is None else torch.from_numpy(masks[1]),
            top_k_max,
        ).numpy()
        got = host_state.sample(logits, rows, steps, flags, masks[0], masks[1], top_k_max, 2)
        np.testing.assert_array_equal(got, want, err_msg=f"{case} step {t}")
        torch_state.record(torch.from_numpy(rows), torch.from_numpy(want), flags)
        host_state.record(rows, got, flags)
    np.testing.assert_array_equal(host_state.last_token, torch_state.last_token.numpy())
    if torch_state.counts is not None:
        assert host_state.counts is not None
        np.testing.assert_array_equal(host_state.counts, torch_state.counts.numpy())


def test_host_logprobs_match_torch() -> None:
    gen = np.random.default_rng(1)
    logits = (gen.standard_normal((4, V)) * 4).astype(np.float32)
    logits[2, 10] = logits[2, 11] = 30.0  # a tie at the top: the lower id first
    targets = np.array([0, 5, 11, V - 1])
    tops = [0, 3, 2, 5]
    chosen, vals, ids = host_token_logprobs(logits, targets, tops)
    t_chosen, t_vals, t_ids = token_logprobs(
        torch.from_numpy(logits), torch.from_numpy(targets), tops
    )
    np.testing.assert_allclose(chosen, t_chosen, rtol=0, atol=1e-5)
    assert [len(v) for v in vals] == tops
    for v, tv in zip(vals, t_vals, strict=True):
        np.testing.assert_allclose(v, tv, rtol=0, atol=1e-5)
    assert ids[1] == t_ids[1] and ids[3] == t_ids[3]
    assert ids[2] == [10, 11]
    with pytest.raises(ValueError, match="differ in rows"):
        host_token_logprobs(logits, targets[:2], tops)
