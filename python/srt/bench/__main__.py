"""Command line of the benchmarks: `python -m srt.bench {serving,one-batch,offline} ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

# subcommand -> (module, one-line help); modules load lazily so `serving` never imports torch.
COMMANDS = {
    "serving": ("srt.bench.serving", "Load-test a running OpenAI-compatible server."),
    "one-batch": ("srt.bench.one_batch", "Prefill/decode latency of one batch, no server."),
    "offline": ("srt.bench.offline", "Offline Engine throughput over a dataset."),
}


def _module(name: str) -> Any:
    import importlib

    return importlib.import_module(COMMANDS[name][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's arguments are built (each builder
    imports its module, and one-batch/offline import torch through ServerArgs' neighbours)."""
    parser = argparse.ArgumentParser(prog="python -m srt.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            _module(name).add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    run: Callable[[argparse.Namespace], Any] = _module(args.command).run
    try:
        run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
