"""OpenAI protocol layer: request validation, the mapping to SamplingParams, error bodies, SSE
framing, and the HTTP error paths (no model needed: they fail before any generation)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from srt.entrypoints.http_server import create_app
from srt.entrypoints.openai.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionStreamResponse,
    DeltaMessage,
    RequestError,
    UsageInfo,
    error_body,
    openai_finish_reason,
    sse_event,
)
from srt.server_args import ServerArgs

MSGS = [{"role": "user", "content": "hi"}]


def test_completion_fields_map_to_sampling_params() -> None:
    req = CompletionRequest(
        prompt="x",
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=3,
        frequency_penalty=0.1,
        presence_penalty=-0.2,
        logit_bias={"5": 1.5},
        n=2,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        min_tokens=2,
        stop_token_ids=[1, 2],
        ignore_eos=True,
        skip_special_tokens=False,
        no_stop_trim=True,
    )
    sp = req.sampling_params(req.max_tokens)
    assert sp.max_new_tokens == 7 and sp.min_new_tokens == 2
    assert sp.temperature == 0.5 and sp.top_p == 0.9 and sp.top_k == 20 and sp.min_p == 0.05
    assert sp.stop == ["END"] and sp.stop_token_ids == [1, 2]
    assert sp.seed == 3 and sp.n == 2
    assert sp.frequency_penalty == 0.1 and sp.presence_penalty == -0.2
    assert sp.repetition_penalty == 1.1
    assert sp.logit_bias == {5: 1.5}
    assert sp.ignore_eos and not sp.skip_special_tokens and sp.no_stop_trim


def test_unset_fields_keep_sampling_defaults() -> None:
    sp = CompletionRequest(prompt="x").sampling_params(16)
    assert sp.max_new_tokens == 16
    assert sp.temperature == 1.0 and sp.top_p == 1.0 and sp.top_k == -1
    assert sp.stop == [] and sp.seed is None and sp.logit_bias is None


def test_completion_default_max_tokens_is_openais_16() -> None:
    assert CompletionRequest(prompt="x").max_tokens == 16


def test_chat_max_completion_tokens_wins_and_none_means_until_context() -> None:
    assert ChatCompletionRequest(messages=MSGS).max_new_tokens() is None
    assert ChatCompletionRequest(messages=MSGS, max_tokens=5).max_new_tokens() == 5
    req = ChatCompletionRequest(messages=MSGS, max_tokens=5, max_completion_tokens=9)
    assert req.max_new_tokens() == 9


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -5),
        ("frequency_penalty", 3.0),
        ("n", 0),
        ("stop", [""]),
        ("logit_bias", {"tok": 1.0}),
        ("logit_bias", {"3": 500.0}),
        ("seed", -1),
        ("min_tokens", 99),
    ],
)
def test_invalid_sampling_values_raise_value_error(field: str, value: Any) -> None:
    req = CompletionRequest(prompt="x", max_tokens=16, **{field: value})
    with pytest.raises(ValueError):
        req.sampling_params(req.max_tokens)


def test_unknown_fields_are_ignored_and_reported() -> None:
    req = CompletionRequest(prompt="x", foo=1, stream=True, stream_options={"bar": 2})
    req.check_supported()
    assert req.ignored_fields() == ["foo", "stream_options.bar"]
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x", "bogus": 1}], top_a=0.5)
    chat.check_supported()
    assert chat.ignored_fields() == ["top_a", "messages[0].bogus"]
    assert "foo" not in json.dumps(req.sampling_params(4).__struct_fields__)


@pytest.mark.parametrize(
    "body",
    [
        {"stream": "yes"},
        {"stream": 1},
        {"n": "2"},
        {"temperature": "0.5"},
        {"max_tokens": 2.5},
        {"stop": 5},
        {"stream_options": {"include_usage": "true"}},
    ],
)
def test_wrong_types_are_rejected(body: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **body)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=MSGS, **body)


def test_wrong_message_types_are_rejected() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": 5}])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=MSGS, reasoning_effort="extreme")


@pytest.mark.parametrize(
    "extra",
    [
        {"use_beam_search": True},
        {"length_penalty": 0.5},
        {"prompt_logprobs": 1},
        {"bad_words": ["x"]},
        {"allowed_token_ids": [1, 2]},
        {"lora_path": "adapter"},
        {"return_hidden_states": True},
        {"truncate_prompt_tokens": 8},
    ],
)
def test_output_changing_extensions_are_400_naming_them(extra: dict) -> None:
    [name] = extra
    for req in (
        CompletionRequest(prompt="x", **extra),
        ChatCompletionRequest(messages=MSGS, **extra),
    ):
        with pytest.raises(RequestError) as e:
            req.check_supported()
        assert e.value.status_code == 400 and e.value.param == name and name in e.value.message


def test_output_changing_extensions_at_their_defaults_pass() -> None:
    defaults = {"use_beam_search": False, "length_penalty": 1, "prompt_logprobs": None}
    req = ChatCompletionRequest(messages=MSGS, lora_path=None, **defaults)
    req.check_supported()
    assert req.ignored_fields() == []


def test_continuous_usage_stats_is_400() -> None:
    req = CompletionRequest(
        prompt="x", stream=True, stream_options={"continuous_usage_stats": True}
    )
    with pytest.raises(RequestError) as e:
        req.check_supported()
    assert e.value.param == "stream_options"


def test_chat_template_options() -> None:
    req = ChatCompletionRequest(
        messages=MSGS,
        chat_template_kwargs={"enable_thinking": False},
        reasoning_effort="low",
    )
    req.check_supported()
    assert req.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "low"}
    cont = [*MSGS, {"role": "assistant", "content": "Hello"}]
    ok = ChatCompletionRequest(
        messages=cont, add_generation_prompt=False, continue_final_message=True, echo=True
    )
    ok.check_supported()
    dicts = [m.to_template_dict(i) for i, m in enumerate(ok.messages)]
    assert ok.echo_prefix(dicts) == "Hello"
    assert ChatCompletionRequest(messages=MSGS, echo=True).echo_prefix(MSGS) == ""


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"continue_final_message": True}, "continue_final_message"),
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_bad_chat_template_options_are_400(kwargs: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        ChatCompletionRequest(messages=MSGS, **kwargs).check_supported()
    assert e.value.status_code == 400 and e.value.param == param


def test_vllm_stop_aliases_map_to_sampling_params() -> None:
    sp = CompletionRequest(
        prompt="x", include_stop_str_in_output=True, stop_regex=r"\d+"
    ).sampling_params(4)
    assert sp.no_stop_trim and sp.stop_regex == [r"\d+"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"echo": True, "stream": True}, "echo"),
        ({"suffix": "s"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "s", "foo": 1}, "suffix"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_completion_features_are_400(kwargs: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        CompletionRequest(prompt="x", **kwargs).check_supported()
    assert e.value.status_code == 400 and e.value.param == param


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"audio": {"voice": "x"}}, "audio"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_unsupported_chat_features_are_400(kwargs: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        req = ChatCompletionRequest(messages=MSGS, **kwargs)
        req.check_supported()
        req.sampling_params(None)
    assert e.value.param == param


def test_supported_chat_options_pass() -> None:
    ChatCompletionRequest(
        messages=MSGS,
        logprobs=False,
        tool_choice="none",
        response_format={"type": "text"},
        stream=True,
        stream_options={"include_usage": True},
        user="u",
    ).check_supported()


def test_prompt_shapes() -> None:
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(RequestError):
        CompletionRequest(prompt=[]).prompts()


def test_chat_messages_to_template_dicts() -> None:
    req = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    dicts = [m.to_template_dict(i) for i, m in enumerate(req.messages)]
    assert dicts == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    img = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    )
    with pytest.raises(RequestError, match="image_url"):
        img.messages[0].to_template_dict(0)
    tool = ChatCompletionRequest(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert tool.messages[0].to_template_dict(0) == {
        "role": "tool",
        "content": "x",
        "tool_call_id": "1",
    }
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    asks = ChatCompletionRequest(messages=[{"role": "user", "content": "x", "tool_calls": calls}])
    with pytest.raises(RequestError, match="only assistant messages carry tool_calls"):
        asks.messages[0].to_template_dict(0)


def test_error_body_shape() -> None:
    body = error_body("bad", param="temperature")
    assert body == {
        "object": "error",
        "message": "bad",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": None,
    }


def test_sse_framing() -> None:
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
    usage = UsageInfo.of(3, 4, cached=1)
    ev = sse_event(CompletionStreamResponse(id="c", model="m", choices=[], usage=usage))
    assert ev.startswith("data: ") and ev.endswith("\n\n")
    d = json.loads(ev[len("data: ") :])
    assert d["choices"] == [] and d["usage"]["total_tokens"] == 7
    assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 1


def test_chat_chunk_serialization_drops_empty_delta_fields_and_null_usage() -> None:
    chunk = ChatCompletionStreamResponse(
        id="c",
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="hi"))],
    )
    d = json.loads(chunk.model_dump_json())
    assert d["object"] == "chat.completion.chunk"
    assert d["choices"][0]["delta"] == {"content": "hi"}
    assert d["choices"][0]["finish_reason"] is None
    assert "usage" not in d
    first = DeltaMessage(role="assistant", content="")
    assert json.loads(first.model_dump_json()) == {"role": "assistant", "content": ""}


def test_finish_reason_mapping() -> None:
    assert openai_finish_reason(None) == (None, None)
    assert openai_finish_reason({"type": "length", "length": 5}) == ("length", None)
    assert openai_finish_reason({"type": "stop", "matched": 2}) == ("stop", 2)
    assert openai_finish_reason({"type": "stop", "matched": "END"}) == ("stop", "END")
    assert openai_finish_reason({"type": "abort", "message": "x"}) == ("abort", None)


class _FakeTM:
    """Enough of a TokenizerManager for requests that fail before tokenization."""

    served_model_name = "tiny"
    model_path = "/models/tiny"
    context_len = 128
    dead_reason: str | None = None
    tokenizer = None  # the chat template is never reached
    server_args = ServerArgs()  # defaults: no API key, no metrics

    def start(self) -> None:
        pass


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(create_app(_FakeTM())) as c:  # type: ignore[arg-type]
        yield c


def _assert_error(resp: Any, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error"
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["message"]
    return body


def test_http_malformed_json_is_400(client: TestClient) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        body = _assert_error(client.post(path, content=b'{"prompt": '), 400)
        assert "JSON" in body["message"]


def test_http_schema_errors_are_400_not_422(client: TestClient) -> None:
    _assert_error(client.post("/v1/completions", json={"model": "tiny"}), 400)
    _assert_error(client.post("/v1/completions", json=[1, 2]), 400)
    body = _assert_error(client.post("/v1/chat/completions", json={"messages": "hi"}), 400)
    assert "messages" in body["message"]
    _assert_error(client.post("/generate", json={"text": "x", "bogus": 1}), 400)


def test_http_bad_sampling_params_are_400(client: TestClient) -> None:
    body = _assert_error(
        client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400
    )
    assert "temperature" in body["message"]
    _assert_error(client.post("/v1/chat/completions", json={"messages": MSGS, "tools": [{}]}), 400)
    _assert_error(client.post("/generate", json={"text": "x", "input_ids": [1]}), 400)
    _assert_error(client.post("/generate", json={"text": ["a", "b"], "sampling_params": [{}]}), 400)


def test_http_retrieving_another_model_is_404(client: TestClient) -> None:
    body = _assert_error(client.get("/v1/models/gpt-9"), 404)
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert client.get("/v1/models/tiny").status_code == 200


def test_http_output_changing_extension_is_400_naming_it(client: TestClient) -> None:
    body = _assert_error(
        client.post("/v1/completions", json={"prompt": "x", "use_beam_search": True}), 400
    )
    assert body["param"] == "use_beam_search" and "use_beam_search" in body["message"]
    body = _assert_error(client.post("/v1/completions", json={"prompt": "x", "stream": "yes"}), 400)
    assert "stream" in body["message"]


def test_http_unknown_route_and_method(client: TestClient) -> None:
    _assert_error(client.get("/nope"), 404)
    _assert_error(client.get("/v1/completions"), 405)


def test_http_models_and_health(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny"]
    assert data["data"][0]["max_model_len"] == 128
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("extra", "grammar"),
    [
        ({"guided_json": {"type": "object"}}, ("json_schema", '{"type": "object"}')),
        ({"guided_regex": "a+"}, ("regex", "a+")),
        ({"guided_choice": ["a.b", "c (d)"]}, ("regex", r"a\.b|c \(d\)")),
        ({"guided_grammar": 'root ::= "a"'}, ("ebnf", 'root ::= "a"')),
        ({"structured_outputs": {"choice": ["x"]}}, ("regex", "x")),
        ({"ebnf": 'root ::= "a"'}, ("ebnf", 'root ::= "a"')),
        (
            {"response_format": {"type": "structural_tag", "structures": [], "triggers": []}},
            ("structural_tag", '{"structures": [], "triggers": []}'),
        ),
    ],
)
def test_other_servers_structured_output_fields(extra: dict, grammar: tuple) -> None:
    """vLLM's guided_* / structured_outputs and SGLang's ebnf / structural_tag map to srt's
    grammars; two at once are a 400."""
    for req in (
        CompletionRequest(prompt="x", **extra),
        ChatCompletionRequest(messages=MSGS, **extra),
    ):
        req.check_supported()
        assert req.sampling_params(4).grammar == grammar
    with pytest.raises(ValueError, match="at most one output constraint"):
        ChatCompletionRequest(messages=MSGS, regex="b", **extra).sampling_params(4)
    with pytest.raises(RequestError, match="structured_outputs.bogus"):
        ChatCompletionRequest(messages=MSGS, structured_outputs={"bogus": 1}).sampling_params(4)
