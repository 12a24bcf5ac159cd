"""Grammar-constrained sampling in-process: check_grammar's client errors, a regex forcing the
output under sampling, and a grammar that conflicts with min_new_tokens ending as an abort."""

from __future__ import annotations

import re

import pytest
from test_scheduler import Harness
from transformers import AutoTokenizer

from srt.constrained.build import check_grammar
from srt.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "params, word",
    [
        ({"json_schema": "{"}, "not valid JSON"),
        ({"json_schema": '{"type": "nope"}'}, "invalid json_schema"),
        ({"regex": "(a"}, "invalid regex"),
    ],
)
def test_check_grammar_rejects(params: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word) as e:
        check_grammar(SamplingParams(**params))
    assert "/project/" not in str(e.value)  # no C++ source paths in client messages


def test_regex_forces_output_and_conflict_aborts(tiny_model_paths: dict) -> None:
    path = tiny_model_paths["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    h = Harness(path, max_total_tokens=2048)
    try:
        prompt = tok.encode("the cat")
        for i in range(3):
            h.submit(f"r{i}", prompt, max_new_tokens=20, temperature=1.5, seed=i, regex="[xyz]{4}!")
        h.submit("bad", prompt, max_new_tokens=20, min_new_tokens=10, regex="ab")
        h.run()
        for i in range(3):
            text = tok.decode(h.outputs[f"r{i}"], skip_special_tokens=True)
            assert re.fullmatch("[xyz]{4}!", text), text
            assert h.finished[f"r{i}"]["type"] == "stop"
        assert h.finished["bad"]["type"] == "abort"
        assert "min_new_tokens" in h.finished["bad"]["message"]
        h.assert_pool_returned()
    finally:
        h.close()
