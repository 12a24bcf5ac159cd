//! Micro benchmark of the radix tree: `cargo run --release --example radix_bench`.
//!
//! (a) evict every leaf of a tree with ~40,000 leaves; (b) insert one 1M-token key.
//! SGLang's Python RadixCache takes about 70 ms and 50 ms for these.

use srt_core::radix::RadixTree;
use std::time::Instant;

/// Best of a few runs, in milliseconds; `setup` and dropping the result are not timed.
fn best_ms<S, T>(runs: usize, mut setup: impl FnMut() -> S, mut f: impl FnMut(S) -> T) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let state = setup();
        let t = Instant::now();
        let out = std::hint::black_box(f(state));
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        drop(out); // not timed: `f` returns the tree so that freeing it is left out
    }
    best
}

fn main() {
    const LEAVES: u32 = 40_000;
    // 200 shared 16-token prefixes, each with 200 distinct 16-token tails: 40,000 leaves.
    let build = || {
        let mut tree = RadixTree::new(1).unwrap();
        let mut value = 0u32;
        for i in 0..LEAVES {
            let mut key: Vec<u32> = (0..16).map(|t| (i / 200) * 16 + t).collect();
            key.extend((0..16).map(|t| 1_000_000 + i * 16 + t));
            let values: Vec<u32> = (value..value + 32).collect();
            value += 32;
            // The duplicates of the shared prefix would go back to the allocator; not here.
            tree.insert(&key, &values, "").unwrap();
        }
        tree
    };
    let evict_ms = best_ms(5, build, |mut tree| {
        let freed = tree.evict(usize::MAX);
        assert_eq!(tree.total_size(), 0);
        (tree, freed)
    });
    println!("evict all of {LEAVES} leaves (+200 inner nodes): {evict_ms:.2} ms");
    // What one scheduler step asks for: room for a single 16-token request. SGLang rebuilds a
    // heap of every leaf per call; here it is one pop from the ordered index.
    let evict_one_ms = best_ms(5, build, |mut tree| {
        let freed = tree.evict(16);
        (tree, freed)
    });
    println!("evict 16 tokens from {LEAVES} leaves: {evict_one_ms:.4} ms");

    const N: u32 = 1_000_000;
    let key: Vec<u32> = (0..N).map(|t| t % 50_000).collect();
    let values: Vec<u32> = (1..=N).collect();
    let insert_ms = best_ms(
        5,
        || RadixTree::new(1).unwrap(),
        |mut tree| {
            tree.insert(&key, &values, "").unwrap();
            tree
        },
    );
    println!("insert one {N}-token key: {insert_ms:.2} ms");

    // The same key again: a full match of the existing edge (compare 1M tokens, no copy).
    let mut tree = RadixTree::new(1).unwrap();
    tree.insert(&key, &values, "").unwrap();
    let again_ms = best_ms(5, || (), |()| tree.insert(&key, &values, "").unwrap());
    println!("re-insert the cached 1M-token key: {again_ms:.2} ms");
    let match_ms = best_ms(5, || (), |()| tree.match_prefix(&key, "").len);
    println!("match the cached 1M-token key: {match_ms:.2} ms");
}
