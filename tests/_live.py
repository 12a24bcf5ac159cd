"""Helpers for the live-server and Engine tests: the tiny model, free ports, child processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child `python -m srt ...`: it imports the same `srt` as this test
    (an installed package, or the source tree during development)."""
    import srt

    env = dict(os.environ, **extra)
    root = str(Path(srt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it has exited all the same
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start_server(
    args: list[str],
    log: Path,
    tmpdir: Path,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Starts `python -m srt serve ARGS --port <free>` and waits until /health answers 200.
    Returns the process and its base URL; fails the test with the log if it never does.
    `env` adds environment variables for the server."""
    port = free_port()
    cmd = [sys.executable, "-m", "srt", "serve", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(TMPDIR=str(tmpdir), **(env or {})),
        )
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout, "server")


def wait_healthy(
    proc: subprocess.Popen, base: str, log: Path, timeout: float, what: str = "server"
) -> str:
    """Waits until `base`/health answers 200 and returns `base`; fails the test with the log
    if `proc` exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} not healthy within {timeout:g} s:\n{log.read_text()}")
        time.sleep(0.3)
