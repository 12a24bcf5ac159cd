"""Benchmark metrics: per-request timings in, summary numbers, tables and JSON records out.

Pure functions over plain data, so they are tested on synthetic timings without a server.
Definitions (all per request, then summarized over successful requests):
- TTFT: send -> first streamed chunk carrying output.
- ITL: the gap between consecutive output chunks, spread evenly over the tokens the later chunk
  carries (a chunk of k tokens after a gap g counts as k latencies of g / k).
- TPOT: (e2e - TTFT) / (output tokens - 1), for requests with more than one output token.
- E2E: send -> last byte of the response.
Throughputs divide total tokens by the benchmark's duration (first send -> last completion).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    success: bool
    prompt_len: int  # prompt tokens (the server's count when it reports one)
    output_len: int = 0  # generated tokens (the server's count when it reports one)
    send_time: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, end to end
    chunk_times: list[float] = field(default_factory=list)  # seconds since send, per chunk
    chunk_tokens: list[int] = field(default_factory=list)  # output tokens in each chunk
    chunk_texts: list[str] = field(default_factory=list)  # text of each chunk
    error: str = ""

    @property
    def text(self) -> str:
        return "".join(self.chunk_texts)

    @property
    def itl(self) -> list[float]:
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            k = max(1, self.chunk_tokens[i]) if i < len(self.chunk_tokens) else 1
            out.extend([(self.chunk_times[i] - self.chunk_times[i - 1]) / k] * k)
        return out

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean / median / p90 / p99 / std / max of `values` times `scale`; None when empty."""
    keys = ("mean", "median", "p90", "p99", "std", "max")
    if len(values) == 0:
        return dict.fromkeys(keys)
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return {
        "mean": float(a.mean()),
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "std": float(a.std()),
        "max": float(a.max()),
    }


def serving_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """The summary of one serving run; latencies in milliseconds, throughputs per second."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        # Little's law: the mean number of requests in flight over the run.
        "concurrency": sum(r.latency for r in ok) / duration,
    }
    per_request = {
        "ttft_ms": [r.ttft for r in ok],
        "tpot_ms": [t for r in ok if (t := r.tpot) is not None],
        "itl_ms": [x for r in ok for x in r.itl],
        "e2e_latency_ms": [r.latency for r in ok],
    }
    for name, values in per_request.items():
        for stat, v in summarize(values, scale=1000.0).items():
            m[f"{stat}_{name}"] = v
    errors = sorted({r.error for r in results if not r.success and r.error})
    m["errors"] = errors[:10]
    return m


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return str(v)


def format_table(title: str, rows: Sequence[tuple[str, Any]], width: int = 50) -> str:
    """A two-column table: `title` centered in a rule, one `label value` line per row; a row
    whose value is `...` is a section heading."""
    lines = [f" {title} ".center(width, "=")]
    for label, value in rows:
        if value is ...:
            lines.append(f" {label} ".center(width, "-"))
        else:
            lines.append(f"{label:<{width - 14}}{_fmt(value):>14}")
    lines.append("=" * width)
    return "\n".join(lines)


def serving_table(m: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Benchmark duration (s):", m["duration_s"]),
        ("Total input tokens:", m["total_input_tokens"]),
        ("Total generated tokens:", m["total_output_tokens"]),
        ("Request throughput (req/s):", m["request_throughput"]),
        ("Input token throughput (tok/s):", m["input_throughput"]),
        ("Output token throughput (tok/s):", m["output_throughput"]),
        ("Total token throughput (tok/s):", m["total_token_throughput"]),
        ("Concurrency:", m["concurrency"]),
    ]
    for name, title in (
        ("e2e_latency_ms", "End-to-End Latency"),
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-Token Latency"),
    ):
        rows.append((title, ...))
        unit = name.rsplit("_", 1)[1]
        short = name.split("_")[0].upper()
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            rows.append((f"{label} {short} ({unit}):", m[f"{stat}_{name}"]))
    return format_table("Serving Benchmark Result", rows)


def make_record(tool: str, args: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """One JSON record: when, which tool, the run's arguments, then every metric."""
    arg_dict = {k: _json_arg(v) for k, v in vars(args).items() if not callable(v)} if args else {}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": tool,
        "args": arg_dict,
        **metrics,
    }


def _json_arg(v: Any) -> Any:
    # JSON has no infinity (--request-rate inf): keep such values readable as strings.
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Appends `record` as one line, so repeated runs accumulate in one file."""
    # NOTE: allow_nan=False: a NaN in a record is a bug upstream, and invalid JSON downstream.
    line = json.dumps(record, allow_nan=False, default=str)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
