"""Throughput of the default CPU model alone and beside a busy process, per thread setting.

For each setting (environment and Engine arguments), one subprocess starts an `srt.Engine` on
the default model (SmolLM2-135M-Instruct, fp32, CPU), warms it up, and times two greedy
workloads: one user (1 prompt x `--output-len` tokens) and `--users` concurrent prompts (x
`--output-len` / 2 tokens), every prompt `--input-len` random token ids, `ignore_eos`. Each
setting runs twice: alone, and beside `--busy` CPU-bound processes (a Python busy loop each,
started before the Engine and killed after), which is what a shared machine or a laptop with
other work looks like. The table gives output tok/s and the slowdown (alone / busy): medians
over `--repeat` runs, which alternate alone and busy (the VM's speed drifts by +-15% between
runs), and each run's own slowdown.

    python benches/cpu_threads.py                       # the settings below
    python benches/cpu_threads.py --settings default    # one of them
    python benches/cpu_threads.py --settings default fixed --repeat 3   # medians of 3 runs

Settings (environment of the Engine's process, which its children inherit):
- `default`: nothing set: what `srt.Engine()` does on its own (`srt.cpu_threads`: threads =
  the usable cores, children started with `GOMP_SPINCOUNT=2000`; `srt.cpu_share`: a native
  step runs on the cores other processes leave free);
- `fixed`: `fixed_threads=True`: every native step on all the threads, whatever else runs
  (srt before `srt.cpu_share`);
- `spin300k`: `GOMP_SPINCOUNT=300000`, libgomp's default spin when no wait policy is set: what
  srt did before it set one (srt leaves a user's OpenMP wait settings alone);
- `spin10k`, `passive`: a longer spin (`GOMP_SPINCOUNT=10000`), no spin
  (`OMP_WAIT_POLICY=PASSIVE`);
- `one-thread`: `OMP_NUM_THREADS=1` (one torch thread in the scheduler).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS: dict[str, tuple[dict[str, str], dict[str, object]]] = {
    "default": ({}, {}),
    "fixed": ({}, {"fixed_threads": True}),
    # libgomp's own default when OMP_WAIT_POLICY is unset (srt leaves a user's setting alone).
    "spin300k": ({"GOMP_SPINCOUNT": "300000"}, {}),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, {}),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    "one-thread": ({"OMP_NUM_THREADS": "1"}, {}),
}


def worker(spec_path: str, out_path: str) -> None:
    """In the subprocess: one Engine, a warm-up, then the two timed workloads."""
    import srt

    spec = json.loads(Path(spec_path).read_text())
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(100, 40000) for _ in range(spec["input_len"])] for _ in range(n)]

    result = {}
    with srt.Engine(log_level="warning", **spec["engine_kwargs"]) as engine:
        base = {"temperature": 0.0, "ignore_eos": True}
        engine.generate(None, {**base, "max_new_tokens": 4}, input_ids=prompts(2))
        for name, n, out_len in (
            ("one user", 1, spec["output_len"]),
            (f"{spec['users']} users", spec["users"], spec["output_len"] // 2),
        ):
            params = {**base, "max_new_tokens": out_len}
            t = time.perf_counter()
            outs = engine.generate(None, params, input_ids=prompts(n))
            took = time.perf_counter() - t
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            result[name] = tokens / took
    Path(out_path).write_text(json.dumps(result))


def run(setting: str, busy: int, args: argparse.Namespace) -> dict[str, float]:
    env_extra, engine_kwargs = SETTINGS[setting]
    env = {**os.environ, **env_extra}
    spec = {
        "engine_kwargs": engine_kwargs,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "users": args.users,
    }
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [sys.executable, __file__, "_worker", str(spec_path), str(out_path)]
            subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
            return json.loads(out_path.read_text())
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside it.")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Runs of every setting, alone and busy in turn; the table gives medians.",
    )
    args = parser.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}; busy processes beside: {args.busy}")
    runs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {
        s: [] for s in args.settings
    }
    for _ in range(args.repeat):
        for setting in args.settings:
            runs[setting].append((run(setting, 0, args), run(setting, args.busy, args)))
    print("| setting | workload | alone tok/s | busy tok/s | slowdown | slowdown per run |")
    print("|---|---|---:|---:|---:|---|")
    for setting, pairs in runs.items():
        for workload in pairs[0][0]:
            alone = statistics.median(a[workload] for a, _ in pairs)
            busy = statistics.median(b[workload] for _, b in pairs)
            each = ", ".join(f"{a[workload] / b[workload]:.2f}" for a, b in pairs)
            print(
                f"| {setting} | {workload} | {alone:.1f} | {busy:.1f} | {alone / busy:.2f}x "
                f"| {each} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
