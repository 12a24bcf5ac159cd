"""Benchmark datasets: the prompts a benchmark sends and the output length it asks for.

Runs in the benchmark client (no server needed). In: a tokenizer and the dataset options.
Out: a list of `BenchRequest`, each with an exact prompt length in that tokenizer.

- `random`: prompts of random token ids with lengths drawn uniformly from
  [max(1, floor(input_len * range_ratio)), input_len] (range_ratio 1.0 gives fixed lengths), and
  the same for output lengths. With `prompt_format="ids"` the token ids themselves are the prompt
  (the OpenAI completions API and the Engine both accept token-id prompts), so the server sees
  exactly that length; with `"text"` the ids are decoded and the text is repaired until it
  re-encodes to exactly the drawn length (what a server that only takes text sees).
- `sharegpt`: a ShareGPT-format JSON file; the first turn of each conversation is the prompt and
  the token length of the second turn is the output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A text prompt whose random ids keep re-tokenizing to another length is redrawn this many times.
_TEXT_REPAIR_ROUNDS = 16
_TEXT_REDRAWS = 8
# ShareGPT filters (the ones vLLM's and SGLang's serving benchmarks use): very short turns say
# nothing about throughput, very long ones only measure truncation.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class BenchRequest:
    prompt: str  # the text (for ids prompts: their decoding, for display and logs only)
    prompt_len: int  # tokens the server should count for this prompt
    output_len: int  # tokens to generate
    prompt_ids: list[int] | None = None  # set when the prompt is sent as token ids


def load_tokenizer(path: str) -> Any:
    """An HF tokenizer from a folder (or hub-style id already in the local cache) or .gguf file.
    Never from the network: the benchmarks measure a server, they do not download."""
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        # srt converts a GGUF once into an HF folder; reuse that conversion when srt can.
        from srt.model_loader.gguf import resolve_model_paths

        path = resolve_model_paths(path, None)[1]
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def plain_token_ids(tokenizer: Any) -> list[int]:
    """Ids of ordinary vocabulary tokens: no special or added tokens (a random prompt full of
    `<|im_end|>` would test the tokenizer's special-token handling, not the server)."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return sorted(i for i in tokenizer.get_vocab().values() if i not in excluded)


def draw_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    if not 0.0 < range_ratio <= 1.0:
        raise ValueError(f"--range-ratio must be in (0, 1], got {range_ratio}")
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, length) for _ in range(n)]


def sample_random_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 1.0,
    seed: int = 0,
    prompt_format: str = "ids",
) -> list[BenchRequest]:
    if prompt_format not in ("ids", "text"):
        raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
    rng = random.Random(seed)
    vocab = plain_token_ids(tokenizer)
    in_lens = draw_lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = draw_lengths(rng, num_prompts, output_len, range_ratio)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens, strict=True):
        if prompt_format == "ids":
            ids = [rng.choice(vocab) for _ in range(n_in)]
            text = tokenizer.decode(ids)
            requests.append(BenchRequest(text, n_in, n_out, prompt_ids=ids))
        else:
            requests.append(
                BenchRequest(exact_length_text(tokenizer, rng, vocab, n_in), n_in, n_out)
            )
    return requests


def exact_length_text(tokenizer: Any, rng: random.Random, vocab: list[int], length: int) -> str:
    """Random text that `tokenizer(text)` (special tokens included, as a server tokenizes a
    prompt) encodes to exactly `length` tokens."""
    n_special = len(tokenizer("").input_ids)  # e.g. a BOS the tokenizer adds to every prompt
    target = length - n_special
    if target < 1:
        raise ValueError(
            f"a text prompt of {length} tokens is impossible: the tokenizer adds {n_special} "
            f"special tokens to every prompt"
        )
    for _ in range(_TEXT_REDRAWS):
        ids = [rng.choice(vocab) for _ in range(target)]
        for _ in range(_TEXT_REPAIR_ROUNDS):
            text = tokenizer.decode(ids)
            if len(tokenizer(text).input_ids) == length:
                return text
            # Decoding then encoding merges or splits tokens; keep the re-encoded ids, cut or
            # extend them to the target, and try again.
            ids = tokenizer(text, add_special_tokens=False).input_ids[:target]
            ids += [rng.choice(vocab) for _ in range(target - len(ids))]
    raise RuntimeError(
        f"could not build a text prompt of exactly {length} tokens; use token-id prompts"
    )


def sample_sharegpt_requests(
    path: str | Path,
    tokenizer: Any,
    num_prompts: int,
    seed: int = 0,
    fixed_output_len: int | None = None,
    max_prompt_len: int = SHAREGPT_MAX_PROMPT_LEN,
    max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
) -> list[BenchRequest]:
    """`num_prompts` conversations drawn (seeded shuffle) from a ShareGPT JSON file, skipping
    those with a prompt or answer under 4 tokens, a prompt over `max_prompt_len` or a total over
    `max_total_len`. Raises if the file holds fewer usable conversations."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations (ShareGPT format)")
    convs = [
        d["conversations"]
        for d in data
        if isinstance(d, dict)
        and isinstance(d.get("conversations"), list)
        and len(d["conversations"]) >= 2
    ]
    random.Random(seed).shuffle(convs)
    requests: list[BenchRequest] = []
    for conv in convs:
        if len(requests) == num_prompts:
            break
        prompt, answer = conv[0].get("value"), conv[1].get("value")
        if not isinstance(prompt, str) or not isinstance(answer, str):
            continue
        prompt_len = len(tokenizer(prompt).input_ids)
        if fixed_output_len is not None:
            output_len = fixed_output_len
        else:
            output_len = len(tokenizer(answer, add_special_tokens=False).input_ids)
        if prompt_len < SHAREGPT_MIN_LEN or output_len < SHAREGPT_MIN_LEN:
            continue
        if prompt_len > max_prompt_len or prompt_len + output_len > max_total_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, output_len))
    if len(requests) < num_prompts:
        raise ValueError(
            f"{path}: only {len(requests)} usable conversations for --num-prompts {num_prompts}"
        )
    return requests


def sample_requests(args: Any, tokenizer: Any) -> list[BenchRequest]:
    """The dataset the parsed CLI options ask for (see `add_dataset_args`)."""
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
        return sample_sharegpt_requests(
            args.dataset_path,
            tokenizer,
            args.num_prompts,
            seed=args.seed,
            fixed_output_len=args.sharegpt_output_len,
        )
    return sample_random_requests(
        tokenizer,
        args.num_prompts,
        args.input_len,
        args.output_len,
        range_ratio=args.range_ratio,
        seed=args.seed,
        prompt_format=args.random_prompt_format,
    )


def add_dataset_args(parser: Any, num_prompts: int) -> None:
    parser.add_argument(
        "--dataset",
        choices=("random", "sharegpt"),
        default=None,
        help="Prompt source (default: sharegpt when --dataset-path is given, else random).",
    )
    parser.add_argument("--dataset-path", default=None, help="A ShareGPT-format JSON file.")
    parser.add_argument("--num-prompts", type=int, default=num_prompts, help="Requests to send.")
    parser.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens.")
    parser.add_argument("--output-len", type=int, default=128, help="random: output tokens.")
    parser.add_argument(
        "--range-ratio",
        type=float,
        default=1.0,
        help="random: lengths are uniform in [len * ratio, len]; 1.0 fixes them.",
    )
    parser.add_argument(
        "--random-prompt-format",
        choices=("ids", "text"),
        default="ids",
        help="random: send token ids (exact length) or text checked to re-encode exactly.",
    )
    parser.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="sharegpt: fixed output length instead of the answer's length.",
    )
    parser.add_argument("--seed", type=int, default=1, help="Seed of the dataset and arrivals.")


def resolve_dataset_name(args: Any) -> None:
    if args.dataset is None:
        args.dataset = "sharegpt" if args.dataset_path else "random"
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
