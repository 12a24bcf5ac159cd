"""Threads of srt's processes on the CPU (srt.cpu_threads): the scheduler's thread count and the
OpenMP wait policy its children start with, the user's environment winning over both."""

from __future__ import annotations

import multiprocessing.connection
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from srt import cpu_threads
from srt.entrypoints.launch import launch_subprocesses
from srt.managers.io_struct import ProcessReady, encode
from srt.server_args import PortArgs, ServerArgs


def test_children_spin_briefly_unless_the_user_chose() -> None:
    assert cpu_threads.child_env_additions({}) == {"GOMP_SPINCOUNT": "2000"}
    assert cpu_threads.child_env_additions({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert cpu_threads.child_env_additions({"GOMP_SPINCOUNT": "10000"}) == {}


def test_child_environment_leaves_the_callers_environment_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with cpu_threads.child_environment():
        assert os.environ["GOMP_SPINCOUNT"] == "2000"
    assert "GOMP_SPINCOUNT" not in os.environ


def test_scheduler_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = ServerArgs(model_path="m")
    assert cpu_threads.scheduler_threads(args) == 8
    assert cpu_threads.scheduler_threads(args.replace(tp_size=2)) == 4  # shared by the ranks
    assert cpu_threads.scheduler_threads(args.replace(tp_size=2, dp_size=8)) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads.scheduler_threads(args) == 3
    assert cpu_threads.scheduler_threads(args.replace(num_threads=5)) == 5  # the flag wins
    with pytest.raises(ValueError, match="--num-threads"):
        ServerArgs(model_path="m", num_threads=0)


def test_the_runner_sets_its_processes_threads(tiny_model_paths: dict[str, str]) -> None:
    from srt.configs.model_config import ModelConfig
    from srt.model_executor.model_runner import ModelRunner

    before = torch.get_num_threads()
    try:
        args = ServerArgs(model_path=tiny_model_paths["llama"], num_threads=1, max_total_tokens=64)
        ModelRunner(ModelConfig(args.model_path), args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _report_env(
    server_args: ServerArgs, port_args: PortArgs, conn: multiprocessing.connection.Connection
) -> None:
    info = {name: os.environ.get(name, "") for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    conn.send_bytes(encode(ProcessReady(name="probe", ok=True, info=info)))


@pytest.mark.parametrize("user", [None, "PASSIVE"])
def test_spawned_children_get_the_wait_policy(
    user: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    if user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    handle = launch_subprocesses(
        ServerArgs(model_path="m"), PortArgs.new(), targets={"probe": _report_env}, timeout=60
    )
    try:
        info = handle.infos["probe"]
        # srt's short spin, or nothing of srt's where the user chose a policy.
        assert info["GOMP_SPINCOUNT"] == ("2000" if user is None else "")
        assert info["OMP_WAIT_POLICY"] == (user or "")
    finally:
        handle.shutdown()
    assert "GOMP_SPINCOUNT" not in os.environ  # main's own environment unchanged


def _usable_cores_in_child(preexec: Any = None) -> int:
    code = "from srt.cpu_threads import usable_cores; print(usable_cores())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, preexec_fn=preexec
    )
    return int(out.stdout)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cores_follow_the_affinity_mask() -> None:
    first = min(os.sched_getaffinity(0))
    assert _usable_cores_in_child(lambda: os.sched_setaffinity(0, {first})) == 1


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(
    not (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists() or not os.access(CGROUP_V1_CPU, os.W_OK),
    reason="needs a writable cgroup v1 cpu controller (root)",
)
def test_usable_cores_follow_a_containers_cpu_quota() -> None:
    """A container given one CPU's worth of time (`docker run --cpus 1`) on a bigger machine."""
    group = CGROUP_V1_CPU / f"srt-test-{os.getpid()}"
    group.mkdir()
    try:
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(period))
        procs = group / "cgroup.procs"
        assert _usable_cores_in_child(lambda: procs.write_text(str(os.getpid()))) == 1
    finally:
        group.rmdir()
