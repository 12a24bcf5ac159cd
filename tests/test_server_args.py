"""ServerArgs: CLI flags derived from the dataclass fields, validation, and PortArgs."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from srt.__main__ import build_parser, main
from srt.server_args import PortArgs, ServerArgs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def test_every_field_has_a_flag_with_help() -> None:
    p = _parser()
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    assert set(flags) == names
    for name, action in flags.items():
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.help, f"--{name} has no help"


def test_defaults_round_trip() -> None:
    args = ServerArgs.from_cli_args(_parser().parse_args([]))
    assert args == ServerArgs()


def test_flags_parse_to_typed_fields() -> None:
    ns = _parser().parse_args(
        [
            "--model-path",
            "/m",
            "--port",
            "8080",
            "--max-total-tokens",
            "4096",
            "--mem-fraction-static",
            "0.5",
            "--disable-radix-cache",
            "--schedule-policy",
            "lpm",
        ]
    )
    args = ServerArgs.from_cli_args(ns)
    assert args.model_path == "/m"
    assert args.port == 8080
    assert args.max_total_tokens == 4096
    assert args.mem_fraction_static == 0.5
    assert args.disable_radix_cache is True
    assert args.schedule_policy == "lpm"


@pytest.mark.parametrize(
    "flags",
    [
        ["--schedule-policy", "nope"],
        ["--port", "abc"],
        ["--dtype", "int3"],
        ["--kv-cache-dtype", "fp8"],
    ],
)
def test_bad_flag_values_are_rejected_by_argparse(flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(flags)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"port": 70000}, "--port"),
        ({"page_size": 0}, "--page-size"),
        ({"max_total_tokens": 0}, "--max-total-tokens"),
        ({"max_running_requests": 0}, "--max-running-requests"),
        ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
        ({"context_length": 1}, "--context-length"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"schedule_policy": "x"}, "--schedule-policy"),
        ({"kv_cache_dtype": "float16"}, "--kv-cache-dtype"),
    ],
)
def test_validation_errors_name_the_flag(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServerArgs(**kwargs)


def test_server_args_are_frozen_and_replace_validates() -> None:
    args = ServerArgs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.port = 1  # type: ignore[misc]
    assert args.replace(port=1).port == 1
    with pytest.raises(ValueError):
        args.replace(port=-1)


def test_serve_subcommand_help_lists_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model-path" in out and "--max-total-tokens" in out and "--log-level" in out


def test_help_names_each_default_once() -> None:
    """A flag's help says its default once, in words for a None default ("Default: no limit",
    never "(default: None)"), as the value for any other; a switch is off unless given."""
    for action in _parser()._actions:
        if action.dest == "help":
            continue
        text = action.help.lower()
        if isinstance(action, argparse._StoreTrueAction):
            assert "(default:" not in text, action.dest
            continue
        assert text.count("default") == 1, f"--{action.dest}: {action.help!r}"
        assert "default: none)" not in text, f"--{action.dest}: {action.help!r}"
        if action.default is not None:
            assert str(action.default).lower() in text, f"--{action.dest}: {action.help!r}"


def test_serve_rejects_invalid_values_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "99999"]) == 2
    assert "--port" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out
    sub = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "serve" in sub[0].choices


def test_port_args_are_fresh_ipc_paths_and_cleanup_removes_them() -> None:
    a, b = PortArgs.new(), PortArgs.new()
    try:
        names = [a.tokenizer_ipc, a.scheduler_ipc, a.detokenizer_ipc]
        assert all(n.startswith("ipc://" + a.ipc_dir + os.sep) for n in names)
        assert len(set(names)) == 3
        assert a.ipc_dir != b.ipc_dir and os.path.isdir(a.ipc_dir)
        # unix socket paths are limited to ~107 bytes
        assert all(len(n) - len("ipc://") < 100 for n in names)
        open(a.scheduler_ipc[len("ipc://") :], "w").close()  # a stale socket file
    finally:
        a.cleanup()
        b.cleanup()
    assert not os.path.exists(a.ipc_dir) and not os.path.exists(b.ipc_dir)
    a.cleanup()  # idempotent
