//! Micro benchmark of the incremental detokenizer: ns per generated token as generations grow.
//! Flat numbers from 1k to 32k tokens show the per-token cost does not depend on length.
//!
//! `cargo run --release --example detok_bench [tokenizer.json]`: without a path, a byte-level
//! BPE is trained on the spot on a built-in text.

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use srt_core::detok::{DecodeParams, Detokenizer};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::{AddedToken, TokenizerImpl};
use tokenizers::{NormalizerWrapper, PostProcessorWrapper, Tokenizer, TokenizerBuilder};

const TEXT: &str = "The detokenizer turns token ids into text as they are generated. \
    It holds back incomplete characters such as 😀 or 你好世界 and anything that could start \
    a stop string, then releases text once it is final. Ünïcödé àccénts, code: fn main() {}\n";

fn trained_tokenizer() -> Tokenizer {
    let mut trainer = BpeTrainer::builder()
        .vocab_size(1000)
        .show_progress(false)
        .initial_alphabet(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect::<HashSet<char>>(),
        )
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
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
            .expect("tokenizer builds");
    tk.train(&mut trainer, std::iter::repeat_n(TEXT, 20))
        .expect("training succeeds");
    Tokenizer::from(tk)
}

/// ns per token to stream `ids` through one request, one id per step.
fn stream(detok: &mut Detokenizer, ids: &[u32]) -> f64 {
    detok
        .add_request(1, &[], DecodeParams::default())
        .expect("new request");
    let start = Instant::now();
    let mut bytes = 0;
    for &id in ids {
        bytes += black_box(detok.step(1, &[id]).expect("known request"))
            .text
            .len();
    }
    bytes += detok.finish(1).expect("known request").len();
    let elapsed = start.elapsed();
    black_box(bytes);
    elapsed.as_nanos() as f64 / ids.len() as f64
}

fn main() {
    let tokenizer = match std::env::args().nth(1) {
        Some(path) => Tokenizer::from_file(&path).expect("readable tokenizer.json"),
        None => trained_tokenizer(),
    };
    let json = tokenizer.to_string(false).expect("tokenizer serializes");
    let mut detok = Detokenizer::from_json(&json).expect("tokenizer loads");
    let per_copy = tokenizer
        .encode(TEXT, false)
        .expect("text encodes")
        .get_ids()
        .to_vec();
    let ids: Vec<u32> = per_copy.iter().copied().cycle().take(32 * 1024).collect();
    stream(&mut detok, &ids[..1024]); // warm-up
    println!("{:>10}  {:>10}", "tokens", "ns/token");
    for n in [1024, 4096, 16 * 1024, 32 * 1024] {
        let best = (0..3)
            .map(|_| stream(&mut detok, &ids[..n]))
            .fold(f64::INFINITY, f64::min);
        println!("{n:>10}  {best:>10.0}");
    }
    // For scale: one full decode of the longest sequence (what re-decoding every step costs).
    let start = Instant::now();
    black_box(detok.decode(&ids, true).expect("decodes"));
    println!(
        "one full decode of {} ids: {:.2} ms",
        ids.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
}
