"""Where a decode step of the Scheduler spends its time: the model's forward, or the host.

Runs a Scheduler in this process (no server, no detokenizer: its output socket is drained
here), fills it with `--batch` requests of `--input-len` random tokens, lets them reach decode,
then times `--steps` decode steps and reports per step: the wall time, the time inside
`ModelRunner.forward` up to the device being done (timed with a synchronize), and the rest,
the host time: planning, building the step's tensors, sampling, committing the tokens, the
output message. Steps run without overlap so the split is exact (with overlap, host work runs
beside the forward; `--overlap` times that too). Without `--model-path` it builds the nearly
free model the step-path goal is measured on: a 1-layer, 64-wide llama (random weights).

It drives the scheduler of whichever tree is on the path, the current one or the one before
the step-path rework (its `TokenizedGenerateReqInput` API), so `benches/step_path.py` runs it
against both in one run.

    python benches/profile_scheduler.py --batch 1 64 256
    python benches/profile_scheduler.py --model-path /tmp/llama8b --load-format dummy \\
        --dtype bfloat16 --batch 256 --input-len 256 --steps 60 --cprofile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import multiprocessing
import pstats
import random
import tempfile
import time
from typing import Any

import torch
import zmq

from srt.managers import io_struct
from srt.managers.scheduler import Scheduler
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs

# The rework replaced TokenizedGenerateReqInput (string rid) by GenerateReq (integer id).
NEW_API = hasattr(io_struct, "GenerateReq")


def request(i: int, ids: list[int], params: SamplingParams) -> Any:
    if NEW_API:
        return io_struct.GenerateReq(id=i + 1, input_ids=ids, sampling_params=params)
    return io_struct.TokenizedGenerateReqInput(rid=f"r{i}", input_ids=ids, sampling_params=params)


def decoding(sched: Scheduler) -> bool:
    return sched.run_step() == "decode"


def measure(args: argparse.Namespace, batch: int, overlap: bool) -> dict[str, float]:
    fields = {}
    if NEW_API:
        fields = {"disable_overlap_schedule": not overlap, "enable_overlap_on_cpu": overlap}
    server_args = ServerArgs.from_cli_args(args).replace(**fields)
    port_args = PortArgs.new()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(port_args.detokenizer_ipc)
    sched = Scheduler(server_args, port_args)
    rng = random.Random(0)
    n_out = args.steps + 8
    vocab = min(1000, sched.vocab_size)
    for i in range(batch):
        ids = [rng.randrange(3, vocab) for _ in range(args.input_len)]
        # Default: temperature 1.0, no filters (a sampled, not a greedy, step).
        params = SamplingParams(
            max_new_tokens=n_out,
            min_new_tokens=n_out,
            ignore_eos=True,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        sched.add_request(request(i, ids, params))

    def drain() -> None:
        while True:
            try:
                pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    while not decoding(sched):  # prefill everything
        drain()
    for _ in range(3):
        sched.run_step()
        drain()

    runner = sched.runner
    # NOTE: the torch-free NativeRunner (a CPU model with a native bundle) has forward_host
    # alone; the ModelRunner's forward_host calls its forward.
    name = "forward" if hasattr(runner, "forward") else "forward_host"
    forward = getattr(runner, name)
    in_forward = [0.0]

    def timed_forward(fb: Any) -> Any:
        t = time.perf_counter()
        out = forward(fb)
        if getattr(out, "is_cuda", False):
            torch.cuda.synchronize()
        in_forward[0] += time.perf_counter() - t
        return out

    # NOTE: with overlap the forward runs on the step worker, where a sync would stop the very
    # overlap being timed; only the step time is reported then.
    if not overlap:
        setattr(runner, name, timed_forward)
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    for _ in range(args.steps):
        kind = sched.run_step()
        assert kind == "decode", kind
        drain()
    if prof is not None:
        prof.disable()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    sched.close()
    pull.close(linger=0)
    ctx.term()
    port_args.cleanup()
    # Free this scheduler's weights and KV pool before the next one sizes its own: the
    # patched forward (and, on CUDA, the graph runner) hold the runner in reference cycles,
    # and torch's allocator keeps freed blocks from mem_get_info.
    if not overlap:
        delattr(runner, name)  # the instance attribute: the class's method again
    del runner, sched
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"step": wall, "forward": in_forward[0] / args.steps * 1e3}


def measured(args: argparse.Namespace, batch: int, overlap: bool) -> dict[str, float]:
    """`measure` in a process of its own on a GPU: a scheduler there holds most of the GPU's
    memory (weights, a KV pool sized to what is free, CUDA graph pools), which is not all
    returned in-process before the next one sizes its own."""
    if not torch.cuda.is_available():
        return measure(args, batch, overlap)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (args, batch, overlap))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--overlap", action="store_true", help="Also time the steps with overlap scheduling."
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="Of every request (0: greedy steps)."
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="Of every request.")
    parser.add_argument("--cprofile", action="store_true", help="Print a cProfile listing.")
    parser.add_argument("--top", type=int, default=25)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args()
    if args.model_path is None:
        from srt.testing.tiny_model import make_tiny_model

        args.model_path = make_tiny_model(
            tempfile.mkdtemp(prefix="srt-profile-"), "llama", num_layers=1, hidden_size=64
        )
    for batch in args.batch:
        m = measured(args, batch, overlap=False)
        host = m["step"] - m["forward"]
        line = (
            f"batch {batch}: step {m['step']:.2f} ms = forward (to device done) "
            f"{m['forward']:.2f} ms + host {host:.2f} ms  [{batch / m['step'] * 1e3:.0f} tok/s]"
        )
        if args.overlap and NEW_API:
            line += f"; with overlap: step {measured(args, batch, overlap=True)['step']:.2f} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
