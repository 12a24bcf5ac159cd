"""Writes a Llama-3.1-8B-shaped model folder without weights, for `--load-format dummy` runs.

config.json has Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256, llama3 rope scaling); the tokenizer is the small byte-level BPE of
`srt.testing.tiny_model` trained on the spot, its vocabulary padded with plain tokens "t<id>"
up to 128256 entries, so every id the model can emit decodes to text (the detokenizer and the
streaming path do real work; an id unknown to the tokenizer would decode to nothing). Nothing is
downloaded.

    python benches/make_llama8b_dummy.py /tmp/llama8b
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from srt.testing.tiny_model import train_tokenizer

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}


def main(path: str) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": CONFIG["eos_token_id"]})
    )
    train_tokenizer(folder, vocab_size=2048)
    tok_file = folder / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    vocab = tok["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(CONFIG["vocab_size"]):
        if i not in taken:
            vocab[f"t{i}"] = i
    tok_file.write_text(json.dumps(tok, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
