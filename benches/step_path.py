"""The scheduler's step path, current code against a baseline commit, in one run.

Builds the baseline from git (its tree exported with `git archive`, its native module compiled
with cargo into a cache keyed by commit hash, so re-runs skip the build) and runs both code
trees in the same virtualenv, each in fresh subprocesses with `PYTHONPATH=<tree>/python`, on a
nearly free model (a random llama of 1 layer, hidden 64, vocab 512, fp32) so that what is timed
is the runtime around the model: scheduling, batch building, sampling, commit, outputs.

Subcommands (the code trees and the model are shared; `all` is the default):

- `offline`: Engine throughput. 256 requests of 32 random prompt tokens (fixed seed), exactly 64
  output tokens each, in one `Engine.generate` call after a small warm-up; two workloads,
  greedy and sampled (temperature 0.8, top_p 0.9, top_k 50, frequency_penalty 0.5, a seed per
  request). Output tok/s and the mean time per decode step (generate time / 64), the median of
  `--repeats` runs per (code, workload), old and new runs alternating. Greedy outputs of the
  new code must equal the baseline's, request by request, for at least `--min-identical` of
  the requests (0.98: the CPU decode attention now sums in another order than SDPA, so a
  near-tie may flip on some CPUs; every run here gave 256/256), and each code's repeats must
  agree exactly (exit code 1 if not).
- `host`: host time of a decode step at batch 1, 64, 256 (step wall time minus the model's
  forward: planning, tensors, sampling, commit, outputs), from this checkout's
  `benches/profile_scheduler.py` run against each tree's Scheduler (it speaks the API before
  and after the step-path rework; no profiler, steps without overlap), parsed from its
  `batch N: step X ms = forward ... + host Y ms` line.
- `all`: both.

Exit code: 0 when all ran and the checks passed; 1 when a check failed (too few identical
greedy outputs between old and new, or any difference between repeats of one code) or the host part of a tree failed; 2 when
an offline measurement failed. The logs of a failed run are kept (their folder is printed).

Every measurement runs with one torch thread (`OMP_NUM_THREADS=1` in the environment, which the
Engine's spawned scheduler inherits, and `torch.set_num_threads(1)` in the process itself).

    python benches/step_path.py --baseline 24de686             # all: offline + host
    python benches/step_path.py offline --repeats 5
    python benches/step_path.py host --host-batches 1 64 256
    python benches/step_path.py offline --new 24de686 --repeats 1   # baseline vs itself
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import re
import runpy
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "24de686"  # the last commit before the step-path rework
WORKTREE = "worktree"  # --new value: the working tree as it is, uncommitted changes included
MODEL_SHAPE: dict[str, Any] = dict(num_layers=1, hidden_size=64)  # vocab 512, fp32
# Sampling parameters per workload; the sampled one also gets `seed` per request.
WORKLOADS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "frequency_penalty": 0.5},
}
BUILT_MARKER = ".step_path_built"
HOST_SCRIPT = REPO / "benches" / "profile_scheduler.py"  # what `host` runs, for both trees


class RunFailed(RuntimeError):
    """A measurement subprocess failed, timed out or printed nothing usable."""


@dataclasses.dataclass(frozen=True)
class CodeTree:
    """One side of the comparison: where its `srt` package lives and what it is."""

    label: str  # "old" or "new"
    root: Path  # a checkout or exported tree (holds python/ and benches/)
    revision: str  # commit hash, or "worktree at HEAD <hash> (+N changed files)"

    @property
    def python_dir(self) -> Path:
        return self.root / "python"


# ---- code trees ------------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "srt" / "step_path"


def native_library(target_dir: Path) -> Path:
    """The cdylib cargo built for srt-py (`[lib] name = "_native"`)."""
    for name in ("lib_native.so", "lib_native.dylib", "_native.dll"):
        path = target_dir / "release" / name
        if path.exists():
            return path
    raise FileNotFoundError(f"no lib_native.so in {target_dir / 'release'} after the build")


def build_revision(rev: str, label: str, cache_dir: Path) -> CodeTree:
    """Exports `rev` to `cache_dir/trees/<hash>` and compiles its native module there, once per
    commit. Cargo builds into `cache_dir/cargo-target` (shared by all commits, so the crates
    compile once), never into the working tree's target/."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subject = git("log", "-1", "--format=%s", sha)
    subject = subject if len(subject) <= 72 else subject[:69] + "..."
    tree = CodeTree(label, cache_dir / "trees" / sha, f"{sha} ({subject})")
    if (tree.root / BUILT_MARKER).exists():
        print(f"[{label}] {sha[:10]}: cached build at {tree.root}", file=sys.stderr)
        return tree
    staging = tree.root.with_name(sha + ".partial")
    for stale in (staging, tree.root):
        if stale.exists():
            shutil.rmtree(stale)
    staging.mkdir(parents=True)
    print(f"[{label}] {sha[:10]}: exporting and building in {staging}", file=sys.stderr)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(staging)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    target = cache_dir / "cargo-target"
    env = {**os.environ, "CARGO_TARGET_DIR": str(target), "PYO3_PYTHON": sys.executable}
    t0 = time.perf_counter()
    subprocess.run(
        ["cargo", "build", "--release", "-p", "srt-py"], cwd=staging, env=env, check=True
    )
    shutil.copy2(native_library(target), staging / "python" / "srt" / "_native.abi3.so")
    staging.rename(tree.root)
    (tree.root / BUILT_MARKER).write_text(f"{sha}\n")
    print(f"[{label}] built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return tree


def worktree() -> CodeTree:
    """The working tree as it is (its python/, its already built _native module)."""
    head = git("rev-parse", "HEAD")
    changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    native = sorted((REPO / "python" / "srt").glob("_native*.so"))
    if not native:
        raise SystemExit(
            "the working tree has no built python/srt/_native*.so: run "
            "`maturin develop --release` first"
        )
    rust_sources = [p for p in (REPO / "rust").rglob("*") if p.suffix in (".rs", ".toml")]
    if rust_sources and max(p.stat().st_mtime for p in rust_sources) > native[0].stat().st_mtime:
        print(
            "warning: rust/ changed after python/srt/_native was built; the new code runs "
            "with a stale native module (`maturin develop --release` rebuilds it)",
            file=sys.stderr,
        )
    rev = f"worktree at HEAD {head} (+{len(changed)} changed files)"
    return CodeTree("new", REPO, rev)


def resolve_trees(args: argparse.Namespace) -> tuple[CodeTree, CodeTree]:
    cache_dir = Path(args.cache_dir)
    old = build_revision(args.baseline, "old", cache_dir)
    new = worktree() if args.new == WORKTREE else build_revision(args.new, "new", cache_dir)
    return old, new


# ---- subprocesses ----------------------------------------------------------------------------


def run_in_tree(tree: CodeTree, argv: list[str], log: Path, timeout: float) -> None:
    """Runs `python argv...` with only `tree`'s python/ on PYTHONPATH and one torch thread;
    stdout and stderr go to `log`. The command gets its own process group, killed whole if it
    outlives `timeout` (a hung Engine leaves its spawned scheduler and detokenizer behind
    otherwise). Exits with the log's tail if the command fails or times out."""
    env = {**os.environ, "PYTHONPATH": str(tree.python_dir)}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tree.root,
            start_new_session=True,
        )
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"(timed out after {timeout:.0f} s)"
        except KeyboardInterrupt:
            code = "(interrupted)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
            except ProcessLookupError:
                pass
            proc.wait()
    if code != 0:
        lines = log.read_text(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
        tail = "\n".join(lines[-40:])
        raise RunFailed(
            f"[{tree.label}] {log.name}: exit {code}: {last}\n"
            f"command: {shlex.join(argv)}\nlog {log}, last lines:\n{tail}"
        )


def worker_argv(*args: str) -> list[str]:
    return [str(Path(__file__).resolve()), "_worker", *args]


def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def worker_offline(spec_path: str, out_path: str) -> None:
    """In the subprocess: one Engine, a warm-up generate, then the timed generate."""
    one_torch_thread()
    import srt

    spec = json.loads(Path(spec_path).read_text())
    with srt.Engine(model_path=spec["model_path"], **spec["engine_kwargs"]) as engine:
        engine.generate(None, spec["warmup_params"], input_ids=spec["warmup_prompts"])
        t0 = time.perf_counter()
        outs = engine.generate(None, spec["params"], input_ids=spec["prompts"])
        duration = time.perf_counter() - t0
    result = {
        "srt_file": srt.__file__,
        "duration_s": duration,
        "completion_tokens": [o["meta_info"]["completion_tokens"] for o in outs],
        "output_ids": [o["output_ids"] for o in outs],
    }
    Path(out_path).write_text(json.dumps(result))


def worker_host(script: str, script_args: list[str]) -> None:
    """In the subprocess: runs a profile script (as __main__) with one torch thread."""
    one_torch_thread()
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


# ---- the model -------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tree: CodeTree, work: Path) -> str:
    """The tiny model, built once (in a subprocess of the baseline tree, whose code is known to
    work); an existing --model-dir with a config.json is reused."""
    path = Path(args.model_dir) if args.model_dir else work / "model"
    if (path / "config.json").exists():
        return str(path)
    code = (
        "import sys; from srt.testing.tiny_model import make_tiny_model; "
        f"make_tiny_model(sys.argv[1], 'llama', **{MODEL_SHAPE!r})"
    )
    run_in_tree(tree, ["-c", code, str(path)], work / "make_model.log", timeout=600)
    return str(path)


def describe_model(path: str) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    shape = ", ".join(
        f"{key} {config.get(key)}" for key in ("num_hidden_layers", "hidden_size", "vocab_size")
    )
    dtype = config.get("dtype") or config.get("torch_dtype")
    return f"{path} ({config.get('model_type')}: {shape}, {dtype})"


# ---- offline ---------------------------------------------------------------------------------


def offline_spec(args: argparse.Namespace, model: str, workload: str) -> dict[str, Any]:
    """The requests of one workload, identical for both trees (prompts from a fixed seed)."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)
    ]
    length = {"max_new_tokens": args.output_len, "min_new_tokens": args.output_len}
    base = {**WORKLOADS[workload], **length, "ignore_eos": True}
    seeded = workload != "greedy"
    params = [
        {**base, "seed": args.seed + i} if seeded else dict(base) for i in range(len(prompts))
    ]
    warm = {**base, "max_new_tokens": 8, "min_new_tokens": 8}
    engine_kwargs: dict[str, Any] = {
        "max_total_tokens": args.max_total_tokens,
        "max_running_requests": args.num_requests,
        "log_level": "warning",
    }
    if args.device != "auto":
        engine_kwargs["device"] = args.device
    return {
        "model_path": model,
        "engine_kwargs": engine_kwargs,
        "prompts": prompts,
        "params": params,
        "warmup_prompts": prompts[:8],
        "warmup_params": [warm] * min(8, len(prompts)),
    }


def run_offline_once(
    args: argparse.Namespace, tree: CodeTree, spec_path: Path, work: Path, tag: str
) -> dict[str, Any]:
    out = work / f"offline-{tag}.json"
    argv = worker_argv("offline", str(spec_path), str(out))
    run_in_tree(tree, argv, work / f"offline-{tag}.log", args.timeout)
    res = json.loads(out.read_text())
    if not Path(res["srt_file"]).resolve().is_relative_to(tree.python_dir.resolve()):
        raise RunFailed(f"[{tree.label}] imported srt from {res['srt_file']}, not {tree.root}")
    short = sum(1 for n in res["completion_tokens"] if n != args.output_len)
    if short:
        raise RunFailed(f"[{tree.label}] {short} requests did not get {args.output_len} tokens")
    tokens = sum(res["completion_tokens"])
    res["tok_s"] = tokens / res["duration_s"]
    res["ms_step"] = res["duration_s"] / args.output_len * 1e3
    print(
        f"  {tag:<22} {res['duration_s']:7.2f} s  {res['tok_s']:9.0f} tok/s  "
        f"{res['ms_step']:7.2f} ms/step",
        file=sys.stderr,
    )
    return res


def compare_outputs(old: list[list[int]], new: list[list[int]]) -> tuple[int, str]:
    """How many requests have identical output ids, and a description of the first that
    does not."""
    same = sum(1 for a, b in zip(old, new, strict=True) if a == b)
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        if a != b:
            pos = next(
                (j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            return (
                same,
                f"request {i} first differs at output token {pos}: {a[pos : pos + 4]} "
                f"(old) vs {b[pos : pos + 4]} (new)",
            )
    return same, ""


def offline(
    args: argparse.Namespace, old: CodeTree, new: CodeTree, model: str, work: Path
) -> dict[str, Any]:
    """Alternating old/new runs of each workload; the medians, ratios and output checks."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    specs = {}
    for workload in WORKLOADS:
        specs[workload] = work / f"spec-{workload}.json"
        specs[workload].write_text(json.dumps(offline_spec(args, model, workload)))
    print(
        f"offline: {args.num_requests} requests x {args.prompt_len} prompt tokens -> "
        f"{args.output_len} output tokens, {args.repeats} repeats",
        file=sys.stderr,
    )
    for rep in range(args.repeats):
        order = (old, new) if rep % 2 == 0 else (new, old)  # alternate which goes first
        for workload in WORKLOADS:
            for tree in order:
                tag = f"{tree.label}-{workload}-{rep}"
                res = run_offline_once(args, tree, specs[workload], work, tag)
                runs.setdefault((tree.label, workload), []).append(res)
    summary: dict[str, Any] = {"workloads": {}, "failures": []}
    for workload in WORKLOADS:
        row: dict[str, Any] = {}
        for tree in (old, new):
            rs = runs[(tree.label, workload)]
            row[f"{tree.label}_tok_s"] = statistics.median(r["tok_s"] for r in rs)
            row[f"{tree.label}_ms_step"] = statistics.median(r["ms_step"] for r in rs)
            row[f"{tree.label}_tok_s_runs"] = [round(r["tok_s"], 1) for r in rs]
            # Same code, same seeds: every repeat must give the same outputs.
            for r in rs[1:]:
                same, diff = compare_outputs(rs[0]["output_ids"], r["output_ids"])
                if same != len(rs[0]["output_ids"]):
                    summary["failures"].append(
                        f"FAIL: {tree.label} {workload}: the repeats' outputs differ "
                        f"({same}/{len(rs[0]['output_ids'])} requests identical; {diff})"
                    )
        row["ratio"] = row["new_tok_s"] / row["old_tok_s"]
        reference = runs[("old", workload)][0]["output_ids"]
        same, diff = compare_outputs(reference, runs[("new", workload)][0]["output_ids"])
        row["identical"] = same
        row["first_difference"] = diff
        if workload == "greedy" and same < args.min_identical * len(reference):
            summary["failures"].append(
                f"FAIL: greedy outputs differ between old and new: {same}/{len(reference)} "
                f"requests identical; {diff}"
            )
        summary["workloads"][workload] = row
    return summary


def offline_table(summary: dict[str, Any], n: int) -> str:
    lines = [
        "| workload | old tok/s | new tok/s | new/old | old ms/step | new ms/step | "
        "outputs old = new |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, r in summary["workloads"].items():
        lines.append(
            f"| {workload} | {r['old_tok_s']:.0f} | {r['new_tok_s']:.0f} | {r['ratio']:.2f}x | "
            f"{r['old_ms_step']:.2f} | {r['new_ms_step']:.2f} | {r['identical']}/{n} |"
        )
    return "\n".join(lines)


# ---- host ------------------------------------------------------------------------------------

HOST_LINE = re.compile(
    r"batch\s+(?P<batch>\d+)\s*:.*?step\s+(?P<step>[\d.]+)\s*ms"
    r"(?:.*?forward[^=+\d]*?(?P<forward>[\d.]+)\s*ms)?"
    r"(?:.*?host\s+(?P<host>[\d.]+)\s*ms)?"
)


def parse_host_line(text: str) -> dict[str, float] | None:
    """The figures of a profile script's summary line, `batch N: step X ms = forward (to device
    done) F ms + host H ms [...]`: the last such line in `text`, or None. Only `batch` and
    `step` are required; `forward` and `host` are read when present (host = step - forward when
    only forward is). The one place that knows the line's format: if the profile script's
    output changes with the new scheduler, adapt this function."""
    matches = [m for line in text.splitlines() if (m := HOST_LINE.search(line))]
    if not matches:
        return None
    m = matches[-1]
    out = {"batch": float(m["batch"]), "step_ms": float(m["step"])}
    if m["forward"] is not None:
        out["forward_ms"] = float(m["forward"])
    if m["host"] is not None:
        out["host_ms"] = float(m["host"])
    elif "forward_ms" in out:
        out["host_ms"] = out["step_ms"] - out["forward_ms"]
    return out


def host_script(args: argparse.Namespace) -> Path:
    """The profile script both trees run: this checkout's, unless --host-script names one."""
    return Path(args.host_script) if args.host_script else HOST_SCRIPT


def run_host_once(
    args: argparse.Namespace, tree: CodeTree, model: str, batch: int, work: Path, tag: str
) -> dict[str, float]:
    script = host_script(args)
    script_args = ["--model-path", model, "--batch", str(batch)]
    script_args += ["--input-len", str(args.prompt_len), "--steps", str(args.host_steps)]
    script_args += ["--top", "0", "--max-total-tokens", str(args.max_total_tokens)]
    script_args += ["--log-level", "warning"]
    if args.device != "auto":
        script_args += ["--device", args.device]
    log = work / f"host-{tag}.log"
    run_in_tree(tree, worker_argv("host", str(script), *script_args), log, args.timeout)
    res = parse_host_line(log.read_text())
    if res is None:
        raise RunFailed(f"[{tree.label}] no 'batch N: step X ms ...' line in {log}")
    host_ms = cell(res.get("host_ms"), "7.2f")
    print(f"  {tag:<22} step {res['step_ms']:7.2f} ms  host {host_ms} ms", file=sys.stderr)
    return res


def host(
    args: argparse.Namespace, old: CodeTree, new: CodeTree, model: str, work: Path
) -> dict[str, Any]:
    """Per batch size: median step and host ms of each tree, old/new alternating. A tree whose
    profile script fails is reported as such and skipped from then on (the new scheduler may
    outgrow the script), without stopping the other tree's runs."""
    batches = " ".join(map(str, args.host_batches))
    print(
        f"host: decode steps at batch {batches}, {args.prompt_len}-token prompts, "
        f"{args.host_steps} profiled steps, {args.repeats} repeats",
        file=sys.stderr,
    )
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    errors: dict[str, str] = {}
    for rep in range(args.repeats):
        order = (old, new) if rep % 2 == 0 else (new, old)
        for batch in args.host_batches:
            for tree in order:
                if tree.label in errors:
                    continue
                tag = f"{tree.label}-bs{batch}-{rep}"
                try:
                    res = run_host_once(args, tree, model, batch, work, tag)
                except RunFailed as e:
                    print(e, file=sys.stderr)
                    errors[tree.label] = str(e).splitlines()[0]
                    continue
                runs.setdefault((tree.label, batch), []).append(res)
    rows: dict[int, dict[str, float | None]] = {}
    for batch in args.host_batches:
        row: dict[str, float | None] = {}
        for label in ("old", "new"):
            for key in ("step_ms", "host_ms"):
                values = [r[key] for r in runs.get((label, batch), []) if key in r]
                row[f"{label}_{key}"] = statistics.median(values) if values else None
        old_host, new_host = row["old_host_ms"], row["new_host_ms"]
        row["host_ratio"] = new_host / old_host if old_host and new_host is not None else None
        rows[batch] = row
    return {"batches": rows, "errors": errors}


def cell(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: the number, or "-" where there is none (a failed run)."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def host_table(summary: dict[str, Any]) -> str:
    lines = [
        "| batch | old step ms | new step ms | old host ms | new host ms | host new/old |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, r in summary["batches"].items():
        lines.append(
            f"| {batch} | {cell(r['old_step_ms'])} | {cell(r['new_step_ms'])} | "
            f"{cell(r['old_host_ms'])} | {cell(r['new_host_ms'])} | "
            f"{cell(r['host_ratio'], suffix='x')} |"
        )
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="all", choices=("offline", "host", "all"))
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help="The old code: a git revision (built)."
    )
    parser.add_argument(
        "--new",
        default=WORKTREE,
        help=f"The new code: '{WORKTREE}' (the working tree as it is) or a git revision (built, "
        "e.g. the baseline itself to check the plumbing).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per (code, measurement).")
    parser.add_argument("--model-dir", default=None, help="Where the tiny model is (or goes).")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="Built revisions.")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-identical",
        type=float,
        default=0.98,
        help="Fraction of greedy requests whose outputs must be identical in old and new. "
        "Not 1: the new CPU decode attention (srt-kernels) sums in another order than the "
        "old SDPA, so an argmax near-tie of the random model may flip on some CPUs. Each "
        "tree's own repeats must still agree exactly.",
    )
    parser.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool (tokens).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--host-batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--host-steps", type=int, default=32, help="Profiled decode steps.")
    parser.add_argument(
        "--host-script",
        default=None,
        help=f"The profile script both trees run (default: {HOST_SCRIPT.relative_to(REPO)}).",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="Seconds per subprocess (then killed)."
    )
    parser.add_argument("--keep-logs", action="store_true", help="Keep the run's logs and files.")
    parser.add_argument("--output-file", default=None, help="Append one JSON record of the run.")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:  # inside a measurement subprocess
        if argv[1] == "offline":
            worker_offline(argv[2], argv[3])
        else:
            worker_host(argv[2], argv[3:])
        return 0
    args = parse_args(argv)
    command_line = shlex.join([Path(sys.executable).name, *sys.argv])
    old, new = resolve_trees(args)
    work = Path(tempfile.mkdtemp(prefix="step_path-"))
    record: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tool": "step_path",
        "command": command_line,
        "args": vars(args),
        "old": old.revision,
        "new": new.revision,
    }
    failures: list[str] = []
    done = False
    try:
        model = build_model(args, old, work)
        record["model"] = describe_model(model)
        if args.command in ("offline", "all"):
            off = offline(args, old, new, model, work)
            failures += off.pop("failures")
            record["offline"] = off
        if args.command in ("host", "all"):
            record["host"] = host(args, old, new, model, work)
            for label, error in record["host"]["errors"].items():
                failures.append(f"FAIL: {label}: no host figures past this failure: {error}")
        done = True
    except RunFailed as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        if args.keep_logs or not done or failures:  # keep the logs of a failed run
            print(f"logs and outputs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"command: {command_line}")
    print(f"old: {old.revision}")
    print(f"new: {new.revision}")
    print(f"model: {record['model']}; one torch thread per process")
    if "offline" in record:
        print(
            f"\noffline: {args.num_requests} requests x {args.prompt_len} prompt tokens -> "
            f"{args.output_len} tokens, one generate call; median of {args.repeats}; "
            f"ms/step = time / {args.output_len}\n"
        )
        print(offline_table(record["offline"], args.num_requests))
    if "host" in record:
        print(
            f"\nhost: {host_script(args).name}, decode steps without overlap, host = step - "
            f"forward; {args.prompt_len}-token prompts, {args.host_steps} steps; median of "
            f"{args.repeats}\n"
        )
        print(host_table(record["host"]))
    for failure in failures:
        print(f"\n{failure}")
    if args.output_file:
        with open(args.output_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
