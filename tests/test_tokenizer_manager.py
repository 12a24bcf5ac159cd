"""TokenizerManager in-process, with the scheduler and detokenizer played by raw ZMQ sockets:
validation (400 material), tokenization, integer ids never reused, cumulative outputs with
deltas, tails and final counts from `Finished`, abort by id on close, errors ending a request
(with an abort to the scheduler), no abort for a stop string (also through the real
DetokenizerManager: no part of a stop string reaches main), data-parallel replica bookkeeping,
and waiters ending when the runtime dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from srt.managers.detokenizer_manager import DetokenizerManager
from srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    BatchTokenIDOut,
    DetokInit,
    Finished,
    FinishReason,
    GenerateReq,
    LogprobDelta,
    decode,
    encode,
)
from srt.managers.tokenizer_manager import (
    GenerateReqInput,
    RuntimeDeadError,
    TokenizerManager,
    final_output,
)
from srt.server_args import PortArgs, ServerArgs
from srt.testing.tiny_model import train_tokenizer

CONTEXT = 256
POOL = 200


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path)
    return path


def arr(xs: list[int]) -> bytes:
    return np.array(xs, dtype="<i8").tobytes()


class Peers:
    """Each replica's scheduler PULL and the detokenizer's PUSH, as plain sockets."""

    def __init__(self, port_args: PortArgs) -> None:
        self.ctx = zmq.Context()
        self.scheds = []
        for ipc in port_args.scheduler_ipcs:
            sock = self.ctx.socket(zmq.PULL)
            sock.bind(ipc)
            self.scheds.append(sock)
        self.detok = self.ctx.socket(zmq.PUSH)
        self.detok.connect(port_args.tokenizer_ipc)

    def recv(self, replica: int = 0) -> object:
        assert self.scheds[replica].poll(5000), "nothing reached the scheduler"
        return decode(self.scheds[replica].recv())

    def idle(self, replica: int = 0) -> bool:
        """Nothing more reaches the scheduler (within a short wait)."""
        return not self.scheds[replica].poll(300)

    def send(
        self,
        tokens: dict[int, int] | None = None,
        texts: list[str] | None = None,
        **kw: object,
    ) -> None:
        """One BatchStrOut: `tokens` maps id -> its token this step, `texts` aligned with it."""
        tokens = tokens or {}
        out = BatchStrOut(
            ids=arr(list(tokens)),
            tokens=arr(list(tokens.values())),
            texts=texts if texts is not None else [""] * len(tokens),
            **kw,  # type: ignore[arg-type]
        )
        self.detok.send(encode(out))

    def close(self) -> None:
        for sock in self.scheds:
            sock.close(linger=0)
        self.detok.close(linger=0)
        self.ctx.term()


@pytest.fixture
def env(tokenizer_dir: Path) -> Iterator[tuple[TokenizerManager, Peers]]:
    port_args = PortArgs.new()
    args = ServerArgs(model_path=str(tokenizer_dir))
    info = {"context_len": CONTEXT, "vocab_size": 512, "max_total_num_tokens": POOL}
    tm = TokenizerManager(args, port_args, info)
    peers = Peers(port_args)
    yield tm, peers
    tm.close()
    peers.close()
    port_args.cleanup()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


@pytest.mark.parametrize(
    "obj, needle",
    [
        (GenerateReqInput(text=""), "empty"),
        (GenerateReqInput(input_ids=[]), "empty"),
        (GenerateReqInput(), "exactly one"),
        (GenerateReqInput(text="a", input_ids=[1]), "exactly one"),
        (GenerateReqInput(input_ids=[1, 512]), "512"),
        (GenerateReqInput(input_ids=[-1]), "-1"),
        (GenerateReqInput(input_ids=[1] * CONTEXT), "context length"),
        (GenerateReqInput(input_ids=[1] * 10, sampling_params={"max_new_tokens": 250}), "context"),
        (GenerateReqInput(input_ids=[1] * 210, sampling_params={"max_new_tokens": 1}), "KV cache"),
        (GenerateReqInput(text="a", sampling_params={"temperature": -1}), "temperature"),
        (GenerateReqInput(text="a", sampling_params={"stop_token_ids": [999]}), "vocabulary"),
        (GenerateReqInput(text="a", sampling_params={"nope": 1}), "nope"),
    ],
)
def test_invalid_requests_raise_value_error(env, obj: GenerateReqInput, needle: str) -> None:  # noqa: ANN001
    tm, _ = env
    with pytest.raises(ValueError, match=needle):
        run(tm.tokenize_request(obj))


def test_max_new_tokens_defaults_and_caps(env) -> None:  # noqa: ANN001
    tm, _ = env
    req = run(tm.tokenize_request(GenerateReqInput(input_ids=[1] * 10, sampling_params={})))
    assert req.sampling_params.max_new_tokens == 128  # SamplingParams' default
    big = {"max_new_tokens": 240}
    req = run(tm.tokenize_request(GenerateReqInput(input_ids=[1] * 10, sampling_params=big)))
    assert req.sampling_params.max_new_tokens == POOL - 10  # capped by the KV pool
    none = {"max_new_tokens": None}
    req = run(tm.tokenize_request(GenerateReqInput(input_ids=[1] * 10, sampling_params=none)))
    # until the context ends, capped by what the KV pool can hold
    assert req.sampling_params.max_new_tokens == min(CONTEXT, POOL) - 10
    req = run(tm.tokenize_request(GenerateReqInput(text="Hello world")))
    assert req.input_ids == tm.tokenizer.encode("Hello world")
    assert len(req.rid) == 32 and req.created_time > 0


def test_stream_outputs_are_cumulative_with_deltas(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> tuple[GenerateReq, list[dict]]:
        obj = GenerateReqInput(text="Hello", sampling_params={"max_new_tokens": 3}, stream=True)
        gen = tm.generate_request(obj)
        outs = []
        first = asyncio.ensure_future(gen.__anext__())
        req = await asyncio.to_thread(peers.recv)
        assert isinstance(req, GenerateReq)
        peers.send({req.id: 5}, ["He"], cached=[(req.id, 1)])
        outs.append(await first)
        peers.send({req.id: 6})  # held back by the detokenizer: no text yet
        outs.append(await gen.__anext__())
        length = FinishReason(type="length", length=3)
        peers.send({req.id: 7}, ["ll"], finished=[Finished(req.id, length, 3, 1)], tails=["o"])
        outs += [o async for o in gen]
        return req, outs

    req, outs = run(go())
    assert req.id >= 1 and req.input_ids == tm.tokenizer.encode("Hello")
    assert req.sampling_params.max_new_tokens == 3
    assert [o["text"] for o in outs] == ["He", "He", "Hello"]
    assert [o["delta"]["text"] for o in outs] == ["He", "", "llo"]
    assert [o["output_ids"] for o in outs] == [[5], [5, 6], [5, 6, 7]]
    assert [o["delta"]["output_ids"] for o in outs] == [[5], [6], [7]]
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [1, 2, 3]
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [1, 1, 1]
    meta = outs[-1]["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert meta["prompt_tokens"] == len(tm.tokenizer.encode("Hello"))
    assert len(meta["id"]) == 32  # the client's rid, not the integer id
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])
    assert tm.rid_to_id == {} and tm.id_to_state == {}


def test_non_stream_yields_only_the_final_output(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> list[dict]:
        gen = tm.generate_request(GenerateReqInput(text="a"))
        task = asyncio.ensure_future(asyncio.wait_for(collect(gen), 10))
        req = await asyncio.to_thread(peers.recv)
        for i in range(3):
            peers.send({req.id: i}, ["x"])
        stop = FinishReason(type="stop", matched=9)
        peers.send({req.id: 9}, ["y"], finished=[Finished(req.id, stop, 4, 0)], tails=[""])
        return await task

    outs = run(go())
    assert len(outs) == 1
    out = outs[0]
    assert out["text"] == "xxxy" and out["output_ids"] == [0, 1, 2, 9]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 9}
    assert out["meta_info"]["completion_tokens"] == 4


async def collect(gen) -> list[dict]:  # noqa: ANN001
    return [o async for o in gen]


def test_ids_are_fresh_and_never_reused(env) -> None:  # noqa: ANN001
    tm, peers = env
    done = FinishReason(type="length", length=1)

    async def one(rid: str) -> tuple[int, dict]:
        task = asyncio.ensure_future(
            final_output(tm.generate_request(GenerateReqInput(text="a", rid=rid)))
        )
        req = await asyncio.to_thread(peers.recv)
        assert isinstance(req, GenerateReq) and tm.rid_to_id == {rid: req.id}
        peers.send({req.id: 3}, ["z"], finished=[Finished(req.id, done, 1, 0)], tails=[""])
        return req.id, await task

    async def go() -> list[tuple[int, dict]]:
        # The same rid again once it ended, then another: every send gets a new id.
        return [await one("same"), await one("same"), await one("other")]

    results = run(go())
    ids = [i for i, _ in results]
    assert ids[0] >= 1 and ids == sorted(set(ids))
    assert [out["meta_info"]["id"] for _, out in results] == ["same", "same", "other"]


def test_closing_the_stream_sends_abort_by_id(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> int:
        gen = tm.generate_request(GenerateReqInput(text="a", stream=True))
        first = asyncio.ensure_future(gen.__anext__())
        req = await asyncio.to_thread(peers.recv)
        peers.send({req.id: 1}, ["x"])
        await first
        await gen.aclose()
        return req.id

    req_id = run(go())
    abort = peers.recv()
    assert isinstance(abort, AbortReq) and abort.id == req_id and not abort.abort_all
    assert tm.rid_to_id == {} and tm.id_to_state == {}


def test_abort_running_maps_the_rid(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> tuple[int, dict]:
        obj = GenerateReqInput(text="a", rid="mine")
        task = asyncio.ensure_future(final_output(tm.generate_request(obj)))
        req = await asyncio.to_thread(peers.recv)
        assert tm.abort_running("mine", "stop it") and not tm.abort_running("nope", "x")
        abort = await asyncio.to_thread(peers.recv)
        assert isinstance(abort, AbortReq) and (abort.id, abort.message) == (req.id, "stop it")
        # The waiter still gets the scheduler's final output.
        fr = FinishReason(type="abort", message="stop it")
        peers.send(finished=[Finished(req.id, fr, 0, 0)], tails=[""])
        return req.id, await task

    _, out = run(go())
    assert out["meta_info"]["finish_reason"] == {"type": "abort", "message": "stop it"}


def test_scheduler_abort_ends_the_waiter(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> dict:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        req = await asyncio.to_thread(peers.recv)
        fr = FinishReason(type="abort", message="out of memory")
        peers.send(finished=[Finished(req.id, fr, 0, 0)], tails=[""])
        return await task

    out = run(go())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0


def test_an_error_ends_the_request_and_aborts_it_in_the_scheduler(env) -> None:  # noqa: ANN001
    tm, peers = env
    message = "detokenization failed: invalid token"

    async def go() -> tuple[int, int, list[dict], dict]:
        gen = tm.generate_request(GenerateReqInput(text="a", stream=True))
        task = asyncio.ensure_future(asyncio.wait_for(collect(gen), 10))
        bad = await asyncio.to_thread(peers.recv)
        other = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="b"))))
        good = await asyncio.to_thread(peers.recv)
        peers.send({bad.id: 1, good.id: 2}, ["x", "y"])
        peers.send({bad.id: 3, good.id: 4}, ["", "z"], errors=[(bad.id, message)])
        outs = await task
        # The scheduler's Finished for it comes after main's abort; it is moot.
        fr = FinishReason(type="abort", message=message)
        done = FinishReason(type="length", length=2)
        fins = [Finished(bad.id, fr, 2, 0), Finished(good.id, done, 2, 0)]
        peers.send(finished=fins, tails=["", ""])
        return bad.id, good.id, outs, await other

    bad_id, good_id, outs, other = run(go())
    assert outs[-1]["meta_info"]["finish_reason"] == {"type": "abort", "message": message}
    assert outs[-1]["text"] == "x" and outs[-1]["output_ids"] == [1, 3]
    abort = peers.recv()
    assert isinstance(abort, AbortReq) and (abort.id, abort.message) == (bad_id, message)
    assert peers.idle()  # one abort, not another for the moot Finished
    assert other["text"] == "yz" and other["meta_info"]["finish_reason"]["type"] == "length"
    assert good_id != bad_id and tm.rid_to_id == {} and tm.id_to_state == {}

    from srt.entrypoints.openai.serving_base import abort_error

    err = abort_error(outs[-1]["meta_info"]["finish_reason"])
    assert err.status_code == 500 and message in err.message


def test_runtime_death_ends_waiters_and_refuses_new_requests(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> None:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        await asyncio.to_thread(peers.recv)
        tm.fail_all("the scheduler process died (exit code -9)")
        with pytest.raises(RuntimeDeadError, match="exit code -9"):
            await task
        with pytest.raises(RuntimeDeadError):
            await final_output(tm.generate_request(GenerateReqInput(text="b")))

    run(go())
    assert tm.rid_to_id == {} and tm.id_to_state == {}


def test_chat_template_renders_a_generation_prompt(env) -> None:  # noqa: ANN001
    tm, _ = env
    text = tm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_logprobs_arrive_by_id(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> dict:
        obj = GenerateReqInput(text="a", return_logprob=True)
        task = asyncio.ensure_future(final_output(tm.generate_request(obj)))
        req = await asyncio.to_thread(peers.recv)
        assert isinstance(req, GenerateReq) and req.return_logprob
        lp = LogprobDelta(output_logprobs=[-0.25], output_ids=[5])
        fr = FinishReason(type="length", length=1)
        peers.send(
            {req.id: 5},
            ["x"],
            logprobs=[(req.id, lp)],
            finished=[Finished(req.id, fr, 1, 0)],
            tails=[""],
        )
        return await task

    out = run(go())
    [entry] = out["meta_info"]["output_token_logprobs"]
    assert entry[:2] == [-0.25, 5]


def test_a_stop_finish_sends_no_abort(env) -> None:  # noqa: ANN001
    """The scheduler decided the stop string; main only ends the request."""
    tm, peers = env

    async def go() -> dict:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        req = await asyncio.to_thread(peers.recv)
        peers.send({req.id: 1}, ["a"])
        stop = FinishReason(type="stop", matched="c")
        peers.send({req.id: 2}, [""], finished=[Finished(req.id, stop, 2, 0)], tails=["b"])
        return await task

    out = run(go())
    assert out["text"] == "ab"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "c"}
    assert peers.idle()


def test_stop_string_text_never_reaches_main(env, tokenizer_dir: Path) -> None:  # noqa: ANN001
    """Through the real DetokenizerManager (Rust detokenizer): the scheduler sends the stop
    string's last token with its Finished; no part of the stop string is ever in an output."""
    from srt._native import Detokenizer

    tm, peers = env
    port_args = PortArgs.new()
    dm = DetokenizerManager(ServerArgs(), port_args, detokenizer=Detokenizer(str(tokenizer_dir)))
    tokens = tm.tokenizer.encode("Hello world, this is", add_special_tokens=False)

    async def go() -> list[dict]:
        obj = GenerateReqInput(text="a", stream=True, sampling_params={"stop": [" is"]})
        gen = tm.generate_request(obj)
        task = asyncio.ensure_future(asyncio.wait_for(collect(gen), 10))
        req = await asyncio.to_thread(peers.recv)
        assert isinstance(req, GenerateReq) and req.sampling_params.stop == [" is"]
        init = DetokInit(id=req.id, prompt_tail=req.input_ids, stop=[" is"])
        stop = FinishReason(type="stop", matched=" is")
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            step = BatchTokenIDOut(
                ids=arr([req.id]),
                tokens=arr([tok]),
                inits=[init] if i == 0 else [],
                finished=[Finished(req.id, stop, len(tokens), 0)] if last else [],
            )
            peers.detok.send(encode(dm.handle_batch(step)))
        return await task

    try:
        outs = run(go())
    finally:
        dm.recv_sock.close(linger=0)
        dm.send_sock.close(linger=0)
        dm.ctx.term()
        port_args.cleanup()
    assert outs[-1]["text"] == "Hello world, this"
    assert all(" is" not in o["delta"]["text"] for o in outs)
    assert outs[-1]["output_ids"] == tokens
    assert outs[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": " is"}
    assert peers.idle()


def test_data_parallel_replicas_follow_each_request(tokenizer_dir: Path) -> None:
    """With two replicas: copies of an n > 1 request go where the first went, an abort and an
    error's abort go to the request's replica, and every end releases its load."""
    args = ServerArgs(model_path=str(tokenizer_dir), dp_size=2, load_balance_method="round_robin")
    port_args = PortArgs.new(args)
    info = {"context_len": CONTEXT, "vocab_size": 512, "max_total_num_tokens": POOL}
    tm = TokenizerManager(args, port_args, info)
    peers = Peers(port_args)
    assert tm.router is not None

    async def recv_any() -> tuple[int, object]:
        while True:
            for replica, sock in enumerate(peers.scheds):
                if sock.poll(0):
                    return replica, decode(sock.recv())
            await asyncio.sleep(0.01)

    async def go() -> None:
        first = await tm.tokenize_request(GenerateReqInput(text="a"))
        reqs = tm.fan_out(first, 3)
        tasks = [asyncio.ensure_future(final_output(tm.generate_tokenized(r))) for r in reqs]
        got = [await asyncio.wait_for(recv_any(), 5) for _ in reqs]
        replicas = {replica for replica, _ in got}
        assert len(replicas) == 1
        [replica] = replicas
        assert tm.router.loads[replica] == 3
        ids = [m.id for _, m in got if isinstance(m, GenerateReq)]
        assert len(set(ids)) == 3
        # One aborted by its client, one ended by an error, one finished.
        tm.abort_request(reqs[0].rid)
        peers.send(errors=[(ids[1], "detokenization failed: x")])
        fr = FinishReason(type="length", length=1)
        peers.send({ids[2]: 1}, ["q"], finished=[Finished(ids[2], fr, 1, 0)], tails=[""])
        aborts = [await asyncio.wait_for(recv_any(), 5) for _ in range(2)]
        assert [(r, m.id) for r, m in aborts] == [(replica, ids[0]), (replica, ids[1])]
        results = await asyncio.gather(*tasks[1:])
        assert [o["meta_info"]["finish_reason"]["type"] for o in results] == ["abort", "length"]
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        assert tm.router.loads == [0, 0]

    try:
        run(go())
    finally:
        tm.close()
        peers.close()
        port_args.cleanup()


def test_chat_template_render_options(tiny_model_paths: dict[str, str]) -> None:
    """add_generation_prompt, continue_final_message and the template's own variables
    (chat_template_kwargs, reasoning_effort) reach the render."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_paths["llama"])
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}"
        "{% if reasoning_effort is defined %}[{{ reasoning_effort }}]{% endif %}"
    )
    fake = SimpleNamespace(tokenizer=tok)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    render = TokenizerManager.apply_chat_template
    assert render(fake, msgs[:1]) == "<user>hi</user><assistant>"  # type: ignore[arg-type]
    assert render(fake, msgs[:1], enable_thinking=False, reasoning_effort="low") == (  # type: ignore[arg-type]
        "<user>hi</user><assistant>[no-think][low]"
    )
    cont = render(fake, msgs, add_generation_prompt=False, continue_final_message=True)  # type: ignore[arg-type]
    assert cont == "<user>hi</user><assistant>Hel"
