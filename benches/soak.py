"""Soak benchmark: minutes of mixed traffic with random client disconnects against one server.

    python benches/soak.py --duration 5                  # starts a server on a tiny model
    python benches/soak.py --model-path MODEL            # starts a server on MODEL
    python benches/soak.py --base-url http://HOST:PORT   # an already running server

Each of `--concurrency` workers sends requests back to back until `--duration` minutes have
passed: /v1/completions or /v1/chat/completions, streaming or not, and with probability
`--disconnect-prob` it drops the connection early (a stream after a few chunks, a non-stream
request after a short random wait). It reports requests served, errors by kind, latency
percentiles of completed requests, the RSS of the server's processes (main + children, from
/proc) and its KV accounting (the scheduler's `kv idle` debug line) before and after. RSS and KV
need a server started here (or `--server-pid` for RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _server import launch

KV_LINE = re.compile(r"kv idle: (.*)")
PROMPTS = [
    "Tell me about the sea",
    "Write a short poem about autumn leaves",
    "What is the capital of France?",
    "List three colors",
    "Explain how a bicycle works in simple words",
    "Once upon a time",
]


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip())
        children[ppid].append(int(entry.name))
        vm = fields.get("VmRSS", "0 kB").split()
        rss[int(entry.name)] = int(vm[0]) * 1024 if vm else 0
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def kv_report(log: Path | None) -> dict[str, int] | None:
    if log is None:
        return None
    found = KV_LINE.findall(log.read_text(errors="replace"))
    if not found:
        return None
    return {k: int(v) for k, v in (kv.split("=") for kv in found[-1].split())}


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    model = args.model_path
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
        from srt.testing.tiny_model import make_tiny_model

        model = make_tiny_model(workdir / "tiny-llama", "llama")
    log = workdir / "server.log"
    flags = ["--model-path", model, "--log-level", "debug", *args.server_args]
    proc, base = launch(flags, log)
    return proc, base, log


class Stats:
    def __init__(self) -> None:
        self.served = 0
        self.disconnected = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.by_kind: collections.Counter[str] = collections.Counter()


async def one_request(
    c: httpx.AsyncClient, rng: random.Random, args: argparse.Namespace, stats: Stats
) -> None:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    drop = rng.random() < args.disconnect_prob
    prompt = rng.choice(PROMPTS)
    body: dict[str, Any] = {
        "max_tokens": rng.randint(1, args.max_tokens),
        "temperature": rng.choice([0.0, 0.7]),
        "stream": stream,
    }
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    kind = f"{'chat' if chat else 'completion'}{'-stream' if stream else ''}"
    stats.by_kind[kind] += 1
    t0 = time.perf_counter()
    try:
        if stream:
            async with c.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats.errors[f"http {r.status_code}"] += 1
                    return
                chunks, stop_after = 0, rng.randint(1, 4)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    if '"error"' in line:
                        stats.errors["stream error event"] += 1
                        return
                    chunks += 1
                    if drop and chunks >= stop_after:
                        stats.disconnected += 1
                        return  # leaving the block closes the connection
        else:
            coro = c.post(path, json=body)
            if drop:
                try:
                    await asyncio.wait_for(coro, timeout=rng.uniform(0.01, 0.2))
                except asyncio.TimeoutError:
                    stats.disconnected += 1
                    return
                r = None
            else:
                r = await coro
            if r is not None and r.status_code != 200:
                stats.errors[f"http {r.status_code}"] += 1
                return
    except httpx.HTTPError as e:
        stats.errors[type(e).__name__] += 1
        return
    stats.served += 1
    stats.latencies.append(time.perf_counter() - t0)


async def run_load(base: str, args: argparse.Namespace) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + args.duration * 60

    async def worker(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            while time.monotonic() < deadline:
                await one_request(c, rng, args, stats)

    await asyncio.gather(*[worker(i) for i in range(args.concurrency)])
    return stats


def wait_idle(log: Path | None, after: int, timeout: float = 30.0) -> dict[str, int] | None:
    """The scheduler's KV report once it is idle again (a new `kv idle` line after `after`)."""
    if log is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(KV_LINE.findall(log.read_text(errors="replace"))) > after:
            return kv_report(log)
        time.sleep(0.2)
    return None


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="minutes of load (default 5)")
    ap.add_argument("--base-url", help="an already running server (no RSS/KV unless given)")
    ap.add_argument("--server-pid", type=int, help="with --base-url: whose RSS to report")
    ap.add_argument("--model-path", help="model for the server started here (default: tiny)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--disconnect-prob", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-file", help="append one JSON record of the run")
    ap.add_argument(
        "--server-args",
        nargs=argparse.REMAINDER,
        default=["--max-total-tokens", "2048"],
        help="extra `srt serve` flags (last; default: --max-total-tokens 2048)",
    )
    args = ap.parse_args()

    proc = None
    log: Path | None = None
    workdir = Path(tempfile.mkdtemp(prefix="srt-soak-"))
    if args.base_url:
        base, pid = args.base_url.rstrip("/"), args.server_pid
    else:
        proc, base, log = start_server(args, workdir)
        pid = proc.pid
    try:
        # Warm up (one request of each kind) and take the baseline once idle.
        n_kv = len(KV_LINE.findall(log.read_text())) if log else 0
        httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        kv_before = wait_idle(log, n_kv)
        rss_before = rss_bytes(pid) if pid else None
        n_kv = len(KV_LINE.findall(log.read_text())) if log else 0
        t0 = time.monotonic()
        stats = asyncio.run(run_load(base, args))
        elapsed = time.monotonic() - t0
        kv_after = wait_idle(log, n_kv)
        rss_after = rss_bytes(pid) if pid else None
        healthy = httpx.get(base + "/health", timeout=5).status_code == 200
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            print(f"server exit code: {code}")

    mib = 1024 * 1024
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tool": "soak",
        "args": {k: v for k, v in vars(args).items()},
        "elapsed_s": round(elapsed, 1),
        "requests_served": stats.served,
        "requests_disconnected": stats.disconnected,
        "requests_by_kind": dict(stats.by_kind),
        "errors": dict(stats.errors),
        "latency_p50_s": round(percentile(stats.latencies, 50), 4),
        "latency_p99_s": round(percentile(stats.latencies, 99), 4),
        "rss_before_mib": round(rss_before / mib, 1) if rss_before else None,
        "rss_after_mib": round(rss_after / mib, 1) if rss_after else None,
        "kv_before": kv_before,
        "kv_after": kv_after,
        "healthy_after": healthy,
    }
    print(f"soak: {elapsed:.0f} s, {args.concurrency} workers, disconnect p={args.disconnect_prob}")
    print(f"  served {stats.served} requests ({stats.served / elapsed:.1f}/s), ", end="")
    print(f"disconnected {stats.disconnected}, by kind {dict(stats.by_kind)}")
    print(f"  errors: {dict(stats.errors) or 'none'}")
    print(f"  latency of completed requests: p50 {record['latency_p50_s']} s, ", end="")
    print(f"p99 {record['latency_p99_s']} s")
    print(f"  RSS (server + children): {record['rss_before_mib']} MiB -> ", end="")
    print(f"{record['rss_after_mib']} MiB")
    print(f"  KV before: {kv_before}")
    print(f"  KV after:  {kv_after}")
    print(f"  healthy after: {healthy}")
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    leaked = kv_after is not None and (kv_after["request_owned"] or kv_after["protected"])
    return 1 if stats.errors or leaked or not healthy else 0


if __name__ == "__main__":
    sys.exit(main())
