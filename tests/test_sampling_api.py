"""Sampling parameters, logprobs and structured output end to end through a live server (tiny
random llama): /generate and the OpenAI endpoints via the official `openai` client, with
`extra_body` for srt's own fields."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from _live import start_server


class Live:
    def __init__(self, base: str, model: str) -> None:
        self.base, self.model = base, model

    def gen(self, **body: object) -> dict:
        r = httpx.post(self.base + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, **body: object) -> httpx.Response:
        return httpx.post(self.base + path, json=body, timeout=60)


@pytest.fixture(scope="module")
def live(
    tiny_model_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    model = tiny_model_paths["llama"]
    tmp = tmp_path_factory.mktemp("sampling_api")
    proc, base = start_server(
        ["--model-path", model, "--max-total-tokens", "4096"], Path(tmp / "server.log"), tmp
    )
    yield Live(base, model)
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base + "/v1", api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


# ---- logprobs -------------------------------------------------------------------------------


def test_generate_logprobs_shape_and_rescoring(live: Live) -> None:
    out = live.gen(
        text="The quick brown fox",
        sampling_params=GREEDY,
        return_logprob=True,
        top_logprobs_num=3,
        logprob_start_len=0,
    )
    meta = out["meta_info"]
    ids = out["output_ids"]
    toks = meta["output_token_logprobs"]
    assert [t[1] for t in toks] == ids and len(meta["output_top_logprobs"]) == len(ids)
    for (lp, tid, text), top in zip(toks, meta["output_top_logprobs"], strict=True):
        assert isinstance(text, str) and lp <= 0.0
        assert len(top) == 3 and top[0][1] == tid and top[0][0] == pytest.approx(lp)
    inp = meta["input_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None
    assert all(e[0] is not None and e[0] <= 0.0 for e in inp[1:])
    prompt_ids = [e[1] for e in inp]

    # Scoring prompt + output again (no new token) gives the same logprobs.
    again = live.gen(
        input_ids=prompt_ids + ids,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=len(prompt_ids),
    )
    assert again["output_ids"] == []
    scored = [e[0] for e in again["meta_info"]["input_token_logprobs"]]
    assert scored == pytest.approx([t[0] for t in toks], abs=1e-4)

    # No return_logprob: no logprob keys.
    assert "output_token_logprobs" not in live.gen(text="x", sampling_params=GREEDY)["meta_info"]
    bad = live.post("/generate", text="x", return_logprob=True, logprob_start_len=99)
    assert bad.status_code == 400 and "logprob_start_len" in bad.json()["message"]


def test_generate_logprobs_stream(live: Live) -> None:
    body = {
        "text": "Hello",
        "sampling_params": GREEDY,
        "return_logprob": True,
        "stream": True,
    }
    r = live.post("/generate", **body)
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    last = events[-1]
    assert [t[1] for t in last["meta_info"]["output_token_logprobs"]] == last["output_ids"]


def test_chat_logprobs(client: openai.OpenAI, live: Live) -> None:
    r = client.chat.completions.create(
        model=live.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
    chunks = list(
        client.chat.completions.create(
            model=live.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            temperature=0,
            logprobs=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed = [
        c
        for ch in chunks
        for choice in ch.choices
        if choice.logprobs
        for c in choice.logprobs.content
    ]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_completion_logprobs_and_echo(client: openai.OpenAI, live: Live) -> None:
    prompt = "one two three"
    r = client.completions.create(
        model=live.model,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    e = client.completions.create(
        model=live.model,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    c = e.choices[0]
    assert c.text == prompt + r.choices[0].text
    n_prompt = e.usage.prompt_tokens
    assert len(c.logprobs.tokens) == n_prompt + 4
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    # echo alone, and echo with max_tokens=0 (scoring the prompt)
    assert (
        client.completions.create(model=live.model, prompt=prompt, max_tokens=0, echo=True)
        .choices[0]
        .text
        == prompt
    )
    s = client.completions.create(
        model=live.model, prompt=prompt, max_tokens=0, echo=True, logprobs=0
    ).choices[0]
    assert s.logprobs.token_logprobs[1:] == pytest.approx(
        c.logprobs.token_logprobs[1:n_prompt], abs=1e-4
    )


# ---- sampling parameters --------------------------------------------------------------------

PROMPT = "the cat sat on"
EOS = "<|im_end|>"


def tok_id(live: Live, token: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(live.model).convert_tokens_to_ids(token)


def test_seed_n_and_filters(live: Live) -> None:
    sampled = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    a = live.gen(text=PROMPT, sampling_params={**sampled, "seed": 11})
    b = live.gen(text=PROMPT, sampling_params={**sampled, "seed": 11})
    c = live.gen(text=PROMPT, sampling_params={**sampled, "seed": 12})
    assert a["output_ids"] == b["output_ids"] != c["output_ids"]
    greedy = live.gen(text=PROMPT, sampling_params={**sampled, "temperature": 0})["output_ids"]
    # Filters that leave only the top token are greedy, whatever the temperature.
    for f in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        out = live.gen(text=PROMPT, sampling_params={**sampled, "temperature": 2.0, **f})
        assert out["output_ids"] == greedy, f
    # n choices: a list, reproducible with a seed, distinct, choice 0 = the n=1 output; the
    # copies reuse the prompt's cached prefix.
    n3 = live.gen(text=PROMPT + " a mat", sampling_params={**sampled, "seed": 11, "n": 3})
    again = live.gen(text=PROMPT + " a mat", sampling_params={**sampled, "seed": 11, "n": 3})
    assert isinstance(n3, list) and len(n3) == 3
    ids = [o["output_ids"] for o in n3]
    assert ids == [o["output_ids"] for o in again]
    assert len({tuple(x) for x in ids}) == 3
    one = live.gen(text=PROMPT + " a mat", sampling_params={**sampled, "seed": 11})
    assert one["output_ids"] == ids[0]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in n3[1:])


def test_logit_bias_stop_ids_eos_min_tokens(live: Live) -> None:
    eos = tok_id(live, EOS)
    base = {"temperature": 1.0, "max_new_tokens": 6, "seed": 3}
    forced = live.gen(text=PROMPT, sampling_params={**base, "logit_bias": {str(eos): 100}})
    assert forced["output_ids"] == [eos]
    assert forced["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    forced_on = {**base, "logit_bias": {str(eos): 100}, "ignore_eos": True}
    out = live.gen(text=PROMPT, sampling_params=forced_on)
    assert out["output_ids"] == [eos] * 6 and EOS not in out["text"]
    raw = live.gen(text=PROMPT, sampling_params={**forced_on, "skip_special_tokens": False})
    assert raw["text"].count(EOS) == 6
    # min_new_tokens masks the stop ids (EOS included) until that many tokens are out.
    mt = live.gen(
        text=PROMPT, sampling_params={**base, "logit_bias": {str(eos): 100}, "min_new_tokens": 4}
    )
    assert len(mt["output_ids"]) == 5 and mt["output_ids"][4] == eos
    assert eos not in mt["output_ids"][:4]
    greedy = live.gen(text=PROMPT, sampling_params=GREEDY)["output_ids"]
    stop_tok = greedy[2]
    st = live.gen(text=PROMPT, sampling_params={**GREEDY, "stop_token_ids": [stop_tok]})
    cut = greedy.index(stop_tok) + 1
    assert st["output_ids"] == greedy[:cut]
    assert st["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}


def test_stop_strings_and_no_stop_trim(live: Live) -> None:
    full = live.gen(text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 16})["text"]
    stop = full[5:8]
    first = full.index(stop)
    for s in (stop, [stop, "\u2603never"]):
        out = live.gen(text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 16, "stop": s})
        assert out["text"] == full[:first]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = live.gen(
        text=PROMPT,
        sampling_params={**GREEDY, "max_new_tokens": 16, "stop": stop, "no_stop_trim": True},
    )
    assert kept["text"] == full[: first + len(stop)]


def test_penalties_follow_raw_logprobs(live: Live) -> None:
    """Greedy with frequency / presence penalties picks, at every step, the argmax of the raw
    logprob minus the OpenAI penalties (checked over the top 20, which settles the argmax)."""
    for f, p in ((1.5, 0.0), (0.0, 1.5), (0.7, 0.7)):
        out = live.gen(
            text=PROMPT,
            sampling_params={
                **GREEDY,
                "max_new_tokens": 12,
                "frequency_penalty": f,
                "presence_penalty": p,
            },
            return_logprob=True,
            top_logprobs_num=20,
        )
        ids = out["output_ids"]
        for step, (tok, top) in enumerate(
            zip(ids, out["meta_info"]["output_top_logprobs"], strict=True)
        ):
            counts = {t: ids[:step].count(t) for t in set(ids[:step])}
            adj = {t: lp - f * counts.get(t, 0) - p * (counts.get(t, 0) > 0) for lp, t, _ in top}
            best = max(adj, key=adj.get)
            assert adj[best] >= top[-1][0], "the argmax might be outside the top 20"
            assert tok == best, (f, p, step)
    assert len(set(ids)) > 1


def test_repetition_penalty_matches_hf(live: Live) -> None:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(live.model).eval()
    prompt = live.gen(
        text=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )["meta_info"]["input_token_logprobs"]
    ids = [e[1] for e in prompt]
    out = live.gen(
        input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 10, "repetition_penalty": 1.8}
    )
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            repetition_penalty=1.8,
        )[0, len(ids) :].tolist()
    assert out["output_ids"] == ref


def test_openai_sampling_fields(client: openai.OpenAI, live: Live) -> None:
    msgs = [{"role": "user", "content": "hello there"}]
    common = {"model": live.model, "temperature": 1.0, "seed": 5}
    r1 = client.chat.completions.create(
        messages=msgs, max_completion_tokens=5, n=2, **common, extra_body={"ignore_eos": True}
    )
    r2 = client.chat.completions.create(
        messages=msgs, max_tokens=5, n=2, **common, extra_body={"ignore_eos": True}
    )
    texts = [c.message.content for c in r1.choices]
    assert texts == [c.message.content for c in r2.choices] and texts[0] != texts[1]
    assert r1.usage.completion_tokens == 10
    eos = tok_id(live, EOS)
    r = client.completions.create(
        prompt=PROMPT,
        max_tokens=4,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 2, "top_k": 3, "min_p": 0.01, "repetition_penalty": 1.1},
        **common,
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        prompt=PROMPT,
        max_tokens=3,
        logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
        **common,
    )
    assert r.choices[0].text.count(EOS) == 3
    g = client.completions.create(
        model=live.model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = g.choices[0].text
    stop = text[3:6]
    for s in (stop, [stop]):
        r = client.completions.create(
            model=live.model,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stop=s,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == text[: text.index(stop)]
    r = client.completions.create(
        model=live.model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True, "no_stop_trim": True},
    )
    assert r.choices[0].text == text[: text.index(stop) + len(stop)]
    first = client.completions.create(
        model=live.model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert first.usage.completion_tokens == 10
    sid = client.completions.create(
        model=live.model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "stop_token_ids": [live.gen(text=PROMPT, sampling_params=GREEDY)["output_ids"][1]],
        },
    )
    assert sid.choices[0].finish_reason == "stop"


# ---- structured output ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
}


def check_schema(obj: object) -> None:
    """SCHEMA checked by hand (jsonschema is not a dependency)."""
    assert isinstance(obj, dict) and set(obj) == {"color", "n", "ok"}, obj
    assert obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["n"], int) and not isinstance(obj["n"], bool) and 0 <= obj["n"] <= 99
    assert isinstance(obj["ok"], bool)


def test_generate_json_schema_and_regex(live: Live) -> None:
    sp = {"temperature": 1.0, "max_new_tokens": 64, "json_schema": json.dumps(SCHEMA)}
    outs = live.gen(text=[PROMPT, "hello"], sampling_params=[{**sp, "seed": 1}, {**sp, "seed": 2}])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        check_schema(json.loads(out["text"]))
    rx = live.gen(
        text=PROMPT,
        sampling_params={"temperature": 1.0, "max_new_tokens": 32, "regex": "(yes|no)-[0-9]{3}"},
    )
    assert re.fullmatch("(yes|no)-[0-9]{3}", rx["text"]), rx["text"]
    for bad, word in (
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": '{"type": 12}'}, "json_schema"),
        ({"regex": "a["}, "regex"),
        ({"regex": "a", "json_schema": "{}"}, "at most one"),
    ):
        r = live.post("/generate", text="x", sampling_params=bad)
        assert r.status_code == 400 and word in r.json()["message"], r.text


def test_openai_response_format(client: openai.OpenAI, live: Live) -> None:
    msgs = [{"role": "user", "content": "a color please"}]
    r = client.chat.completions.create(
        model=live.model,
        messages=msgs,
        max_tokens=64,
        seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    )
    check_schema(json.loads(r.choices[0].message.content))
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model=live.model,
        messages=msgs,
        max_tokens=200,
        seed=4,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":  # a random model may keep writing the object
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(
        model=live.model, prompt=PROMPT, max_tokens=16, extra_body={"regex": "[ab]{3}"}
    )
    assert re.fullmatch("[ab]{3}", r.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(
            model=live.model,
            messages=msgs,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": {"type": "nonsense"}},
            },
        )


# ---- SGLang's native API as its clients use it (issue 13, point 5) ----------------------------


def test_sglang_info_aliases(live: Live) -> None:
    info = httpx.get(live.base + "/get_model_info", timeout=30).json()
    assert info["model_path"] == live.model and info["is_generation"] is True
    assert "max_total_num_tokens" in httpx.get(live.base + "/get_server_info", timeout=30).json()


def test_bench_serving_body(live: Live) -> None:
    body = {
        "text": "the quick brown fox",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 3, "ignore_eos": True},
        "lora_path": None,
        "return_logprob": False,
        "return_routed_experts": False,
        "logprob_start_len": -1,
    }
    assert live.gen(**body)["meta_info"]["completion_tokens"] == 3
    r = live.post("/generate", **{**body, "lora_path": "adapter"})
    assert r.status_code == 400 and r.json()["param"] == "lora_path"


def test_return_text_in_logprobs(live: Live) -> None:
    body = dict(text="hello world", sampling_params=GREEDY, return_logprob=True)
    with_text = live.gen(**body, return_text_in_logprobs=True)["meta_info"]
    without = live.gen(**body, return_text_in_logprobs=False)["meta_info"]
    assert all(isinstance(e[2], str) for e in with_text["output_token_logprobs"])
    assert [e[2] for e in without["output_token_logprobs"]] == [None] * 8
    assert [e[:2] for e in without["output_token_logprobs"]] == [
        e[:2] for e in with_text["output_token_logprobs"]
    ]


def test_stop_regex_ends_at_the_token_completing_the_match(live: Live) -> None:
    from transformers import AutoTokenizer

    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    full = live.gen(text="the capital of france", sampling_params=sp)
    text = full["text"]
    # a pattern whose first match ends in the middle of the output
    mid = len(text) // 2
    pattern = re.escape(text[mid - 2 : mid]) + "|" + re.escape(text[mid - 2 : mid]) + "x+"
    out = live.gen(text="the capital of france", sampling_params={**sp, "stop_regex": pattern})
    fr = out["meta_info"]["finish_reason"]
    assert fr == {"type": "stop", "matched": pattern}
    assert text.startswith(out["text"]) and re.search(pattern, out["text"])
    tok = AutoTokenizer.from_pretrained(live.model)
    assert re.search(pattern, tok.decode(out["output_ids"][:-1])) is None
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) < 24

    # streaming gives the same text and the same finish; the server goes on serving
    r = httpx.post(
        live.base + "/generate",
        json={
            "text": "the capital of france",
            "sampling_params": {**sp, "stop_regex": [r"\d{9}", pattern]},
            "stream": True,
        },
        timeout=60,
    )
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert events[-1]["text"] == out["text"]
    assert events[-1]["meta_info"]["finish_reason"] == fr
    bad = live.post("/generate", text="x", sampling_params={"stop_regex": "("})
    assert bad.status_code == 400 and "stop_regex" in bad.json()["message"]
    assert live.gen(text="x", sampling_params=GREEDY)["meta_info"]["completion_tokens"] == 8


def test_sglang_frontend_program(live: Live) -> None:
    """sgl.gen / select / regex / fork / chat roles / run_batch / streaming through SGLang's own
    RuntimeEndpoint, unchanged."""
    sgl = pytest.importorskip(
        "sglang.lang.api",
        reason="SGLang's frontend is not installed (pip install --no-deps sglang, plus its "
        "client-side imports: aiohttp, orjson, pybase64, IPython)",
    )
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    backend = RuntimeEndpoint(live.base)

    @sgl.function
    def program(s):  # noqa: ANN001, ANN202
        s += "Q: pick one. A:"
        s += sgl.gen("free", max_tokens=6, temperature=0)
        s += sgl.select("choice", choices=["yes", "no", "maybe"])
        s += sgl.gen("num", max_tokens=4, regex=r"[0-9]{1,3}")
        s += sgl.gen("rx", max_tokens=32, stop_regex=r"[a-z]", temperature=0)
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"branch {i}:" + sgl.gen("b", max_tokens=3, temperature=0)
        forks.join()

    state = program.run(backend=backend)
    assert state["choice"] in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{1,3}", state["num"])
    assert state.get_meta_info("rx")["finish_reason"] == {"type": "stop", "matched": "[a-z]"}
    assert re.search("[a-z]", state["rx"])

    @sgl.function
    def chat(s, q):  # noqa: ANN001, ANN202
        s += sgl.system("be brief")
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen("a", max_tokens=4))

    states = chat.run_batch([{"q": "hi"}, {"q": "yo"}], backend=backend)
    assert all(isinstance(st["a"], str) for st in states)
    streamed = chat.run(q="stream", stream=True, backend=backend)
    assert "".join(streamed.text_iter("a")) == streamed["a"]


# ---- OpenAI-side leniency (issue 13, point 6) ------------------------------------------------


def test_served_name_is_the_folder_name_and_other_names_are_served(
    client: openai.OpenAI, live: Live
) -> None:
    assert [m.id for m in client.models.list().data] == [Path(live.model).name]
    c = client.completions.create(model="default", prompt="hi", max_tokens=2)
    assert c.model == Path(live.model).name and c.choices[0].text is not None


def test_unknown_fields_are_ignored_wrong_types_are_400(live: Live) -> None:
    msgs = [{"role": "user", "content": "hi", "weird": 1}]
    body = {"messages": msgs, "max_tokens": 2, "separate_reasoning": True, "foo": {"a": 1}}
    r = live.post("/v1/chat/completions", **body)
    assert r.status_code == 200, r.text
    r = live.post("/v1/chat/completions", **{**body, "stream": "yes"})
    assert r.status_code == 400 and "stream" in r.json()["message"]
    r = live.post("/v1/completions", prompt="x", suffix="!", foo=1)
    assert r.status_code == 400 and r.json()["param"] == "suffix"
    r = live.post("/v1/completions", prompt="x", use_beam_search=True)
    assert r.status_code == 400 and r.json()["param"] == "use_beam_search"
    assert live.post("/v1/completions", prompt="x", max_tokens=1).status_code == 200


def test_chat_template_options(client: openai.OpenAI, live: Live) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    kw: dict = dict(model="x", messages=msgs, max_tokens=3, temperature=0)
    extra = {"ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True}
    cont = client.chat.completions.create(**kw, extra_body={**extra, "echo": True})
    assert cont.choices[0].message.content.startswith("Hello")
    plain = client.chat.completions.create(**kw, extra_body=extra)
    # the open last message: one token fewer in the prompt than with its end marker
    closed = client.chat.completions.create(
        **kw,
        extra_body={"ignore_eos": True, "add_generation_prompt": False},
        reasoning_effort="low",
    )
    assert plain.usage.prompt_tokens < closed.usage.prompt_tokens
    assert cont.choices[0].message.content == "Hello" + plain.choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True, extra_body={**extra, "echo": True})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == cont.choices[0].message.content
    r = live.post(
        "/v1/chat/completions",
        messages=msgs,
        chat_template_kwargs={"enable_thinking": False},
        max_tokens=1,
    )
    assert r.status_code == 200, r.text


def test_tokenize_aliases(live: Live) -> None:
    toks = live.post("/tokenize", prompt="hello world").json()["tokens"]
    assert toks == live.post("/v1/tokenize", prompt="hello world").json()["tokens"]
    out = live.post("/detokenize", tokens=toks).json()
    assert out["text"] == out["prompt"] and "hello world" in out["text"]
