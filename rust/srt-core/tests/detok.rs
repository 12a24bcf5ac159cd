//! Contract tests of the incremental detokenizer (see DESIGN.md, "Contracts"): for random
//! prompt/generation id sequences on a byte-level BPE (GPT-2 / Qwen style) and a byte-fallback
//! SentencePiece-style BPE (Llama-2 / Mistral style), the deltas are append-only, add up to the
//! full decode, carry no U+FFFD the full decode lacks, and never show any part of a stop string.

use std::collections::{HashMap, HashSet};

use srt_core::detok::{DecodeParams, DetokError, Detokenizer, MAX_PENDING};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

use srt_core::rng::SplitMix64;
use tokenizers::{
    AddedToken, NormalizerWrapper, PostProcessorWrapper, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

const FFFD: char = '\u{FFFD}';

const CORPUS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "你好，世界。今天天气很好，我们去公园散步吧。你好你好",
    "日本語のテキストも少し入れておきます。",
    "Emoji time: 😀😃😄 🎉🎉 👍🏽 and ❤️ plus 🇫🇷 done.",
    "Ünïcödé àccénts: café naïve résumé façade",
    "def step(self, ids): return self.window.advance(ids)",
    "    indented code\n\twith tabs\nand newlines\n",
];

/// GPT-2 style byte-level BPE trained on the corpus, with chat special tokens and one
/// non-special added token.
fn byte_level_tokenizer() -> Tokenizer {
    let specials: Vec<AddedToken> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(420)
        .show_progress(false)
        .initial_alphabet(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect::<HashSet<char>>(),
        )
        .special_tokens(specials)
        .build();
    let pre = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true);
    let mut tk: TokenizerImpl<BPE, NormalizerWrapper, _, PostProcessorWrapper, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(pre))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .unwrap();
    tk.train(&mut trainer, CORPUS.iter().copied()).unwrap();
    let mut tok = Tokenizer::from(tk);
    tok.add_tokens([AddedToken::from("<tool>", false)]).unwrap();
    tok
}

/// Llama-2 style: Metaspace pre-tokenizer, BPE with byte_fallback over `<0xNN>` tokens, decoder
/// Sequence[Replace("▁"," "), ByteFallback, Fuse, Strip(" ",1,0)]. The vocabulary holds ASCII,
/// a few CJK characters and whole corpus words; every other character falls back to bytes.
fn byte_fallback_tokenizer() -> Tokenizer {
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let alphabet: Vec<char> = std::iter::once('▁')
        .chain((b'!'..=b'~').map(char::from))
        .chain("你好世界".chars())
        .collect();
    vocab.extend(alphabet.iter().map(|c| c.to_string()));
    let known: HashSet<char> = alphabet.iter().copied().collect();
    let mut merges = Vec::new();
    let mut seen: HashSet<String> = vocab.iter().cloned().collect();
    for line in CORPUS {
        for word in line.split(' ') {
            let word = format!("▁{word}");
            if !word.chars().all(|c| known.contains(&c)) {
                continue;
            }
            // Left-to-right merge chain: each prefix of the word is a token.
            let mut chars = word.chars();
            let mut cur = chars.next().unwrap().to_string();
            for c in chars {
                let next = format!("{cur}{c}");
                if seen.insert(next.clone()) {
                    merges.push((cur.clone(), c.to_string()));
                    vocab.push(next.clone());
                }
                cur = next;
            }
        }
    }
    let vocab: tokenizers::models::bpe::Vocab = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let decoder: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").unwrap().into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    tok.with_decoder(Some(Sequence::new(decoder)));
    tok.add_special_tokens([
        AddedToken::from("<unk>", true),
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ])
    .unwrap();
    tok
}

fn detok_for(tok: &Tokenizer) -> Detokenizer {
    // Through JSON, as production loads it.
    Detokenizer::from_json(&tok.to_string(false).unwrap()).unwrap()
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn is_special(tok: &Tokenizer, id: u32) -> bool {
    tok.id_to_token(id)
        .is_some_and(|t| tok.get_added_vocabulary().is_special_token(&t))
}

/// The text the contract compares against: the full decode under the request's settings.
fn reference(tok: &Tokenizer, ids: &[u32], params: &DecodeParams) -> String {
    if params.skip_special_tokens || !params.spaces_between_special_tokens {
        return tok.decode(ids, params.skip_special_tokens).unwrap();
    }
    // spaces_between_special_tokens: runs between special tokens decoded on their own, special
    // tokens verbatim, non-empty pieces joined by one space.
    let mut pieces = Vec::new();
    let mut run = Vec::new();
    for &id in ids {
        if is_special(tok, id) {
            pieces.push(tok.decode(&run, false).unwrap());
            run.clear();
            pieces.push(tok.id_to_token(id).unwrap());
        } else {
            run.push(id);
        }
    }
    pieces.push(tok.decode(&run, false).unwrap());
    pieces.retain(|p| !p.is_empty());
    pieces.join(" ")
}

/// Earliest-ending match, ties to the longest then the first listed; returns the cut text.
fn reference_stop(text: &str, stop: &[String], keep: bool) -> (String, Option<usize>) {
    let best = stop
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at + s.len(), at, i)))
        .min();
    match best {
        Some((end, start, i)) => (text[..if keep { end } else { start }].to_owned(), Some(i)),
        None => (text.to_owned(), None),
    }
}

/// Random ids: a mix of encoded corpus text (valid UTF-8, cut anywhere, so multi-byte
/// characters are split across the prompt/generation boundary), uniformly random ids (invalid
/// byte sequences, stray bytes), special tokens and ids outside the vocabulary.
fn random_ids(rng: &mut SplitMix64, tok: &Tokenizer, len: usize) -> Vec<u32> {
    let vocab = tok.get_vocab_size(true) as u32;
    let specials: Vec<u32> = (0..vocab).filter(|&id| is_special(tok, id)).collect();
    let mut ids = Vec::new();
    while ids.len() < len {
        match rng.below(10) {
            0..=4 => {
                let text = CORPUS[rng.below(CORPUS.len())];
                let enc = encode(tok, text);
                let start = rng.below(enc.len());
                let n = 1 + rng.below(12);
                ids.extend_from_slice(&enc[start..(start + n).min(enc.len())]);
            }
            5..=7 => ids.extend((0..1 + rng.below(4)).map(|_| rng.below(vocab as usize) as u32)),
            8 => ids.push(specials[rng.below(specials.len())]),
            _ => ids.push(vocab + rng.below(5) as u32),
        }
    }
    ids.truncate(len);
    ids
}

fn random_params(rng: &mut SplitMix64) -> DecodeParams {
    DecodeParams {
        skip_special_tokens: rng.chance(50),
        spaces_between_special_tokens: rng.chance(50),
        stop: Vec::new(),
        no_stop_trim: rng.chance(30),
    }
}

/// A stop string taken from `text` (1 to 6 chars at a random place), or an absent one.
fn random_stop(rng: &mut SplitMix64, text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() || rng.chance(15) {
        return "zq#absent".into();
    }
    let start = rng.below(chars.len());
    let n = 1 + rng.below(6);
    chars[start..(start + n).min(chars.len())].iter().collect()
}

struct Outcome {
    exact: bool,
}

/// Runs one request through the detokenizer and checks every contract that applies.
fn check_case(
    rng: &mut SplitMix64,
    tok: &Tokenizer,
    detok: &mut Detokenizer,
    prompt: &[u32],
    gen: &[u32],
    mut params: DecodeParams,
) -> Outcome {
    let all: Vec<u32> = prompt.iter().chain(gen).copied().collect();
    let full = reference(tok, &all, &params);
    let prompt_text = reference(tok, prompt, &params);
    // The exact contract: the prompt's text is a prefix of the full text and the deltas add up
    // to the rest. Otherwise (the prompt ends inside a character or byte run that the
    // generation changes) they restart at the first character that changed.
    let exact = full.starts_with(&prompt_text);
    let expected_gen = full[common_prefix(&prompt_text, &full)..].to_owned();
    if rng.chance(50) {
        params.stop = (0..1 + rng.below(3))
            .map(|_| random_stop(rng, &expected_gen))
            .collect();
    }
    let expected = reference_stop(&expected_gen, &params.stop, params.no_stop_trim);
    let ctx = format!("prompt={prompt:?} gen={gen:?} params={params:?} expected={expected:?}");

    detok.add_request(7, prompt, params.clone()).unwrap();
    let mut shown = String::new();
    let mut stop_seen = None;
    let mut i = 0;
    while i < gen.len() {
        let n = rng.below(5).min(gen.len() - i);
        let out = detok.step(7, &gen[i..i + n]).unwrap();
        i += n;
        assert!(
            !out.text.contains(FFFD) || full.contains(FFFD),
            "U+FFFD in a delta {out:?}: {ctx}"
        );
        if stop_seen.is_some() {
            assert_eq!(out.text, "", "text after a stop string: {ctx}");
            assert_eq!(out.stop, stop_seen, "{ctx}");
        }
        stop_seen = out.stop;
        shown.push_str(&out.text);
        // Append-only, and nothing of a stop string shows before it is decided.
        assert!(expected.0.starts_with(&shown), "shown {shown:?}: {ctx}");
    }
    let flush = detok.finish(7).unwrap();
    assert!(
        !flush.contains(FFFD) || full.contains(FFFD),
        "U+FFFD in the flush: {ctx}"
    );
    shown.push_str(&flush);
    assert_eq!(detok.num_requests(), 0);
    assert_eq!(shown, expected.0, "{ctx}");
    // A stop string completed only by the final flush is trimmed but not reported.
    if stop_seen.is_some() {
        assert_eq!(stop_seen, expected.1, "{ctx}");
    }
    Outcome { exact }
}

/// Byte length of the longest common prefix of `a` and `b`, at a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

fn randomized(tok: &Tokenizer, seed: u64, cases: usize) {
    let mut detok = detok_for(tok);
    let mut rng = SplitMix64::new(seed);
    let mut exact = 0;
    for _ in 0..cases {
        let prompt_len = if rng.chance(20) { 0 } else { rng.below(20) };
        let prompt = random_ids(&mut rng, tok, prompt_len);
        let gen_len = rng.below(40);
        let gen = random_ids(&mut rng, tok, gen_len);
        let params = random_params(&mut rng);
        exact += check_case(&mut rng, tok, &mut detok, &prompt, &gen, params).exact as usize;
    }
    // The exact contract must have been what most cases checked.
    assert!(exact * 10 >= cases * 7, "only {exact} of {cases} exact");
}

#[test]
fn randomized_byte_level() {
    randomized(&byte_level_tokenizer(), 1, 600);
}

#[test]
fn randomized_byte_fallback() {
    randomized(&byte_fallback_tokenizer(), 2, 600);
}

/// Valid text only, split at every possible generation boundary, including inside characters.
#[test]
fn every_split_of_valid_text() {
    for tok in [byte_level_tokenizer(), byte_fallback_tokenizer()] {
        let mut detok = detok_for(&tok);
        let mut rng = SplitMix64::new(3);
        for text in CORPUS {
            let ids = encode(&tok, text);
            for split in 0..=ids.len() {
                let params = DecodeParams::default();
                check_case(
                    &mut rng,
                    &tok,
                    &mut detok,
                    &ids[..split],
                    &ids[split..],
                    params,
                );
            }
        }
    }
}

fn byte_token(tok: &Tokenizer, b: u8) -> u32 {
    tok.token_to_id(&format!("<0x{b:02X}>")).unwrap()
}

fn run_all(
    detok: &mut Detokenizer,
    prompt: &[u32],
    gen: &[u32],
    params: DecodeParams,
) -> Vec<String> {
    detok.add_request(1, prompt, params).unwrap();
    let mut deltas: Vec<String> = gen
        .iter()
        .map(|&id| detok.step(1, &[id]).unwrap().text)
        .collect();
    deltas.push(detok.finish(1).unwrap());
    deltas
}

/// One stray byte turns a byte-fallback character already complete into U+FFFD on re-decode:
/// that character must not have been shown.
#[test]
fn byte_fallback_stray_byte_invalidates_run() {
    let tok = byte_fallback_tokenizer();
    let mut detok = detok_for(&tok);
    let prompt = encode(&tok, "Hello");
    // "日" (E6 97 A5) as bytes, then a stray E6, then "▁world".
    let mut gen: Vec<u32> = [0xE6, 0x97, 0xA5, 0xE6]
        .iter()
        .map(|&b| byte_token(&tok, b))
        .collect();
    gen.extend(
        encode(&tok, " world")
            .iter()
            .skip_while(|&&id| tok.id_to_token(id).as_deref() == Some("▁")),
    );
    let deltas = run_all(&mut detok, &prompt, &gen, DecodeParams::default());
    let all: Vec<u32> = prompt.iter().chain(&gen).copied().collect();
    let full = tok.decode(&all, true).unwrap();
    assert!(
        full.starts_with("Hello\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"),
        "{full:?}"
    );
    assert!(deltas.iter().all(|d| !d.contains('日')), "{deltas:?}");
    assert_eq!(format!("Hello{}", deltas.concat()), full);
    // A valid run is released as soon as a non-byte token closes it.
    let gen: Vec<u32> = [0xE6, 0x97, 0xA5]
        .iter()
        .map(|&b| byte_token(&tok, b))
        .chain(encode(&tok, "Hello"))
        .collect();
    let deltas = run_all(&mut detok, &prompt, &gen, DecodeParams::default());
    assert_eq!(deltas[..3], ["", "", ""]);
    assert!(deltas[3].starts_with('日'), "{deltas:?}");
}

/// The first token's leading space follows the full decode: kept after a non-empty prompt,
/// stripped (Strip(" ",1,0)) after an empty one or one made only of skipped special tokens.
#[test]
fn leading_space_of_first_token() {
    let tok = byte_fallback_tokenizer();
    let mut detok = detok_for(&tok);
    let hello = encode(&tok, "Hello");
    let world = encode(&tok, "Hello world")[hello.len()..].to_vec();
    assert_eq!(tok.id_to_token(world[0]).unwrap(), "▁world");
    let bos = tok.token_to_id("<s>").unwrap();
    let cases: [(&[u32], &str); 3] = [(&hello, " world"), (&[], "world"), (&[bos], "world")];
    for (prompt, want) in cases {
        let deltas = run_all(&mut detok, prompt, &world, DecodeParams::default());
        assert_eq!(deltas.concat(), want, "prompt {prompt:?}");
    }
}

#[test]
fn spaces_between_special_tokens() {
    let tok = byte_level_tokenizer();
    let mut detok = detok_for(&tok);
    let start = tok.token_to_id("<|im_start|>").unwrap();
    let end = tok.token_to_id("<|im_end|>").unwrap();
    let mut gen = vec![start];
    gen.extend(encode(&tok, "Hello"));
    gen.push(end);
    gen.push(end);
    let params = |skip, spaces| DecodeParams {
        skip_special_tokens: skip,
        spaces_between_special_tokens: spaces,
        ..DecodeParams::default()
    };
    let text = |detok: &mut Detokenizer, p| run_all(detok, &[], &gen, p).concat();
    assert_eq!(text(&mut detok, params(true, true)), "Hello");
    assert_eq!(text(&mut detok, params(true, false)), "Hello");
    assert_eq!(
        text(&mut detok, params(false, false)),
        "<|im_start|>Hello<|im_end|><|im_end|>"
    );
    assert_eq!(
        text(&mut detok, params(false, true)),
        "<|im_start|> Hello <|im_end|> <|im_end|>"
    );
    // After a prompt with text, the first piece is separated from it too.
    let prompt = encode(&tok, "Hi");
    let deltas = run_all(&mut detok, &prompt, &gen, params(false, true));
    assert_eq!(deltas.concat(), " <|im_start|> Hello <|im_end|> <|im_end|>");
    // Byte-fallback: each piece is decoded on its own, so Strip drops its leading space.
    let tok = byte_fallback_tokenizer();
    let mut detok = detok_for(&tok);
    let eos = tok.token_to_id("</s>").unwrap();
    let mut gen = encode(&tok, "Hi");
    gen.push(eos);
    gen.extend(encode(&tok, " there"));
    assert_eq!(
        run_all(&mut detok, &[], &gen, params(false, true)).concat(),
        "Hi </s> there"
    );
    assert_eq!(
        run_all(&mut detok, &[], &gen, params(false, false)).concat(),
        "Hi</s> there"
    );
    assert_eq!(
        run_all(&mut detok, &[], &gen, params(true, true)).concat(),
        "Hi there"
    );
}

/// Byte-level ids, one byte per token, so a multi-byte character spans several steps.
fn single_byte_ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    let unicode = bytes_to_unicode();
    text.bytes()
        .map(|b| tok.token_to_id(&unicode[&b].to_string()).unwrap())
        .collect()
}

/// GPT-2's byte -> char table.
fn bytes_to_unicode() -> HashMap<u8, char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap()))
        .collect()
}

#[test]
fn stop_string_across_tokens_and_inside_a_character() {
    let tok = byte_level_tokenizer();
    let mut detok = detok_for(&tok);
    let params = |stop: &[&str], keep| DecodeParams {
        stop: stop.iter().map(|s| s.to_string()).collect(),
        no_stop_trim: keep,
        ..DecodeParams::default()
    };
    let gen = single_byte_ids(&tok, "ab 你好 cd");
    detok
        .add_request(1, &[], params(&["x", "你好"], false))
        .unwrap();
    let mut shown = String::new();
    let mut stop = None;
    for &id in &gen {
        let out = detok.step(1, &[id]).unwrap();
        assert!(
            !out.text.contains('你') && !out.text.contains(FFFD),
            "{out:?}"
        );
        shown.push_str(&out.text);
        stop = stop.or(out.stop);
    }
    shown.push_str(&detok.finish(1).unwrap());
    assert_eq!((shown.as_str(), stop), ("ab ", Some(1)));
    // Kept with no_stop_trim, and everything after it cut.
    let deltas = run_all(&mut detok, &[], &gen, params(&["你好"], true));
    assert_eq!(deltas.concat(), "ab 你好");
    // A prefix of a stop string that does not complete is released, at the latest by finish.
    let gen = single_byte_ids(&tok, "ab 你们");
    let deltas = run_all(&mut detok, &[], &gen, params(&["你好"], false));
    assert_eq!(deltas.concat(), "ab 你们");
    let last_step = &deltas[deltas.len() - 2];
    assert_eq!(last_step, "你们");
    // Earliest completion wins over a longer stop string that starts earlier.
    let gen = single_byte_ids(&tok, "abcd");
    let deltas = run_all(&mut detok, &[], &gen, params(&["abcd", "bc"], false));
    assert_eq!(deltas.concat(), "a");
}

fn longest_byte_run(tok: &Tokenizer, ids: &[u32]) -> usize {
    let is_byte = |id: &u32| {
        tok.id_to_token(*id)
            .is_some_and(|t| t.len() == 6 && t.starts_with("<0x"))
    };
    ids.split(|id| !is_byte(id))
        .map(<[u32]>::len)
        .max()
        .unwrap_or(0)
}

fn assert_bounded(detok: &Detokenizer, bound: usize) {
    let len = detok.window_len(1).unwrap();
    assert!(len <= bound, "window holds {len} ids (bound {bound})");
}

/// Long generations keep the window small, and still add up to the full decode.
#[test]
fn window_stays_bounded() {
    for tok in [byte_level_tokenizer(), byte_fallback_tokenizer()] {
        let mut detok = detok_for(&tok);
        let mut rng = SplitMix64::new(4);
        let mut gen = Vec::new();
        while gen.len() < 20_000 {
            gen.extend(encode(&tok, CORPUS[rng.below(CORPUS.len())]));
        }
        detok.add_request(1, &[], DecodeParams::default()).unwrap();
        let mut shown = String::new();
        let mut widest = 0;
        for &id in &gen {
            shown.push_str(&detok.step(1, &[id]).unwrap().text);
            widest = widest.max(detok.window_len(1).unwrap());
        }
        // Cut back to a few emitted ids, plus what is held: byte-level ids ending inside a
        // character (emoji strings), or a byte-fallback run, held whole until a non-byte id
        // closes it (the toy vocabulary spells a Japanese sentence as one 57-byte run).
        let bound = 24 + longest_byte_run(&tok, &gen);
        assert!(widest <= bound, "window held {widest} ids (bound {bound})");
        shown.push_str(&detok.finish(1).unwrap());
        assert_eq!(shown, tok.decode(&gen, true).unwrap());
    }
}

/// Pathological output: endless skipped special tokens, an endless valid byte-fallback run,
/// tokens whose text is a literal U+FFFD. Memory stays bounded; valid text stays exact.
#[test]
fn window_bounded_on_pathological_output() {
    let bound = 2 * MAX_PENDING + 16;
    let tok = byte_fallback_tokenizer();
    let mut detok = detok_for(&tok);
    let eos = tok.token_to_id("</s>").unwrap();
    let emoji: Vec<u32> = "😀".bytes().map(|b| byte_token(&tok, b)).collect();
    let mut rng = SplitMix64::new(6);
    let garbage: Vec<u32> = (0..5000)
        .map(|_| byte_token(&tok, rng.next_u64() as u8))
        .collect();
    let sequences = [
        (vec![eos; 5000], true),
        (emoji.repeat(2000), true),
        (garbage, false),
    ];
    for (gen, exact) in sequences {
        detok
            .add_request(1, &encode(&tok, "Hi"), DecodeParams::default())
            .unwrap();
        let mut shown = String::new();
        for &id in &gen {
            shown.push_str(&detok.step(1, &[id]).unwrap().text);
            assert_bounded(&detok, bound);
        }
        shown.push_str(&detok.finish(1).unwrap());
        // A byte run longer than MAX_PENDING that turns invalid is released inexactly.
        if exact {
            let all: Vec<u32> = encode(&tok, "Hi").into_iter().chain(gen).collect();
            assert_eq!(format!("Hi{shown}"), tok.decode(&all, true).unwrap());
        }
    }
    let tok = byte_level_tokenizer();
    let mut detok = detok_for(&tok);
    let gen = single_byte_ids(&tok, &"\u{FFFD}".repeat(3000));
    detok.add_request(1, &[], DecodeParams::default()).unwrap();
    let mut shown = String::new();
    for &id in &gen {
        shown.push_str(&detok.step(1, &[id]).unwrap().text);
        assert_bounded(&detok, bound);
    }
    shown.push_str(&detok.finish(1).unwrap());
    assert_eq!(shown, tok.decode(&gen, true).unwrap());
}

#[test]
fn step_batch_matches_single_steps() {
    let tok = byte_level_tokenizer();
    let mut batched = detok_for(&tok);
    let mut single = detok_for(&tok);
    let mut rng = SplitMix64::new(5);
    let seqs: Vec<Vec<u32>> = (0..6).map(|_| random_ids(&mut rng, &tok, 60)).collect();
    for (rid, _) in seqs.iter().enumerate() {
        batched
            .add_request(rid as u64, &[], DecodeParams::default())
            .unwrap();
        single
            .add_request(rid as u64, &[], DecodeParams::default())
            .unwrap();
    }
    for pos in (0..60).step_by(3) {
        let items: Vec<(u64, Vec<u32>)> = seqs
            .iter()
            .enumerate()
            .map(|(rid, s)| (rid as u64, s[pos..pos + 3].to_vec()))
            .collect();
        let outs = batched.step_batch(&items);
        for ((rid, ids), out) in items.iter().zip(outs) {
            assert_eq!(out.unwrap(), single.step(*rid, ids).unwrap());
        }
    }
    let outs = batched.step_batch(&[(0, vec![1]), (99, vec![1])]);
    assert!(outs[0].is_ok());
    assert!(matches!(outs[1], Err(DetokError::UnknownRequest(99))));
}

#[test]
fn request_lifecycle_and_errors() {
    let tok = byte_level_tokenizer();
    let mut detok = detok_for(&tok);
    assert_eq!(detok.num_requests(), 0);
    detok.add_request(1, &[], DecodeParams::default()).unwrap();
    assert!(matches!(
        detok.add_request(1, &[], DecodeParams::default()),
        Err(DetokError::DuplicateRequest(1))
    ));
    assert!(matches!(
        detok.step(2, &[1]),
        Err(DetokError::UnknownRequest(2))
    ));
    assert!(matches!(
        detok.finish(2),
        Err(DetokError::UnknownRequest(2))
    ));
    assert!(detok.contains(1));
    assert_eq!(detok.num_requests(), 1);
    assert!(detok.remove(1));
    assert!(!detok.remove(1));
    assert_eq!(detok.num_requests(), 0);
    let ids = encode(&tok, CORPUS[2]);
    assert_eq!(detok.decode(&ids, true).unwrap(), CORPUS[2]);
    // Ids outside the vocabulary are dropped, as the tokenizer's decode drops them.
    assert_eq!(detok.decode(&[u32::MAX], true).unwrap(), "");
}

#[test]
fn load_errors_and_folders() {
    assert!(matches!(
        Detokenizer::from_json("{"),
        Err(DetokError::Load(_))
    ));
    assert!(matches!(
        Detokenizer::from_file("/nonexistent/tokenizer.json"),
        Err(DetokError::Load(_))
    ));
    let dir = std::env::temp_dir().join(format!("srt-detok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tok = byte_level_tokenizer();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string(false).unwrap()).unwrap();
    let from_dir = Detokenizer::from_file(dir.to_str().unwrap()).unwrap();
    let from_file = Detokenizer::from_file(dir.join("tokenizer.json").to_str().unwrap()).unwrap();
    let ids = encode(&tok, CORPUS[4]);
    assert_eq!(from_dir.decode(&ids, true).unwrap(), CORPUS[4]);
    assert_eq!(from_file.decode(&ids, true).unwrap(), CORPUS[4]);
    std::fs::remove_dir_all(&dir).unwrap();
}
