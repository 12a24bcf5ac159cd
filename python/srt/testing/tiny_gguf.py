"""Tiny GGUF files for tests, built on the spot from a tiny random-weight HF Llama.

`make_tiny_gguf(path, types)` writes a Llama GGUF as llama.cpp's converter would: its tensors
renamed to GGUF names, q/k rows permuted for llama.cpp's RoPE, the byte-level BPE tokenizer of
the tiny model as GGUF metadata, and each 2-D weight in the block type `types` names for it
(by GGUF name prefix; F32 where none). Q4_0, Q4_1 and Q8_0 are quantized from the weights by
gguf-py; gguf-py cannot quantize K-quants, so Q4_K / Q6_K tensors are random blocks with
small scales (a valid weight all the same: every reader dequantizes the same numbers).
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from srt.testing.tiny_model import make_tiny_model

# llama.cpp's layout of K-quant blocks: (bytes per block, offsets of f16 scales).
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers' GGUF reader undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _random_k_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    block_bytes, halves = _K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, (n, k // 256, block_bytes), dtype=np.uint8)
    # Q4_K: d * sc * q - dmin * m with 6-bit sc, m and 4-bit q; Q6_K: d * int8 scale * 6-bit q.
    high = 2e-4 if qtype == "Q4_K" else 2e-5
    for at in halves:
        scales = rng.uniform(0, high, (n, k // 256)).astype(np.float16)
        blocks[:, :, at : at + 2] = scales.view(np.uint8).reshape(n, k // 256, 2)
    return blocks.reshape(n, -1)


def make_tiny_gguf(
    path: str | Path,
    types: dict[str, str],
    *,
    seed: int = 0,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    layer_weight_scale: float = 0.2,
) -> Path:
    """Writes the GGUF file `path` (its HF source beside it, in `<path>.hf/`) and returns it.
    `types`: GGUF tensor name prefix (e.g. "blk.0.attn_q", "token_embd", "output") -> GGUF
    type name; the first prefix a tensor's name starts with wins. `layer_weight_scale`
    multiplies the decoder layers' projections: the tiny model's wide init (std 0.3, for
    varied greedy output) makes each layer amplify its input, which real checkpoints (std
    ~1/sqrt(hidden)) do not; scaled down, errors propagate as in a real model."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from safetensors.torch import load_file

    path = Path(path)
    hf_dir = make_tiny_model(
        path.with_name(path.name + ".hf"),
        "llama",
        seed=seed,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        num_layers=num_layers,
        tie_word_embeddings=tie_word_embeddings,
    )
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    tok = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids have gaps"
    special = {a["content"] for a in tok.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden_size)
    w.add_block_count(num_layers)
    w.add_feed_forward_length(intermediate_size)
    w.add_head_count(num_heads)
    w.add_head_count_kv(num_kv_heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])

    rng = np.random.default_rng(seed)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    state = load_file(str(Path(hf_dir) / "model.safetensors"))
    for hf_name, tensor in state.items():
        if tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(base)
        assert name is not None, hf_name
        name = f"{name}.{suffix}"
        data = tensor.to(torch.float32).numpy()
        if name.startswith("blk.") and data.ndim == 2:
            data = data * np.float32(layer_weight_scale)
        if name.endswith("attn_q.weight"):
            data = _permute_for_gguf(data, num_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute_for_gguf(data, num_kv_heads)
        qtype = next((t for p, t in types.items() if name.startswith(p)), "F32")
        if data.ndim != 2 or qtype == "F32":
            w.add_tensor(name, np.ascontiguousarray(data))
        elif qtype in _K_BLOCKS:
            blocks = _random_k_blocks(qtype, data.shape[0], data.shape[1], rng)
            w.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType[qtype])
        else:
            kind = GGMLQuantizationType[qtype]
            w.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
