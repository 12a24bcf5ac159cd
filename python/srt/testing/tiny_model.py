"""Tiny random-weight models for tests, benchmarks and demos, built on the spot.

`make_tiny_model(path, arch)` writes an HF model folder: config.json, model.safetensors (fp32,
random weights), generation_config.json, and a byte-level BPE tokenizer trained here by the
`tokenizers` library (tokenizer.json + tokenizer_config.json with a ChatML chat template).
HF transformers loads the folder, which makes it the oracle for srt's own model code.
Nothing is downloaded.

`ARCHS` are the dense families every model test covers; `FAMILY_ARCHS` the other supported
families (Mistral, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE), built with their distinguishing
features switched on at tiny scale: a sliding window when `sliding_window` is given (Gemma's
local layers always have one), soft-caps small enough to bite (Gemma 2), a q/k norm and a
local RoPE base (Gemma 3), LongRoPE when `rope_scaling` says so (Phi-3), 4 experts of which 2
per token, and one dense layer (Qwen3-MoE).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3")
FAMILY_ARCHS = ("mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe")
# Gemma 3 as its multimodal checkpoints come (Gemma3ForConditionalGeneration, a tiny SigLIP
# vision tower beside the language model), for serving as a text model.
ALL_ARCHS = ARCHS + FAMILY_ARCHS + ("gemma3_mm",)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but also first one their its new after who they two been other "
    "year into more time city world people state school during between over many most some "
    "capital france paris river music model token server request batch cache prefix graph "
    "hello what where when how why answer question number small large quick brown fox jumps "
    "lazy dog apple banana computer science language history water light energy system"
).split()
_EXTRA = ["Paris", "London", "?", "!", ",", ".", "42", "2024", "日本語", "中文", "éàü", "🙂", "🚀"]


def training_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRA))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ""]))
    return lines


def train_tokenizer(path: str | os.PathLike, vocab_size: int = 512, seed: int = 0) -> None:
    """Trains a byte-level BPE tokenizer and writes tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed=seed), trainer=trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    vocab_size: int = 512,
    sliding_window: int | None = None,
    num_experts: int = 4,
) -> str:
    """Writes a tiny random-weight `arch` model folder at `path` and returns the path.
    `sliding_window` applies to Mistral, Phi-3 and Mixtral (every layer) and to Gemma's local
    layers (default 16 there)."""
    import torch
    import transformers

    if arch not in ALL_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ALL_ARCHS}")
    path = Path(path)
    train_tokenizer(path, vocab_size=vocab_size, seed=seed)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    pad = tok.token_to_id("<|endoftext|>")
    common = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=pad,
        # Wide init so greedy outputs of random weights vary instead of repeating one token.
        initializer_range=0.3,
        torch_dtype="float32",
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_theta": 10000.0, **rope_scaling}
    head_dim = hidden_size // num_heads
    moe = dict(num_experts_per_tok=2)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, rope_parameters=rope)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, rope_parameters=rope, head_dim=head_dim)
    elif arch == "mistral":
        config = transformers.MistralConfig(
            **common, rope_parameters=rope, head_dim=head_dim, sliding_window=sliding_window
        )
    elif arch in ("gemma2", "gemma3", "gemma3_mm"):
        gemma = dict(
            common,
            head_dim=head_dim,
            query_pre_attn_scalar=2 * head_dim,  # not head_dim: a wrong scale shows
            sliding_window=sliding_window or 16,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["sliding_attention"] * (num_layers % 2),
            tie_word_embeddings=True,
        )
        if arch == "gemma2":
            config = transformers.Gemma2Config(
                **gemma,
                rope_parameters=rope,
                attn_logit_softcapping=3.0,
                final_logit_softcapping=2.0,
            )
        else:
            local = {"rope_type": "default", "rope_theta": 100.0}
            config = transformers.Gemma3TextConfig(
                **gemma,
                rope_parameters={"sliding_attention": local, "full_attention": rope},
                final_logit_softcapping=8.0,
            )
            if arch == "gemma3_mm":
                vision = transformers.SiglipVisionConfig(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=28,
                    patch_size=14,
                )
                config = transformers.Gemma3Config(
                    text_config=config,
                    vision_config=vision,
                    mm_tokens_per_image=4,
                    # Placeholder ids the processor would use; text prompts never hold them.
                    image_token_index=pad,
                    boi_token_index=pad,
                    eoi_token_index=pad,
                    eos_token_id=eos,
                    initializer_range=common["initializer_range"],
                )
    elif arch == "phi3":
        extra: dict = {}
        if rope.get("rope_type") == "longrope":
            extra["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        config = transformers.Phi3Config(
            **common, rope_parameters=rope, sliding_window=sliding_window, **extra
        )
    elif arch == "mixtral":
        config = transformers.MixtralConfig(
            **common,
            rope_parameters=rope,
            num_local_experts=num_experts,
            sliding_window=sliding_window,
            **moe,
        )
    else:  # qwen3_moe: the last layer keeps a dense MLP
        config = transformers.Qwen3MoeConfig(
            **common,
            rope_parameters=rope,
            head_dim=head_dim,
            num_experts=num_experts,
            moe_intermediate_size=intermediate_size // 2,
            norm_topk_prob=False,
            mlp_only_layers=[num_layers - 1],
            **moe,
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # q/k/v biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.3)
    with torch.no_grad():  # norms start at one (Gemma: zero); perturb so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name and arch.startswith("gemma"):
                p.add_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name and arch.startswith("gemma"):
                # Undo the sqrt(hidden) scale of the input: otherwise the tied embedding
                # dominates the residual stream and the model echoes its input token.
                p.mul_(hidden_size**-0.5)
            elif "norm" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # routers: spread so top-k choices vary
                p.normal_(0.0, 1.0)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=eos, pad_token_id=pad, bos_token_id=None
    )
    model.save_pretrained(path, safe_serialization=True)
    return str(path)
