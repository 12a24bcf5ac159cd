"""Plots of a serving run: latency distributions and output throughput over time.

Runs in the benchmark client after the run. In: per-request results. Out: one PNG with
histograms of TTFT, TPOT, ITL and end-to-end latency, and output tokens per second in 1 s bins
(with requests in flight over the same time axis). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from srt.bench.metrics import RequestResult


def throughput_bins(
    results: Sequence[RequestResult], duration: float, bin_s: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, output tokens per second in each bin): every chunk's tokens land in
    the bin of the moment the client received it; the last, partial bin is divided by its own
    width, so a run's tail does not look like a throughput collapse."""
    n_bins = max(1, math.ceil(duration / bin_s))
    tokens = np.zeros(n_bins)
    for r in results:
        if not r.success:
            continue
        for t, k in zip(r.chunk_times, r.chunk_tokens, strict=True):
            i = min(int((r.send_time + t) / bin_s), n_bins - 1)
            tokens[i] += k
    starts = np.arange(n_bins) * bin_s
    widths = np.minimum(bin_s, duration - starts)
    return starts, tokens / np.where(widths > 0, widths, bin_s)


def in_flight(results: Sequence[RequestResult], times: np.ndarray) -> np.ndarray:
    """Requests in flight at each of `times`."""
    ok = [r for r in results if r.success]
    starts = np.array([r.send_time for r in ok])
    ends = np.array([r.send_time + r.latency for r in ok])
    return np.array([int(np.sum((starts <= t) & (ends > t))) for t in times])


def require_matplotlib() -> None:
    """Raises ValueError saying what to install when matplotlib is missing (checked before a
    run, so a long run is not lost at its end)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "--plot needs matplotlib: pip install 'srt[bench]' (or pip install matplotlib)"
        ) from e


def plot_serving(
    results: Sequence[RequestResult], duration: float, path: str | Path, title: str = ""
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    series = [
        ("TTFT (ms)", [r.ttft * 1000 for r in ok]),
        ("TPOT (ms)", [t * 1000 for r in ok if (t := r.tpot) is not None]),
        ("ITL (ms)", [x * 1000 for r in ok for x in r.itl]),
        ("E2E latency (s)", [r.latency for r in ok]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (label, values) in zip(axes.flat[:4], series, strict=True):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "-"), (99, "--")):
                v = float(np.percentile(values, q))
                ax.axvline(v, color="tab:red", linestyle=style, label=f"p{q} {v:.3g}")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    starts, tok_s = throughput_bins(results, duration)
    ax = axes.flat[4]
    ax.stairs(tok_s, np.append(starts, max(duration, starts[-1] + 1e-9)), color="tab:green")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens/s (1 s bins)")
    ax = axes.flat[5]
    grid = np.linspace(0.0, duration, 500)
    ax.plot(grid, in_flight(results, grid), color="tab:purple")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests in flight")
    fig.suptitle(f"{title}  ({len(ok)}/{len(results)} ok, {duration:.1f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
