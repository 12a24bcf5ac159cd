"""CoreShare: how many threads a CPU scheduler's next native step runs on, from the share of
its cores that other processes take.

The native step's team (srt-kernels' `team`) synchronizes its members between a step's
operations. When a busy process shares a core with one member, the kernel gives that core to
the other process for whole scheduler slices, and the rest of the team waits for the member's
chunk. On 2 cores beside one busy process, two threads ran a step 13-32% slower than one
(benches/RESULTS.md, `benches/cpu_threads.py`). So, as OpenMP's `OMP_DYNAMIC` sizes its teams
by the machine's load, a scheduler measures every `SAMPLE_S` how much of its cores (its
affinity mask) the rest of the machine uses: the busy time of those cores in /proc/stat (steal
included) minus this process's own CPU time. Its steps then run on the cores left free, at
least one and at most `--num-threads`; `--fixed-threads` keeps `--num-threads`.

The estimate spans the last `WINDOW` samples. A team of k threads changes only when the free
cores leave k +- `MARGIN`, so it does not flap on the ticks' rounding (/proc/stat counts in
1/100 s) or on the brief work of srt's own HTTP and detokenizer processes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

SAMPLE_S = 0.1
WINDOW = 2
MARGIN = 0.65

# (busy, total) clock ticks of the given cores, summed, and how many of them were found;
# None where none can be read.
TickReader = Callable[[Iterable[int]], "tuple[int, int, int] | None"]


def read_proc_stat(cpus: Iterable[int]) -> tuple[int, int, int] | None:
    """Busy and total clock ticks of `cpus` since boot, from /proc/stat (busy: everything but
    idle and iowait; guest time is already inside user time), and the number of those cores
    it lists (an offline core is not listed)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    found = 0
    try:
        with open("/proc/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        fields = [int(v) for v in rest.split()[:8]]
        if len(fields) < 4:
            return None
        t = sum(fields)
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy += t - idle
        total += t
        found += 1
    return (busy, total, found) if found else None


def usable_cpus() -> set[int]:
    """The ids of the cores this process may run on (the /proc/stat lines a share reads)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def decide(current: int, free: float, max_threads: int) -> int:
    """The team for `free` cores, moving from `current` only past the margin."""
    target = min(max_threads, max(1, int(free + 0.5)))
    if target > current and free > current + MARGIN:
        return target
    if target < current and free < current - MARGIN:
        return target
    return current


class CoreShare:
    """The team size of a scheduler's native steps (`threads()`), kept by a sampling thread
    while `dynamic`: more than one thread, no `--fixed-threads`, and a readable /proc/stat."""

    def __init__(
        self,
        max_threads: int,
        *,
        fixed: bool = False,
        read: TickReader = read_proc_stat,
        cpu_time: Callable[[], float] = time.process_time,
        start: bool = True,
    ) -> None:
        self.max_threads = max(1, max_threads)
        self._threads = self.max_threads
        self._cpus = sorted(usable_cpus())
        self._read = read
        self._cpu_time = cpu_time
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._samples: deque[tuple[int, int, int, float]] = deque(maxlen=WINDOW + 1)
        self.free: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dynamic = not fixed and self.max_threads > 1 and self._take() is not None
        if self.dynamic and start:
            # NOTE: the thread holds the share weakly: it ends with its owner or `close`.
            self._thread = threading.Thread(
                target=_sample_loop,
                args=(weakref.ref(self), self._stop),
                name="srt-core-share",
                daemon=True,
            )
            self._thread.start()

    def threads(self) -> int:
        """Threads for the next step."""
        return self._threads

    def describe(self) -> str:
        if self.dynamic:
            return f"up to {self.max_threads} (fewer while other processes take the cores)"
        return str(self.max_threads)

    def sample(self) -> None:
        """Takes one sample and updates the team (the sampling thread calls it)."""
        if self._take() is None or len(self._samples) < 2:
            return
        (b0, t0, n0, c0), (b1, t1, cores, c1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or cores != n0:
            return
        others = max(0.0, (b1 - b0) - (c1 - c0) * self._hz)
        self.free = cores * (1.0 - min(1.0, others / (t1 - t0)))
        new = decide(self._threads, self.free, self.max_threads)
        if new != self._threads:
            logger.debug("steps on %d threads (%.2f of %d cores free)", new, self.free, cores)
            self._threads = new

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _take(self) -> tuple[int, int, int] | None:
        ticks = self._read(self._cpus)
        if ticks is not None:
            self._samples.append((*ticks, self._cpu_time()))
        return ticks


def _sample_loop(ref: weakref.ref[CoreShare], stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_S):
        share = ref()
        if share is None:
            return
        share.sample()
        del share
