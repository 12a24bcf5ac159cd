"""Tests of srt.layers.sampler: filters, penalties, seeded batch-invariant draws."""

from __future__ import annotations

import math

import pytest
import torch

from srt.layers.sampler import Sampler, SamplingBatchInfo, seeded_uniforms, splitmix64
from srt.sampling_params import SamplingParams as SP

sampler = Sampler()


def build(
    params: list[SP],
    vocab: int,
    *,
    seeds: list[int] | None = None,
    steps: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    stops: list[set[int]] | None = None,
) -> SamplingBatchInfo:
    n = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    return SamplingBatchInfo.build(
        params,
        seeds if seeds is not None else list(range(n)),
        steps if steps is not None else [len(o) for o in outputs],
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs,
        stops if stops is not None else [set() for _ in range(n)],
        vocab,
        "cpu",
    )


def draws(logits_row: torch.Tensor, p: SP, n: int, seed: int = 1234) -> torch.Tensor:
    """n draws from one distribution: one row per step, same seed."""
    logits = logits_row.expand(n, -1).contiguous()
    info = build([p] * n, logits.shape[1], seeds=[seed] * n, steps=list(range(n)))
    return sampler(logits, info)


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
    info = build([SP(temperature=0.0)] * 8, 1000)
    assert info.all_greedy
    assert torch.equal(sampler(logits, info), logits.argmax(-1))


def test_top_k_1_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 1000)
    info = build([SP(temperature=1.5, top_k=1)] * 8, 1000)
    assert torch.equal(sampler(logits, info), logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows() -> None:
    torch.manual_seed(2)
    V = 500
    logits = torch.randn(6, V) * 3
    params = [SP(temperature=0.0), SP(temperature=1.0), SP(top_k=1), SP(top_p=0.5)] + [
        SP(temperature=0.0),
        SP(min_p=0.3),
    ]
    seeds = [11, 12, 13, 14, 15, 16]
    out = sampler(logits, build(params, V, seeds=seeds))
    for i in (0, 2, 4):
        assert out[i] == logits[i].argmax()
    for i in (1, 3, 5):  # a sampled row draws as it would alone
        alone = sampler(logits[i : i + 1], build([params[i]], V, seeds=[seeds[i]]))
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
    for step in range(20):
        info = build(params, V, seeds=list(range(n)), steps=[step] * n)
        out = sampler(logits, info)
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
    for step in range(30):
        alone.append(int(sampler(mine[None], build([p], V, seeds=[42], steps=[step]))[0]))
        others = torch.randn(3, V)
        logits = torch.cat([others[:2], mine[None], others[2:]])
        params = others_params[:2] + [p] + others_params[2:]
        info = build(params, V, seeds=[1, 2, 42, 3], steps=[5, 0, step, 9], prompts=[[1, 2]] * 4)
        batched.append(int(sampler(logits, info)[2]))
        info = build(params[::-1], V, seeds=[3, 42, 2, 1], steps=[9, step, 0, 5])
        reversed_.append(int(sampler(logits.flip(0), info)[1]))
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
    info = build(params, V, prompts=prompts, outputs=outputs)
    assert info.penalty_rows is not None and info.penalty_rows.tolist() == [0, 2, 3]
    before = logits.clone()
    got = sampler.process_logits(logits, info)
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
    for step in range(10):
        out = sampler(logits, build(params, V, steps=[step, step]))
        assert out[0] == 7
        assert out[1] != top and out[1] == logits[1].sort(descending=True).indices[1]


def test_min_new_tokens_blocks_stop_ids_until_reached() -> None:
    V = 100
    eos, stop = 5, 9
    logits = torch.zeros(3, V)
    logits[:, eos] = 10.0
    logits[:, stop] = 9.0
    params = [SP(temperature=0.0, min_new_tokens=3), SP(min_new_tokens=3), SP(temperature=0.0)]
    stops = [{eos, stop}, {eos, stop}, {eos}]
    for step in range(5):
        outputs = [[1] * step] * 3
        out = sampler(logits, build(params, V, outputs=outputs, stops=stops)).tolist()
        if step < 3:
            assert out[0] not in (eos, stop) and out[1] not in (eos, stop)
        else:
            assert out[0] == eos
        assert out[2] == eos  # no min_new_tokens: EOS as usual


def test_plain_batch_takes_the_fast_path() -> None:
    info = build([SP(temperature=0.8), SP(temperature=0.0)], 100)
    assert not info.need_sort and not info.need_min_p and not info.all_greedy
    assert info.bias_flat is None and info.penalty_rows is None and info.min_tokens_flat is None
    logits = torch.randn(2, 100)
    assert sampler.process_logits(logits, info) is logits


def test_out_of_vocab_ids_are_dropped_and_shapes_checked() -> None:
    info = build([SP(logit_bias={150: 5.0}, min_new_tokens=2)], 100, stops=[{3, 100}])
    assert info.bias_flat is None
    assert info.min_tokens_flat is not None and info.min_tokens_flat.tolist() == [3]
    with pytest.raises(ValueError, match="vocab_size"):
        sampler(torch.randn(1, 99), info)


def test_filtered_mass_edge_never_draws_zero_probability() -> None:
    # u close to 1 must not run past the last kept token into filtered ones.
    V = 64
    row = torch.full((V,), -math.inf)
    row[[3, 10]] = 0.0
    info = build([SP(temperature=1.0)], V)
    info.uniforms = torch.tensor([1.0 - 2.0**-24])
    assert sampler(row[None], info).item() == 10
    info.uniforms = torch.tensor([0.0])
    assert sampler(row[None], info).item() == 3


def test_top_k_ties_keep_the_lowest_ids() -> None:
    # Equal logits at ids 2, 5, 8, 11: top_k=2 keeps the first two in vocabulary order.
    row = torch.full((16,), -5.0)
    row[[2, 5, 8, 11]] = 3.0
    out = draws(row, SP(top_k=2), 500)
    assert set(out.tolist()) == {2, 5}
