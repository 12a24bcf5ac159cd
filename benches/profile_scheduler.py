"""Where a decode step of the Scheduler spends its time: the model (GPU) or the host.

Runs a Scheduler in this process (no server, no detokenizer: its output socket is drained
here), fills it with `--batch` requests of `--input-len` random tokens, then profiles
`--steps` decode steps with cProfile and reports per step: the wall time, the time inside
`ModelRunner.forward` up to the device being done (timed with a synchronize), and the rest
(host: planning, batch building, sampling bookkeeping, output messages).

    python benches/profile_scheduler.py --model-path /tmp/llama8b --load-format dummy \
        --batch 256 --input-len 256 --steps 60
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import zmq

from srt.managers.io_struct import TokenizedGenerateReqInput
from srt.managers.scheduler import Scheduler
from srt.sampling_params import SamplingParams
from srt.server_args import PortArgs, ServerArgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--top", type=int, default=25)
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args()
    server_args = ServerArgs.from_cli_args(args)
    port_args = PortArgs.new()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(port_args.detokenizer_ipc)
    sched = Scheduler(server_args, port_args)
    gen = torch.Generator().manual_seed(0)
    n_out = args.steps + 8
    for i in range(args.batch):
        ids = torch.randint(
            3, min(1000, sched.vocab_size), (args.input_len,), generator=gen
        ).tolist()
        params = SamplingParams(max_new_tokens=n_out, min_new_tokens=n_out, ignore_eos=True)
        sched.add_request(
            TokenizedGenerateReqInput(rid=f"r{i}", input_ids=ids, sampling_params=params)
        )

    def drain() -> None:
        while True:
            try:
                pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    while sched.run_step() != "decode":  # prefill everything
        drain()
    for _ in range(3):
        sched.run_step()
        drain()

    runner = sched.runner
    forward = runner.forward
    in_forward = [0.0]

    def timed_forward(batch):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        out = forward(batch)
        if out.is_cuda:
            torch.cuda.synchronize()
        in_forward[0] += time.perf_counter() - t
        return out

    runner.forward = timed_forward  # type: ignore[method-assign]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        kind = sched.run_step()
        assert kind == "decode", kind
        drain()
    prof.disable()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    fwd = in_forward[0] / args.steps * 1e3
    print(
        f"batch {args.batch}: step {wall:.2f} ms = forward (to device done) {fwd:.2f} ms + "
        f"host {wall - fwd:.2f} ms  [{args.batch / wall * 1e3:.0f} tok/s]"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    pstats.Stats(prof).sort_stats("cumtime").print_stats(args.top)
    sched.close()
    pull.close(linger=0)
    ctx.term()
    port_args.cleanup()


if __name__ == "__main__":
    main()
