"""Tests of srt.layers.sampler: persistent per-row state, filters, penalties, seeded
batch-invariant draws. Rows are admitted the way the step worker admits them: a Rust
`BatchScheduler` plans the step (its admission sections carry each request's parameters) and
`SamplingState.admit` writes them; output history is replayed through `SamplingState.record`."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import pytest
import torch

from srt._native import (
    FLAG_GREEDY,
    FLAG_LOGIT_BIAS,
    FLAG_OUTPUT_PENALTY,
    FLAG_REPETITION_PENALTY,
    FLAG_SAMPLED,
    BatchScheduler,
)
from srt.layers.sampler import SamplingState, _inverse_cdf, seeded_uniforms, splitmix64
from srt.managers.admission import Admission, Admitted
from srt.managers.host_requests import HostRequests
from srt.managers.io_struct import GenerateReq
from srt.model_executor.forward_batch import ForwardBatch
from srt.model_executor.step_input import StepInput
from srt.sampling_params import SamplingParams as SP


@dataclass
class Batch:
    state: SamplingState
    rows: torch.Tensor
    flags: int
    top_k_max: int

    def sample(
        self,
        logits: torch.Tensor,
        steps: list[int] | None = None,
        masks: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> torch.Tensor:
        n = logits.shape[0]
        s = torch.tensor(steps if steps is not None else [0] * n)
        ms = torch.tensor([m[0] for m in masks], dtype=torch.int64)
        mt = torch.tensor([m[1] for m in masks], dtype=torch.int64)
        return self.state.sample(
            logits, self.rows, s, self.flags, ms if masks else None, mt, self.top_k_max
        )


def build(
    params: list[SP],
    vocab: int,
    *,
    seeds: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> Batch:
    """Admits one row per request the way the scheduler does (Admission's arguments for the
    Rust record, one planned step), then replays its outputs."""
    n = len(params)
    core = BatchScheduler(pool_size=8192, max_running_requests=n)
    host = HostRequests("", vocab, set())
    admission = Admission(4096, vocab, 8192, set(), host, seed=0)
    for i, p in enumerate(params):
        p = msgspec.structs.replace(p, max_new_tokens=4, seed=seeds[i] if seeds else i)
        prompt = (prompts[i] if prompts else None) or [1]
        decision = admission.admit(GenerateReq(id=i + 1, input_ids=prompt, sampling_params=p))
        assert isinstance(decision, Admitted)
        core.add_request(**decision.core_args)
    native = core.schedule()
    step = StepInput.from_native(native)
    state = SamplingState(n + 1, vocab, "cpu")
    state.admit(ForwardBatch.from_step(step, "cpu"))
    rows = torch.from_numpy(step.section("sample_rows").copy())
    for i, out in enumerate(outputs or []):
        for tok in out:
            state.record(rows[i : i + 1], torch.tensor([tok]), native.flags)
    return Batch(state, rows, native.flags, native.top_k_max)


def draws(logits_row: torch.Tensor, p: SP, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws of one request from one distribution: its row n times, steps 0..n-1."""
    logits = logits_row.expand(n, -1).contiguous()
    batch = build([p], logits.shape[1], seeds=[seed])
    batch.rows = batch.rows.expand(n).contiguous()
    return batch.sample(logits, list(range(n)))


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ---- the hash ---------------------------------------------------------------------------------

M64 = (1 << 64) - 1


def splitmix64_ref(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def to_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def test_splitmix64_matches_reference() -> None:
    xs = [0, 1, 2, 12345, 2**62, 2**63 - 1, 0x9E3779B97F4A7C15, 2**64 - 1]
    got = splitmix64(torch.tensor([to_signed(x) for x in xs], dtype=torch.int64)).tolist()
    assert got == [to_signed(splitmix64_ref(x)) for x in xs]


def test_uniforms_in_unit_interval_and_spread() -> None:
    seeds = torch.tensor([7] * 10000)
    u = seeded_uniforms(seeds, torch.arange(10000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    # A pure function of (seed, step).
    assert torch.equal(u[:5], seeded_uniforms(seeds[:5], torch.arange(5)))


# ---- greedy -----------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 1000)
    logits[0, 10] = logits[0, 20] = 100.0  # ties: the first maximum, as argmax
    batch = build([SP(temperature=0.0)] * 8, 1000)
    assert batch.flags == FLAG_GREEDY
    assert torch.equal(batch.sample(logits), logits.argmax(-1))


def test_top_k_1_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 1000)
    batch = build([SP(temperature=1.5, top_k=1)] * 8, 1000)
    assert not batch.flags & FLAG_SAMPLED
    assert torch.equal(batch.sample(logits), logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows() -> None:
    torch.manual_seed(2)
    V = 500
    logits = torch.randn(6, V) * 3
    params = [SP(temperature=0.0), SP(temperature=1.0), SP(top_k=1), SP(top_p=0.5)] + [
        SP(temperature=0.0),
        SP(min_p=0.3),
    ]
    seeds = [11, 12, 13, 14, 15, 16]
    out = build(params, V, seeds=seeds).sample(logits)
    for i in (0, 2, 4):
        assert out[i] == logits[i].argmax()
    for i in (1, 3, 5):  # a sampled row draws as it would alone
        alone = build([params[i]], V, seeds=[seeds[i]]).sample(logits[i : i + 1])
        assert out[i] == alone[0]
    # The sampled rows really sample: over many steps they leave the argmax.
    many = draws(logits[1], SP(temperature=1.0), 200)
    assert (many != logits[1].argmax()).any()


# ---- filters ----------------------------------------------------------------------------------


def test_top_k_never_picks_outside_and_uses_all_k() -> None:
    torch.manual_seed(3)
    row = torch.randn(200)
    k = 5
    out = draws(row, SP(temperature=1.0, top_k=k), 3000)
    allowed = set(row.topk(k).indices.tolist())
    assert set(out.tolist()) == allowed


def test_top_p_keeps_the_smallest_prefix_within_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    row = probs.log()[torch.tensor([3, 0, 5, 1, 4, 2])]  # shuffled: ids 1 and 3 hold the mass
    out = draws(row, SP(temperature=1.0, top_p=0.75), 4000)
    assert set(out.tolist()) == {1, 3}
    # Renormalized: 0.5 / 0.8 and 0.3 / 0.8.
    assert abs(float((out == 1).double().mean()) - 0.625) < 0.03


def test_top_p_applies_to_top_k_renormalized() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 leaves [0.444, 0.333, 0.222]; with top_p=0.75 the mass before id 2 is
    # 0.778 > 0.75, so only ids 0 and 1 stay. Without renormalization it would be 0.7 and
    # id 2 would stay too.
    out = draws(probs.log(), SP(top_k=3, top_p=0.75), 2000)
    assert set(out.tolist()) == {0, 1}


def test_min_p_never_picks_below_threshold() -> None:
    torch.manual_seed(4)
    row = torch.randn(300) * 2
    p = torch.softmax(row, -1)
    out = draws(row, SP(temperature=1.0, min_p=0.1), 3000)
    allowed = set(torch.nonzero(p >= 0.1 * p.max()).flatten().tolist())
    assert set(out.tolist()) <= allowed
    assert len(set(out.tolist())) > 1


def test_all_filters_together_on_many_rows() -> None:
    torch.manual_seed(5)
    V, n = 400, 64
    logits = torch.randn(n, V) * 2
    gen = torch.Generator().manual_seed(5)
    params = [
        SP(
            temperature=float(torch.rand(1, generator=gen)) * 2 + 0.1,
            top_k=int(torch.randint(2, 50, (1,), generator=gen)),
            top_p=float(torch.rand(1, generator=gen)) * 0.9 + 0.1,
            min_p=float(torch.rand(1, generator=gen)) * 0.3,
        )
        for _ in range(n)
    ]
    batch = build(params, V, seeds=list(range(n)))
    for step in range(20):
        out = batch.sample(logits, [step] * n)
        for i, p in enumerate(params):
            probs = torch.softmax(logits[i] / p.temperature, -1)
            sp, order = probs.sort(descending=True, stable=True)
            sp = sp[: p.top_k] / sp[: p.top_k].sum()
            before = sp.cumsum(0) - sp
            keep = (before <= p.top_p) & (sp >= p.min_p * sp[0])
            assert int(out[i]) in set(order[: p.top_k][keep].tolist())


def test_temperature_frequencies_match_softmax() -> None:
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, 0.3])
    t = 0.7
    out = draws(row, SP(temperature=t), 20000)
    # 9 degrees of freedom: p = 0.001 at 27.9. Deterministic with the fixed seed.
    assert chi_square(out, torch.softmax(row / t, -1)) < 30.0
    # The test can fail: the same draws are far from the untempered distribution.
    assert chi_square(out, torch.softmax(row, -1)) > 100.0


# ---- seeds and batch invariance -------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(6)
    V = 1000
    mine = torch.randn(V)
    p = SP(temperature=0.9)
    others_params = [SP(top_k=20), SP(temperature=0.0), SP(repetition_penalty=1.5, top_p=0.8)]
    alone, batched, reversed_ = [], [], []
    params = others_params[:2] + [p] + others_params[2:]
    single = build([p], V, seeds=[42])
    mixed = build(params, V, seeds=[1, 2, 42, 3], prompts=[[1, 2]] * 4)
    backwards = build(params[::-1], V, seeds=[3, 42, 2, 1])
    for step in range(30):
        alone.append(int(single.sample(mine[None], [step])[0]))
        others = torch.randn(3, V)
        logits = torch.cat([others[:2], mine[None], others[2:]])
        batched.append(int(mixed.sample(logits, [5, 0, step, 9])[2]))
        reversed_.append(int(backwards.sample(logits.flip(0), [9, step, 0, 5])[1]))
    assert alone == batched == reversed_
    assert len(set(alone)) > 5  # really sampled


def test_different_seeds_differ() -> None:
    V = 1000
    row = torch.zeros(V)  # uniform: two seeds agreeing on 30 steps is ~1e-90
    a = draws(row, SP(), 30, seed=1)
    b = draws(row, SP(), 30, seed=2)
    assert not torch.equal(a, b)
    assert torch.equal(a, draws(row, SP(), 30, seed=1))


# ---- logit processors -------------------------------------------------------------------------


def reference_penalties(
    logits: torch.Tensor, p: SP, prompt: list[int], output: list[int]
) -> torch.Tensor:
    x = logits.clone().tolist()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return torch.tensor(x)


def test_penalties_match_reference() -> None:
    torch.manual_seed(7)
    V = 50
    logits = torch.randn(4, V) * 3
    params = [
        SP(repetition_penalty=1.7),
        SP(),  # no penalty: untouched, and skipped by the penalty rows
        SP(frequency_penalty=0.8, presence_penalty=-0.4),
        SP(repetition_penalty=0.6, frequency_penalty=-1.2, presence_penalty=1.1),
    ]
    prompts = [[1, 2, 3, 3], [4], [5, 6], [7, 8, 9, 10]]
    outputs = [[3, 11, 11], [4, 4], [5, 12, 12, 12, 13], [8, 8, 20, 21, 8]]
    batch = build(params, V, prompts=prompts, outputs=outputs)
    assert batch.flags & FLAG_REPETITION_PENALTY and batch.flags & FLAG_OUTPUT_PENALTY
    before = logits.clone()
    got = batch.state.process_logits(logits, batch.rows, batch.flags)
    assert torch.equal(logits, before), "the caller's logits must not change"
    for i, p in enumerate(params):
        want = reference_penalties(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(got[i], want)
    assert not torch.equal(got[0], logits[0]) and not torch.equal(got[2], logits[2])


def test_logit_bias_forces_and_forbids() -> None:
    torch.manual_seed(8)
    V = 300
    logits = torch.randn(2, V)
    top = int(logits[1].argmax())
    params = [
        SP(temperature=1.0, logit_bias={7: 100.0}),
        SP(temperature=0.0, logit_bias={top: -100.0}),
    ]
    batch = build(params, V)
    assert batch.flags & FLAG_LOGIT_BIAS
    for step in range(10):
        out = batch.sample(logits, [step, step])
        assert out[0] == 7
        assert out[1] != top and out[1] == logits[1].sort(descending=True).indices[1]


def test_min_new_tokens_masks_block_stop_ids() -> None:
    """The planner sends (sample, token) masks while a row's output is shorter than its
    min_new_tokens (srt-core tests when); the sampler never draws a masked token."""
    V = 100
    eos, stop = 5, 9
    logits = torch.zeros(3, V)
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    batch = build([SP(temperature=0.0), SP(), SP(temperature=0.0)], V)
    masks = [(0, eos), (0, stop), (1, eos), (1, stop)]
    for step in range(5):
        out = batch.sample(logits, [step] * 3, masks).tolist()
        assert out[0] not in (eos, stop) and out[1] not in (eos, stop)
        assert out[2] == eos  # no mask: EOS as usual
    assert batch.sample(logits).tolist()[0] == eos


def test_plain_batch_takes_the_fast_path() -> None:
    batch = build([SP(temperature=0.8), SP(temperature=0.0)], 100)
    assert batch.flags == FLAG_SAMPLED | FLAG_GREEDY and batch.top_k_max == 0
    assert batch.state.counts is None and batch.state.bias is None and batch.state.seen is None
    logits = torch.randn(2, 100)
    assert batch.state.process_logits(logits, batch.rows, batch.flags) is logits
    with pytest.raises(ValueError, match="vocabulary size"):
        batch.sample(torch.randn(2, 99))


def test_a_readmitted_row_forgets_its_previous_owner() -> None:
    """Row state is overwritten at admission: a new request in a row that held a penalized,
    biased request samples as if the row were fresh."""
    V = 50
    torch.manual_seed(9)
    logits = torch.randn(1, V)
    old = build([SP(frequency_penalty=2.0, logit_bias={3: 50.0})], V, outputs=[[1, 1, 2]])
    fresh = build([SP(temperature=0.0)], V)
    # Admit the fresh request into the old one's row (row 0 of the same state).
    core = BatchScheduler(pool_size=64, max_running_requests=1)
    core.add_request(1, [1], 4)
    step = StepInput.from_native(core.schedule())
    old.state.admit(ForwardBatch.from_step(step, "cpu"))
    got = old.state.sample(logits, old.rows, torch.zeros(1, dtype=torch.int64), FLAG_GREEDY)
    assert torch.equal(got, fresh.sample(logits))
    # Even in a step whose other rows have a bias, this row has none.
    assert torch.equal(
        old.state.process_logits(logits, old.rows, FLAG_LOGIT_BIAS | FLAG_OUTPUT_PENALTY),
        logits,
    )


def test_filtered_mass_edge_never_draws_zero_probability() -> None:
    # u close to 1 must not run past the last kept token into filtered ones.
    V = 64
    probs = torch.zeros(1, V)
    probs[0, [3, 10]] = 0.5
    assert _inverse_cdf(probs, torch.tensor([1.0 - 2.0**-24])).item() == 10
    assert _inverse_cdf(probs, torch.tensor([0.0])).item() == 3


def test_top_k_ties_keep_the_lowest_ids() -> None:
    # Equal logits at ids 2, 5, 8, 11: top_k=2 keeps the first two in vocabulary order.
    row = torch.full((16,), -5.0)
    row[[2, 5, 8, 11]] = 3.0
    out = draws(row, SP(top_k=2), 500)
    assert set(out.tolist()) == {2, 5}
    # top_p cutting inside a run of ties: 3 of 4 equal tokens reach p = 0.6.
    out = draws(row, SP(top_p=0.6), 500)
    assert set(out.tolist()) == {2, 5, 8}


def test_filters_match_a_sorting_reference_on_random_rows() -> None:
    """The value-threshold filter keeps exactly the prefix a stable sort would keep, rows of
    every kind mixed (top-k only, top-p only, both, neither, greedy), ties included."""
    gen = torch.Generator().manual_seed(10)
    V, n = 97, 48
    logits = torch.randn(n, V, generator=gen)
    logits[::3] = logits[::3].round()  # many exact ties
    kinds = [
        SP(top_k=int(torch.randint(2, 40, (1,), generator=gen)))
        if i % 4 == 0
        else SP(top_p=float(torch.rand(1, generator=gen)) * 0.9 + 0.05)
        if i % 4 == 1
        else SP(top_k=10, top_p=0.5)
        if i % 4 == 2
        else SP()
        for i in range(n)
    ]
    kinds[-1] = SP(temperature=0.0)
    batch = build(kinds, V)
    for step in range(30):
        out = batch.sample(logits, [step] * n)
        for i, p in enumerate(kinds):
            if p.is_greedy:
                assert out[i] == logits[i].argmax()
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1)
            sp, order = probs.sort(descending=True, stable=True)
            k = p.top_k if p.top_k > 0 else V
            sp = sp[:k]
            cum = sp.cumsum(0)
            keep = (cum - sp) <= p.top_p * cum[-1]
            assert int(out[i]) in set(order[:k][keep].tolist()), (i, p)


def test_cpu_value_sort_matches_torch() -> None:
    from srt.layers.sampler import _sorted_values

    probs = torch.softmax(torch.randn(5, 33), -1)
    asc, top = _sorted_values(probs, 7)
    assert torch.equal(asc, probs.sort(-1).values)
    assert torch.equal(top, probs.sort(-1, descending=True).values[:, :7])
    assert np.shares_memory(asc.numpy(), asc.numpy())
