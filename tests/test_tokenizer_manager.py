"""TokenizerManager in-process, with the scheduler and detokenizer played by raw ZMQ sockets:
validation (400 material), tokenization, cumulative outputs with deltas, abort on close, and
waiters ending when the runtime dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FinishReason,
    TokenizedGenerateReqInput,
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


class Peers:
    """The scheduler's PULL and the detokenizer's PUSH, as plain sockets."""

    def __init__(self, port_args: PortArgs) -> None:
        self.ctx = zmq.Context()
        self.sched = self.ctx.socket(zmq.PULL)
        self.sched.bind(port_args.scheduler_ipc)
        self.detok = self.ctx.socket(zmq.PUSH)
        self.detok.connect(port_args.tokenizer_ipc)

    def recv(self) -> object:
        assert self.sched.poll(5000), "nothing reached the scheduler"
        return decode(self.sched.recv())

    def send(self, rid: str, text: str, ids: list[int], n: int, fin: FinishReason | None) -> None:
        out = BatchStrOut(
            rids=[rid],
            texts=[text],
            new_ids=[ids],
            finished=[fin],
            prompt_tokens=[3],
            completion_tokens=[n],
            cached_tokens=[1],
        )
        self.detok.send(encode(out))

    def close(self) -> None:
        self.sched.close(linger=0)
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

    async def go() -> list[dict]:
        obj = GenerateReqInput(text="Hello", sampling_params={"max_new_tokens": 3}, stream=True)
        gen = tm.generate_request(obj)
        outs = []
        first = asyncio.ensure_future(gen.__anext__())
        req = await asyncio.to_thread(peers.recv)
        assert isinstance(req, TokenizedGenerateReqInput) and req.stream
        peers.send(req.rid, "He", [5], 1, None)
        outs.append(await first)
        peers.send(req.rid, "", [6], 2, None)  # held back by the detokenizer: no text yet
        outs.append(await gen.__anext__())
        peers.send(req.rid, "llo", [7], 3, FinishReason(type="length", length=3))
        outs += [o async for o in gen]
        return outs

    outs = run(go())
    assert [o["text"] for o in outs] == ["He", "He", "Hello"]
    assert [o["delta"]["text"] for o in outs] == ["He", "", "llo"]
    assert [o["output_ids"] for o in outs] == [[5], [5, 6], [5, 6, 7]]
    meta = outs[-1]["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert meta["completion_tokens"] == 3 and meta["cached_tokens"] == 1
    assert meta["prompt_tokens"] == len(tm.tokenizer.encode("Hello"))
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])
    assert tm.rid_to_state == {}


def test_non_stream_yields_only_the_final_output(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> dict:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        req = await asyncio.to_thread(peers.recv)
        for i in range(3):
            peers.send(req.rid, "x", [i], i + 1, None)
        peers.send(req.rid, "y", [9], 4, FinishReason(type="stop", matched=9))
        return await task

    out = run(go())
    assert out["text"] == "xxxy" and out["output_ids"] == [0, 1, 2, 9]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 9}


def test_closing_the_stream_sends_abort(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> str:
        obj = GenerateReqInput(text="a", stream=True)
        gen = tm.generate_request(obj)
        first = asyncio.ensure_future(gen.__anext__())
        req = await asyncio.to_thread(peers.recv)
        peers.send(req.rid, "x", [1], 1, None)
        await first
        await gen.aclose()
        return req.rid

    rid = run(go())
    abort = peers.recv()
    assert isinstance(abort, AbortReq) and abort.rid == rid
    assert tm.rid_to_state == {}


def test_scheduler_abort_ends_the_waiter(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> dict:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        req = await asyncio.to_thread(peers.recv)
        peers.send(req.rid, "", [], 0, FinishReason(type="abort", message="out of memory"))
        return await task

    out = run(go())
    assert out["meta_info"]["finish_reason"]["type"] == "abort"


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


def test_chat_template_renders_a_generation_prompt(env) -> None:  # noqa: ANN001
    tm, _ = env
    text = tm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_stop_string_finish_tells_the_scheduler_to_stop(env) -> None:  # noqa: ANN001
    tm, peers = env

    async def go() -> tuple[str, dict]:
        task = asyncio.ensure_future(final_output(tm.generate_request(GenerateReqInput(text="a"))))
        req = await asyncio.to_thread(peers.recv)
        peers.send(req.rid, "ab", [1, 2], 2, FinishReason(type="stop", matched="c"))
        return req.rid, await task

    rid, out = run(go())
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "c"}
    abort = peers.recv()
    assert isinstance(abort, AbortReq) and abort.rid == rid
