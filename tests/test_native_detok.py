"""Tests of `srt._native.Detokenizer`, the Rust incremental detokenizer, through its binding.

Tokenizers are trained on the spot with the `tokenizers` library and saved as tokenizer.json:
a GPT-2 style byte-level BPE and a Llama-2 style byte-fallback BPE (Metaspace, `<0xNN>` byte
tokens, decoder Replace/ByteFallback/Fuse/Strip). Random id sequences, split into a prompt and
a generation streamed in random chunks, must give deltas that are append-only and add up to
`tokenizers.Tokenizer.decode`, with no U+FFFD the full decode lacks and no part of a stop string.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
native = pytest.importorskip("srt._native")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

Detokenizer = native.Detokenizer

FFFD = "\ufffd"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "你好，世界。今天天气很好，我们去公园散步吧。你好你好",
    "日本語のテキストも少し入れておきます。",
    "Emoji time: 😀😃😄 🎉🎉 👍🏽 and ❤️ plus 🇫🇷 done.",
    "Ünïcödé àccénts: café naïve résumé façade",
    "def step(self, ids): return self.window.advance(ids)",
    "    indented code\n\twith tabs\nand newlines\n",
]


def train_byte_level(path: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return tok


def train_byte_fallback(path: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=70,  # rarer characters (most CJK, emoji) fall back to bytes
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = next_id + b
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    text = json.dumps(data)
    path.write_text(text, encoding="utf-8")
    return Tokenizer.from_str(text)


@pytest.fixture(params=["byte_level", "byte_fallback"])
def trained(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Tokenizer, Path]:
    path = tmp_path / request.param / "tokenizer.json"
    path.parent.mkdir()
    train = train_byte_level if request.param == "byte_level" else train_byte_fallback
    return train(path), path


def is_special(tok: Tokenizer, token_id: int) -> bool:
    added = tok.get_added_tokens_decoder().get(token_id)
    return added is not None and added.special


def reference(tok: Tokenizer, ids: list[int], skip: bool, spaces: bool) -> str:
    """The full decode the deltas must add up to, under the request's special-token settings."""
    if skip or not spaces:
        return tok.decode(ids, skip_special_tokens=skip)
    # spaces_between_special_tokens: runs between special tokens decoded on their own, special
    # tokens verbatim, non-empty pieces joined by one space.
    pieces: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if is_special(tok, token_id):
            pieces += [tok.decode(run, skip_special_tokens=False), tok.id_to_token(token_id)]
            run = []
        else:
            run.append(token_id)
    pieces.append(tok.decode(run, skip_special_tokens=False))
    return " ".join(p for p in pieces if p)


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reference_stop(text: str, stop: list[str], keep: bool) -> tuple[str, int | None]:
    """Earliest-ending match wins, ties to the longest, then the first listed."""
    found = [
        (text.find(s) + len(s), text.find(s), i) for i, s in enumerate(stop) if s and s in text
    ]
    if not found:
        return text, None
    end, start, index = min(found)
    return text[: end if keep else start], index


def random_ids(rng: random.Random, tok: Tokenizer, n: int) -> list[int]:
    """Encoded corpus text cut anywhere, random ids (invalid bytes), specials, unknown ids."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    specials = [i for i in range(vocab) if is_special(tok, i)]
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.randrange(10)
        if kind < 5:
            enc = tok.encode(rng.choice(CORPUS), add_special_tokens=False).ids
            start = rng.randrange(len(enc))
            ids += enc[start : start + 1 + rng.randrange(12)]
        elif kind < 8:
            ids += [rng.randrange(vocab) for _ in range(1 + rng.randrange(4))]
        elif kind < 9:
            ids.append(rng.choice(specials))
        else:
            ids.append(vocab + rng.randrange(5))
    return ids[:n]


def random_stop(rng: random.Random, text: str) -> str:
    if not text or rng.random() < 0.15:
        return "zq#absent"
    start = rng.randrange(len(text))
    return text[start : start + 1 + rng.randrange(6)]


def test_random_sequences_match_decode(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    detok = Detokenizer(str(path))
    rng = random.Random(11)
    exact = 0
    cases = 300
    for rid in range(cases):
        prompt = random_ids(rng, tok, 0 if rng.random() < 0.2 else rng.randrange(20))
        gen = random_ids(rng, tok, rng.randrange(40))
        skip, spaces, keep = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.3
        full = reference(tok, prompt + gen, skip, spaces)
        prompt_text = reference(tok, prompt, skip, spaces)
        # Exact when the prompt's text is a prefix of the full text; otherwise (the prompt
        # ends inside a character the generation changes) deltas restart where it changed.
        exact += full.startswith(prompt_text)
        gen_text = full[common_prefix(prompt_text, full) :]
        stop = [random_stop(rng, gen_text) for _ in range(rng.randrange(4))]
        want, want_stop = reference_stop(gen_text, stop, keep)
        ctx = f"prompt={prompt} gen={gen} skip={skip} spaces={spaces} stop={stop} keep={keep}"

        detok.add(rid, prompt, skip, spaces, stop or None, keep)
        shown, seen_stop, i = "", None, 0
        while i < len(gen):
            n = min(rng.randrange(5), len(gen) - i)
            text, matched = detok.step(rid, gen[i : i + n])
            i += n
            assert FFFD not in text or FFFD in full, ctx
            shown += text
            seen_stop = matched if matched is not None else seen_stop
            assert want.startswith(shown), ctx  # append-only, no part of a stop string
        shown += detok.finish(rid)
        assert shown == want, ctx
        if seen_stop is not None:
            assert seen_stop == want_stop, ctx
    assert detok.num_requests() == 0
    assert exact >= cases * 0.7


def test_valid_text_streams_exactly(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    detok = Detokenizer.from_json(path.read_text(encoding="utf-8"))
    for rid, line in enumerate(CORPUS):
        ids = tok.encode(line, add_special_tokens=False).ids
        detok.add(rid, [])
        deltas = [detok.step(rid, [i])[0] for i in ids] + [detok.finish(rid)]
        assert "".join(deltas) == tok.decode(ids)
        assert all(FFFD not in d for d in deltas)


def test_stop_string_split_across_tokens(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    detok = Detokenizer(str(path.parent))  # a folder holding tokenizer.json
    ids = tok.encode(CORPUS[2], add_special_tokens=False).ids
    detok.add(1, [], stop=["no such", "天气很好"])
    shown, matched = "", None
    for token_id in ids:
        text, m = detok.step(1, [token_id])
        shown += text
        assert "天气" not in shown
        matched = m if m is not None else matched
    assert detok.step(1, ids[:3]) == ("", 1)
    shown += detok.finish(1)
    assert (shown, matched) == ("你好，世界。今天", 1)
    detok.add(2, [], stop=["天气很好"], no_stop_trim=True)
    assert (
        "".join(detok.step(2, [i])[0] for i in ids) + detok.finish(2) == "你好，世界。今天天气很好"
    )


def test_step_batch_matches_step(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    batched, single = Detokenizer(str(path)), Detokenizer(str(path))
    rng = random.Random(5)
    seqs = [random_ids(rng, tok, 30) for _ in range(5)]
    for rid in range(len(seqs)):
        batched.add(rid, [], skip_special_tokens=rid % 2 == 0)
        single.add(rid, [], skip_special_tokens=rid % 2 == 0)
    for pos in range(0, 30, 3):
        chunks = [s[pos : pos + 3] for s in seqs]
        got = batched.step_batch(list(range(len(seqs))), chunks)
        assert got == [single.step(rid, c) for rid, c in enumerate(chunks)]
    assert [batched.finish(r) for r in range(5)] == [single.finish(r) for r in range(5)]


def test_errors(trained: tuple[Tokenizer, Path], tmp_path: Path) -> None:
    tok, path = trained
    detok = Detokenizer(str(path))
    detok.add(1, [])
    with pytest.raises(ValueError, match="request 1 already exists"):
        detok.add(1, [])
    with pytest.raises(ValueError, match="unknown request 7"):
        detok.step(7, [1])
    with pytest.raises(ValueError, match="unknown request 7"):
        detok.finish(7)
    # An unknown rid in a batch is named, and no request in the batch has moved.
    ids = tok.encode("Hello world", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="unknown request 42"):
        detok.step_batch([1, 42], [ids, ids])
    with pytest.raises(ValueError, match="2 rids but 1 id lists"):
        detok.step_batch([1, 1], [ids])
    assert detok.step(1, ids)[0] + detok.finish(1) == "Hello world"
    assert detok.remove(1) is False
    detok.add(2, [])
    assert detok.remove(2) is True
    assert detok.num_requests() == 0
    with pytest.raises(OSError):
        Detokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(OSError):
        Detokenizer(str(tmp_path))  # a folder without tokenizer.json
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Detokenizer.from_json("{not json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": 3}')
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Detokenizer(str(bad))
    with pytest.raises(OverflowError):
        detok.add(-1, [])


def test_decode_matches_tokenizers(trained: tuple[Tokenizer, Path]) -> None:
    tok, path = trained
    detok = Detokenizer(str(path))
    rng = random.Random(3)
    for _ in range(50):
        ids = random_ids(rng, tok, rng.randrange(30))
        for skip in (True, False):
            assert detok.decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip)
