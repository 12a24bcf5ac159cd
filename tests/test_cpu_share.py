"""CoreShare (srt.cpu_share): a CPU scheduler's native steps run on the cores other processes
leave free, between one thread and --num-threads, unless --fixed-threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from srt import cpu_share
from srt.cpu_share import CoreShare, decide, read_proc_stat


@pytest.mark.parametrize(
    ("current", "free", "max_threads", "expected"),
    [
        (2, 0.98, 2, 1),  # one busy process beside on 2 cores
        (2, 1.40, 2, 2),  # within the margin: stays
        (1, 1.60, 2, 1),
        (1, 1.70, 2, 2),
        (1, 2.00, 2, 2),
        (8, 5.20, 8, 5),
        (5, 7.90, 8, 8),
        (4, 7.90, 4, 4),  # never above --num-threads
        (3, 0.00, 4, 1),  # never below one
    ],
)
def test_decide(current: int, free: float, max_threads: int, expected: int) -> None:
    assert decide(current, free, max_threads) == expected


class FakeMachine:
    """/proc/stat and this process's CPU time of a machine whose other processes keep `others`
    cores busy while this one keeps `mine` busy, advanced by hand."""

    hz = 100

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.busy = self.total = 0
        self.cpu = 0.0
        self.others = self.mine = 0.0

    def advance(self, seconds: float) -> None:
        self.busy += round((self.others + self.mine) * seconds * self.hz)
        self.total += round(self.cores * seconds * self.hz)
        self.cpu += self.mine * seconds

    def read(self, cpus: object) -> tuple[int, int, int]:
        return self.busy, self.total, self.cores


def test_a_busy_neighbour_shrinks_the_team_and_its_end_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: {0, 1})
    m = FakeMachine(cores=2)
    share = CoreShare(2, read=m.read, cpu_time=lambda: m.cpu, start=False)
    share._hz = m.hz
    assert share.dynamic and share.threads() == 2

    def run(others: float, mine: float, samples: int) -> list[int]:
        m.others, m.mine = others, mine
        seen = []
        for _ in range(samples):
            m.advance(cpu_share.SAMPLE_S)
            share.sample()
            seen.append(share.threads())
        return seen

    # srt alone, its own two threads busy: nothing else takes a core.
    assert run(others=0.05, mine=2.0, samples=5) == [2] * 5
    # A busy process arrives: srt's own load does not count, the neighbour's does.
    assert run(others=1.0, mine=1.4, samples=4)[-1] == 1
    assert share.free is not None and 0.9 < share.free < 1.1
    # Half a core of other work (srt's HTTP process, say) is inside the margin either way.
    assert run(others=0.5, mine=1.0, samples=4)[-1] == 1
    assert run(others=0.0, mine=1.0, samples=4)[-1] == 2
    assert run(others=0.5, mine=1.5, samples=4)[-1] == 2


def test_fixed_threads_and_a_single_thread_never_sample() -> None:
    calls = []

    def read(cpus: object) -> tuple[int, int, int]:
        calls.append(cpus)
        return 0, 0, 4

    assert not CoreShare(4, fixed=True, read=read).dynamic
    assert not CoreShare(1, read=read).dynamic
    assert CoreShare(4, fixed=True, read=read).threads() == 4
    assert calls == []
    # Where /proc/stat cannot be read, the team keeps its size.
    unreadable = CoreShare(4, read=lambda cpus: None)
    assert not unreadable.dynamic and unreadable.threads() == 4


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")
def test_read_proc_stat() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    first = read_proc_stat(cpus)
    assert first is not None
    busy, total, found = first
    assert 0 <= busy <= total
    assert found == len(cpus)
    assert read_proc_stat([10**6]) is None  # no such core


@pytest.mark.skipif(
    not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two cores",
)
def test_a_real_busy_process_takes_a_thread_from_the_team() -> None:
    cores = len(os.sched_getaffinity(0))
    share = CoreShare(cores)
    assert share.dynamic
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]
    try:
        deadline = time.monotonic() + 10
        while share.threads() == cores and time.monotonic() < deadline:
            time.sleep(0.05)
        assert share.threads() < cores, share.free
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    share.close()
    assert share._thread is None
