"""Logprobs in-process (scheduler + ModelRunner): output and prompt logprobs against HF
transformers' log_softmax, greedy top-1 = chosen token, rescoring reproduces generation, and
prompt logprobs survive chunked prefill and a warm prefix cache."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_scheduler import Harness

from srt.managers.io_struct import LogprobDelta


def submit(h: Harness, rid: str, ids: list[int], start: int = -1, top: int = 0, **sp: object):
    fields = {"return_logprob": True, "top_logprobs_num": top, "logprob_start_len": start}
    h.submit(rid, ids, fields, **sp)


def run(h: Harness) -> tuple[dict[str, list[int]], dict[str, LogprobDelta]]:
    h.run()
    return h.outputs, h.logprobs


@pytest.fixture(scope="module")
def hf_llama(tiny_model_paths: dict) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_paths["llama"]).eval()


def hf_logprobs(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("overlap", [True, False])
def test_logprobs_match_hf_and_rescoring(overlap: bool, tiny_model_paths: dict, hf_llama) -> None:
    h = Harness(tiny_model_paths["llama"], overlap, max_total_tokens=2048, chunked_prefill_size=8)
    try:
        prompt = [5 + (i * 37) % 400 for i in range(21)]
        # Warm the prefix cache with the same prompt: the logprob request must not reuse it.
        h.submit("warm", prompt, max_new_tokens=2, temperature=0.0, ignore_eos=True)
        h.run()
        # Sampled (temperature 1.5, top_k): logprobs are still the raw model distribution.
        submit(h, "g", prompt, start=3, top=4, max_new_tokens=6, temperature=0.0, ignore_eos=True)
        submit(h, "s", prompt, top=2, max_new_tokens=6, temperature=1.5, top_k=5, seed=7)
        outs, lps = run(h)
        out = outs["g"]
        lp = lps["g"]
        assert lp.output_ids == out and len(lp.output_logprobs) == 6
        # greedy: the chosen token is the top-1 alternative
        for tok, top_ids, top_v, v in zip(
            out, lp.output_top_ids, lp.output_top_logprobs, lp.output_logprobs, strict=True
        ):
            assert top_ids[0] == tok and len(top_ids) == 4
            assert top_v[0] == pytest.approx(v) and top_v == sorted(top_v, reverse=True)
        ref = hf_logprobs(hf_llama, prompt + out)
        n = len(prompt)
        want_out = [float(ref[n - 1 + j, t]) for j, t in enumerate(out)]
        assert lp.output_logprobs == pytest.approx(want_out, abs=1e-4)
        # prompt logprobs from position 3 (through 3 chunks of 8)
        assert lp.input_ids == prompt[3:]
        want_in = [float(ref[j - 1, prompt[j]]) for j in range(3, n)]
        assert lp.input_logprobs == pytest.approx(want_in, abs=1e-4)
        assert len(lp.input_top_ids) == n - 3
        assert lp.input_top_ids[0] == ref[2].topk(4).indices.tolist()
        s_out, s_lp = outs["s"], lps["s"]
        ref_s = hf_logprobs(hf_llama, prompt + s_out)
        want_s = [float(ref_s[n - 1 + j, t]) for j, t in enumerate(s_out)]
        assert s_lp.output_logprobs == pytest.approx(want_s, abs=1e-4)
        assert s_lp.input_logprobs == []

        # Scoring prompt + output (max_new_tokens=0) reproduces the generation's logprobs.
        submit(h, "score", prompt + out, start=0, max_new_tokens=0)
        outs2, lps2 = run(h)
        assert outs2.get("score", []) == []
        sc = lps2["score"]
        assert sc.input_logprobs[0] is None and sc.input_ids == prompt + out
        assert sc.input_logprobs[n:] == pytest.approx(lp.output_logprobs, abs=1e-4)
        assert sc.output_logprobs == []
    finally:
        h.close()
