"""SGLang's native /generate body as its clients send it (no model needed): the fields srt does
not implement are accepted at their null / default values and a 400 naming them otherwise;
SGLang's sampling-parameter spellings (nulls, sampling_seed, stop_regex)."""

from __future__ import annotations

from typing import Any

import pytest

from srt.entrypoints.native_request import GenerateRequest
from srt.entrypoints.openai.protocol import RequestError
from srt.sampling_params import SamplingParams

# What `sglang.bench_serving --backend sglang` sends (no LoRA, no routed experts).
BENCH_BODY: dict[str, Any] = {
    "text": "hello",
    "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True},
    "stream": True,
    "lora_path": None,
    "return_logprob": False,
    "return_routed_experts": False,
    "logprob_start_len": -1,
}

# What `sgl.gen` sends through RuntimeEndpoint: every SglSamplingParams key, unused ones empty.
FRONTEND_SAMPLING: dict[str, Any] = {
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "max_new_tokens": 16,
    "min_new_tokens": 0,
    "n": 1,
    "stop": [],
    "stop_token_ids": [],
    "stop_regex": [],
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "ignore_eos": False,
    "regex": None,
    "json_schema": None,
}


def test_bench_serving_body_is_accepted() -> None:
    [obj], batch = GenerateRequest.model_validate(BENCH_BODY).to_inputs()
    assert not batch and obj.text == "hello" and obj.stream and not obj.return_logprob
    assert obj.logprob_start_len == -1


def test_frontend_body_is_accepted() -> None:
    body = {
        "text": ["a", "b"],
        "sampling_params": FRONTEND_SAMPLING,
        "return_logprob": True,
        "return_text_in_logprobs": True,
        "logprob_start_len": 1,
        "top_logprobs_num": None,
        "lora_path": [None, None],
        "log_metrics": True,
        "custom_labels": {"team": "x"},
    }
    objs, batch = GenerateRequest.model_validate(body).to_inputs()
    assert batch and len(objs) == 2
    assert all(o.return_logprob and o.return_text_in_logprobs for o in objs)
    assert objs[0].top_logprobs_num == 0 and objs[0].logprob_start_len == 1
    sp = SamplingParams.from_dict(objs[0].sampling_params)
    assert sp.max_new_tokens == 16 and sp.stop_regex == [] and sp.regex is None


def test_nulls_mean_defaults() -> None:
    [obj], _ = GenerateRequest.model_validate(
        {"text": "x", "return_logprob": None, "cache_salt": None, "logprob_start_len": None}
    ).to_inputs()
    assert obj.return_logprob is False and obj.cache_salt == "" and obj.logprob_start_len == -1
    assert obj.return_text_in_logprobs  # srt's default: the text is there
    [obj], _ = GenerateRequest.model_validate(
        {"text": "x", "return_text_in_logprobs": False}
    ).to_inputs()
    assert obj.return_text_in_logprobs is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_path", "my-adapter"),
        ("lora_path", [None, "my-adapter"]),
        ("return_routed_experts", True),
        ("return_hidden_states", True),
        ("image_data", "http://x/cat.png"),
        ("data_parallel_rank", 1),
        ("routed_experts_start_len", 3),
        ("bogus", 1),
    ],
)
def test_unsupported_values_are_errors_naming_the_field(field: str, value: Any) -> None:
    body = {**BENCH_BODY, field: value}
    with pytest.raises(RequestError, match=field) as e:
        GenerateRequest.model_validate(body).to_inputs()
    assert e.value.status_code == 400 and e.value.param == field


def test_false_is_not_zero() -> None:
    # routed_experts_start_len's default is 0; a boolean is not that
    with pytest.raises(RequestError, match="routed_experts_start_len"):
        GenerateRequest.model_validate(
            {**BENCH_BODY, "routed_experts_start_len": False}
        ).to_inputs()


def test_sampling_seed_and_nulls() -> None:
    sp = SamplingParams.from_dict({"sampling_seed": 7, "temperature": None, "top_k": None})
    assert sp.seed == 7 and sp.temperature == 1.0 and sp.top_k == -1
    assert SamplingParams.from_dict({"seed": 7, "sampling_seed": 7}).seed == 7
    assert SamplingParams.from_dict({"max_new_tokens": None}).max_new_tokens is None
    with pytest.raises(ValueError, match="sampling_seed"):
        SamplingParams.from_dict({"seed": 1, "sampling_seed": 2})


@pytest.mark.parametrize(
    "params, name",
    [
        ({"beam_width": 4}, "beam_width"),
        ({"ebnf": "root ::= 'a'", "regex": "a"}, "ebnf"),
        ({"structural_tag": 5}, "structural_tag"),
        ({"custom_params": {"k": 1}}, "custom_params"),
        ({"stream_interval": 4}, "stream_interval"),
        ({"stop_regex": "("}, "stop_regex"),
        ({"stop_regex": "x*"}, "stop_regex"),
        ({"stop_regex": ["a"] * 17}, "stop_regex"),
        ({"bogus": 1}, "bogus"),
        # Types are strict, as on the OpenAI routes: no coercion of strings.
        ({"max_new_tokens": "8"}, "max_new_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"ignore_eos": "true"}, "ignore_eos"),
    ],
)
def test_bad_sampling_params_name_the_key(params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(params)


def test_unused_sglang_sampling_keys_pass() -> None:
    sp = SamplingParams.from_dict(
        {
            "beam_width": None,
            "ebnf": "",
            "structural_tag": None,
            "stream_interval": None,
            "stop_regex": r"\d+\.",
        }
    )
    assert sp.stop_regex == [r"\d+\."]
