"""The `srt` command line: `python -m srt <command>` or the `srt` console script.

Commands: `serve` (the OpenAI-compatible HTTP server; its flags are ServerArgs' fields),
`router` (a cache-aware HTTP router over several servers, srt.entrypoints.router_server) and
`bench` (the benchmark tools of `srt.bench`). Each
command registers itself in `COMMANDS` with a function that adds its parser, so more commands
(e.g. `bench`) plug in without touching the others.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable

from srt.server_args import ServerArgs
from srt.version import __version__


def _serve(args: argparse.Namespace) -> int:
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ValueError as e:
        print(f"srt serve: error: {e}", file=sys.stderr)
        return 2
    from srt.entrypoints.serve import launch_server

    return launch_server(server_args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="Run the OpenAI-compatible HTTP server.",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, "
        "/v1/models, /generate and /health.",
    )
    ServerArgs.add_cli_args(p)
    p.set_defaults(func=_serve, command_parser=p)


def _bench(args: argparse.Namespace) -> int:
    from srt.bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="Benchmarks: serving, one-batch, offline (same as `python -m srt.bench`).",
        add_help=False,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)


def _router(args: argparse.Namespace) -> int:
    from srt.entrypoints.router_args import args_from_cli
    from srt.entrypoints.router_server import run_router

    try:
        router_args = args_from_cli(args)
    except ValueError as e:
        print(f"srt router: error: {e}", file=sys.stderr)
        return 2
    return run_router(router_args)


def _add_router(sub: argparse._SubParsersAction) -> None:
    from srt.entrypoints.router_args import add_cli_args

    p = sub.add_parser(
        "router",
        help="Route requests over several srt servers (cache-aware).",
        description="An HTTP router in front of srt servers: /v1/completions, "
        "/v1/chat/completions, /generate (streams included), /v1/models, /health, /workers. "
        "Requests go to the server most likely to hold their prefix in its cache, or the "
        "least loaded one when load is uneven.",
    )
    add_cli_args(p)
    p.set_defaults(func=_router, command_parser=p)


# name -> function adding the command's subparser (which sets `func` to its handler).
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "serve": _add_serve,
    "bench": _add_bench,
    "router": _add_router,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srt", description="srt: an LLM serving runtime with a Rust core."
    )
    parser.add_argument("--version", action="version", version=f"srt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the bench tools own their whole argument list, --help included
        from srt.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:
        # NOTE: the command's own usage, not the top-level one, and the flag meant.
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(unknown_flags_message(command_parser, unknown))
    return int(args.func(args) or 0)


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`unrecognized arguments: ...`, with the closest known flag of each unknown one."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    return f"{message} ({'; '.join(hints)})" if hints else message


if __name__ == "__main__":
    sys.exit(main())
