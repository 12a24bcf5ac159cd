"""Benchmarks: `python -m srt.bench serving | one-batch | offline`.

- serving: a load-testing client for any OpenAI-compatible server (TTFT, ITL, TPOT, E2E,
  throughputs; progress bar, JSON records, plots).
- one-batch: prefill and decode latency of one static batch through the ModelRunner alone.
- offline: throughput of the offline Engine over a dataset submitted at once.
Each lives in its own module; `datasets`, `metrics` and `plot` are shared.
"""
