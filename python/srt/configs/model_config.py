"""ModelConfig: what the runtime needs to know about a model folder, read once.

Built in the scheduler process (and wherever the context length or EOS ids are needed) from
config.json / generation_config.json via transformers' config classes, or the snapshot of one
read before (srt.configs.snapshot: no transformers import): architecture, shapes, context
length, dtype and EOS token ids. Importing it does not import torch. A multimodal
checkpoint served as a text model (Gemma 3's) keeps its shapes in `text_config`
(`text_config` here is that, or the config itself).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from srt.models.registry import SUPPORTED_ARCHITECTURES

logger = logging.getLogger(__name__)

# config.json `model_type` -> (transformers.models.<module>.configuration_<module>, class) of
# the families srt serves: loaded directly, since AutoConfig's registry costs ~0.3 s to import
# (a fifth of a scheduler's start); anything else goes through AutoConfig.
_CONFIG_CLASSES = {
    "llama": ("llama", "LlamaConfig"),
    "mistral": ("mistral", "MistralConfig"),
    "qwen2": ("qwen2", "Qwen2Config"),
    "qwen3": ("qwen3", "Qwen3Config"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig"),
    "mixtral": ("mixtral", "MixtralConfig"),
    "phi3": ("phi3", "Phi3Config"),
    "gemma2": ("gemma2", "Gemma2Config"),
    "gemma3": ("gemma3", "Gemma3Config"),
    "gemma3_text": ("gemma3", "Gemma3TextConfig"),
}


def load_hf_config(model_path: str) -> Any:
    """The transformers config of a model folder, as `AutoConfig.from_pretrained` gives it:
    from its snapshot when this config was read before (srt.configs.snapshot), else through
    transformers, recording the snapshot."""
    from srt.configs import snapshot
    from srt.managers.hf_tokenizer import own_process

    real = functools.cache(lambda: _load_with_transformers(model_path))
    key = snapshot.snapshot_key(model_path, torch_hidden=own_process())
    snap = snapshot.read(key) if key is not None else None
    if snap is not None:
        return snapshot.from_snapshot(snap, real)
    config = real()
    # NOTE: keyed again now that transformers is imported and knows whether it sees torch.
    key = snapshot.snapshot_key(model_path, torch_hidden=own_process())
    if key is not None:
        snapshot.write(key, snapshot.capture(config))
    return config


def _load_with_transformers(model_path: str) -> Any:
    from srt.managers.hf_tokenizer import prepare_transformers

    prepare_transformers()
    config_file = Path(model_path) / "config.json"
    model_type = None
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None  # AutoConfig reports what is wrong with the file
    if model_type in _CONFIG_CLASSES:
        module, name = _CONFIG_CLASSES[model_type]
        cls = getattr(
            importlib.import_module(f"transformers.models.{module}.configuration_{module}"), name
        )
        return cls.from_pretrained(model_path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


_DTYPES = ("float32", "bfloat16", "float16")


# Device nodes of the GPU drivers torch's CUDA (or ROCm) build can use: NVIDIA, WSL's
# paravirtualized GPU, AMD's KFD.
_GPU_NODES = ("/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; anything else is returned as is. A
    machine without any GPU driver's device node, or with CUDA_VISIBLE_DEVICES empty, is a
    CPU one without asking torch (whose import costs seconds and half a GB)."""
    if device != "auto":
        return device
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not any(
        os.path.exists(p) for p in _GPU_NODES
    ):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelConfig:
    def __init__(
        self,
        model_path: str,
        context_length: int | None = None,
        dtype: str = "auto",
        device: str = "cpu",
    ) -> None:
        self.model_path = model_path
        self.hf_config: Any = load_hf_config(model_path)
        archs = getattr(self.hf_config, "architectures", None) or []
        supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not supported:
            raise ValueError(
                f"unsupported model architecture {archs or 'missing'} in {model_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.architecture: str = supported[0]
        get_text_config = getattr(self.hf_config, "get_text_config", None)
        self.text_config: Any = get_text_config() if get_text_config else self.hf_config
        cfg = self.text_config
        self.num_layers: int = cfg.num_hidden_layers
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.hidden_size: int = cfg.hidden_size
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads
        self.vocab_size: int = cfg.vocab_size
        self.context_len: int = self._context_len(context_length)
        self.device: str = resolve_device(device)
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {_DTYPES}, got {dtype!r}")
        self.dtype: str = dtype
        self.eos_token_ids: set[int] = self._eos_token_ids()

    def _context_len(self, override: int | None) -> int:
        model_len = getattr(self.text_config, "max_position_embeddings", None)
        if override is None:
            if model_len is None:
                raise ValueError(
                    f"{self.model_path} has no max_position_embeddings; pass --context-length"
                )
            return int(model_len)
        if model_len is not None and override > model_len:
            logger.warning(
                "context length %d exceeds the model's max_position_embeddings %d; outputs past "
                "%d tokens may be poor",
                override,
                model_len,
                model_len,
            )
        return int(override)

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_file = Path(self.model_path) / "generation_config.json"
        configs = [self.hf_config]
        if self.text_config is not self.hf_config:
            configs.append(self.text_config)
        sources = [getattr(c, "eos_token_id", None) for c in configs]
        if gen_file.is_file():
            sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
        for value in sources:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return ids

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype: "auto" is bf16 on cuda and fp32 on cpu."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)
