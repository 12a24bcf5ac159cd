"""The hand-written stub `srt/_native.pyi` matches the compiled module: the same classes, and
every public method or property of each class is declared (and nothing the module lacks)."""

from __future__ import annotations

import ast
from pathlib import Path

import srt
from srt import _native

STUB = Path(srt.__file__).with_name("_native.pyi")


def stub_classes() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {
                n.name
                for n in node.body
                if isinstance(n, ast.FunctionDef)
                and (not n.name.startswith("_") or n.name in {"__init__", "__contains__"})
            }
    return out


def runtime_classes() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name in dir(_native):
        obj = getattr(_native, name)
        if isinstance(obj, type):
            out[name] = {m for m in vars(obj) if not m.startswith("_")}
    return out


def test_stub_declares_exactly_the_module_classes() -> None:
    assert set(stub_classes()) == set(runtime_classes())


def test_stub_declares_every_public_member() -> None:
    stub, runtime = stub_classes(), runtime_classes()
    for cls, members in runtime.items():
        declared = {m for m in stub[cls] if not m.startswith("_")}
        assert declared == members, f"{cls}: stub {sorted(declared)} vs module {sorted(members)}"
