"""The offline Engine with a tiny random llama: generate (single, batch, token ids), async and
streaming generation, validation errors, and a shutdown that leaves no child processes. Needs
the whole runtime (scheduler, Rust detokenizer)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Iterator

import pytest
from _live import alive

from srt.entrypoints.engine import Engine

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tiny_model_paths: dict[str, str]) -> str:
    return tiny_model_paths["llama"]


@pytest.fixture(scope="module")
def engine(model: str) -> Iterator[Engine]:
    e = Engine(model_path=model, max_total_tokens=4096, log_level="warning")
    yield e
    e.shutdown()


def test_generate_single(engine: Engine) -> None:
    out = engine.generate("Hello world", GREEDY)
    assert isinstance(out, dict) and isinstance(out["text"], str)
    assert len(out["output_ids"]) == 8
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 8 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] == "length"
    assert engine.generate("Hello world", GREEDY)["output_ids"] == out["output_ids"]


def test_generate_batch_matches_single(engine: Engine) -> None:
    prompts = ["a", "the quick brown fox", "Paris is"]
    outs = engine.generate(prompts, GREEDY)
    assert isinstance(outs, list) and len(outs) == 3
    for p, o in zip(prompts, outs, strict=True):
        assert o["output_ids"] == engine.generate(p, GREEDY)["output_ids"]
    per = engine.generate(prompts, [{**GREEDY, "max_new_tokens": n} for n in (1, 2, 3)])
    assert [o["meta_info"]["completion_tokens"] for o in per] == [1, 2, 3]


def test_generate_from_input_ids(engine: Engine) -> None:
    by_text = engine.generate("Hello world", GREEDY)
    ids = engine.tokenizer_manager.tokenizer.encode("Hello world")
    assert engine.generate(input_ids=ids, sampling_params=GREEDY)["text"] == by_text["text"]
    two = engine.generate(input_ids=[ids, ids], sampling_params=GREEDY)
    assert [o["text"] for o in two] == [by_text["text"]] * 2


def test_n_choices(engine: Engine) -> None:
    sp = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "seed": 9, "n": 2}
    outs = engine.generate("Hello", sp)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["output_ids"] != outs[1]["output_ids"]
    assert [o["output_ids"] for o in engine.generate("Hello", sp)] == [
        o["output_ids"] for o in outs
    ]
    assert len(engine.generate(["a", "b"], sp)) == 4


def test_invalid_requests_raise(engine: Engine) -> None:
    with pytest.raises(ValueError):
        engine.generate("x", {"temperature": -1})
    with pytest.raises(ValueError):
        engine.generate("x", {"max_new_tokens": 10**7})
    with pytest.raises(ValueError):
        engine.generate("")
    with pytest.raises(ValueError):
        engine.generate(["a", "b"], [{}])
    # still serving afterwards
    assert engine.generate("x", {"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1


def test_async_generate_and_stream(engine: Engine) -> None:
    async def go() -> tuple[dict, list[dict], list]:
        single = await engine.async_generate("Hello world", GREEDY)
        stream = await engine.async_generate("Hello world", GREEDY, stream=True)
        chunks = [c async for c in stream]
        batch = await engine.async_generate(["a", "b"], {"max_new_tokens": 2})
        return single, chunks, batch

    single, chunks, batch = asyncio.run(go())
    assert single["text"] == engine.generate("Hello world", GREEDY)["text"]
    assert chunks and chunks[-1]["text"] == single["text"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert sum(c["meta_info"]["finish_reason"] is not None for c in chunks) == 1
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b["text"].startswith(a["text"])
    assert len(batch) == 2


def test_closing_a_stream_early_aborts_it(engine: Engine) -> None:
    async def go() -> None:
        stream = await engine.async_generate(
            "x", {"max_new_tokens": 900, "ignore_eos": True}, stream=True
        )
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while engine.tokenizer_manager.rid_to_id and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.tokenizer_manager.rid_to_id
    assert engine.generate("y", {"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1


def test_shutdown_leaves_no_processes(model: str) -> None:
    with Engine(model_path=model, max_total_tokens=2048, log_level="warning") as e:
        pids = e._procs.pids() if e._procs is not None else []
        ipc_dir = e._port_args.ipc_dir
        assert pids and all(alive(p) for p in pids)
        assert e.generate("hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    assert not any(alive(p) for p in pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    assert not os.path.exists(ipc_dir)
    e.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        e.generate("hi")


def test_engine_from_a_plain_script_without_a_main_guard(model: str, tmp_path) -> None:
    # A newcomer's first script: no `if __name__ == "__main__":`. The children must not run it
    # again (they would each start another Engine).
    import subprocess
    import sys

    from _live import subprocess_env

    script = tmp_path / "first.py"
    script.write_text(
        "import srt\n"
        f"with srt.Engine(model_path={model!r}, max_total_tokens=256) as engine:\n"
        "    out = engine.generate('Hello', {'max_new_tokens': 4, 'temperature': 0})\n"
        "print('TEXT', repr(out['text']), out['meta_info']['completion_tokens'])\n"
    )
    env = subprocess_env(TMPDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("TEXT") == 1, result.stdout
    assert result.stdout.strip().endswith(" 4")
