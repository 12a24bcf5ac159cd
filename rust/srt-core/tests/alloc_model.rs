//! Seeded randomized test of `SlotAllocator` against a set of allocated pages.
//!
//! Sequences grow by `alloc` / `alloc_extend` and die by `free`; bad frees (double free, a slot
//! never handed out, outside the pool) are mixed in. After every operation: no slot is owned
//! twice, every sequence fills its last page before taking a new one, out-of-memory happens
//! exactly when the model lacks pages, and failed calls change nothing.

use srt_core::alloc::{AllocError, SlotAllocator};
use std::collections::HashSet;

use srt_core::rng::SplitMix64;

fn run(seed: u64, size: usize, page: usize, ops: usize) {
    let mut rng = SplitMix64::new(seed);
    let mut a = SlotAllocator::new(size, page).unwrap();
    let num_pages = size / page;
    // Model: allocated page ids and the slots of each live sequence.
    let mut used: HashSet<u32> = HashSet::new();
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut ooms = 0;

    // Checks that `new` slots continue `seq` page by page and take only free pages.
    let take = |used: &mut HashSet<u32>, seq: &[u32], new: &[u32], ctx: &str| {
        let mut last = seq.last().copied();
        for (len, &s) in (seq.len()..).zip(new) {
            let p = s / page as u32;
            assert!(
                p >= 1 && p as usize <= num_pages,
                "{ctx}: slot {s} outside the pool"
            );
            if len.is_multiple_of(page) {
                assert_eq!(
                    s as usize % page,
                    0,
                    "{ctx}: fresh page must start at offset 0"
                );
                assert!(used.insert(p), "{ctx}: page {p} handed out twice");
            } else {
                assert_eq!(
                    Some(s),
                    last.map(|l| l + 1),
                    "{ctx}: last page not filled first"
                );
            }
            last = Some(s);
        }
    };

    for op in 0..ops {
        let ctx = format!("seed {seed} page {page} op {op}");
        let free_pages = num_pages - used.len();
        match rng.below(10) {
            // a new sequence
            0..=2 => {
                let n = rng.below(4 * page + 2);
                match a.alloc(n) {
                    Ok(slots) => {
                        assert_eq!(slots.len(), n, "{ctx}");
                        take(&mut used, &[], &slots, &ctx);
                        seqs.push(slots);
                    }
                    Err(AllocError::OutOfMemory {
                        requested,
                        available,
                    }) => {
                        assert!(n.div_ceil(page) > free_pages, "{ctx}: spurious OOM");
                        assert_eq!((requested, available), (n, free_pages * page), "{ctx}");
                        ooms += 1;
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            // grow a sequence
            3..=5 if !seqs.is_empty() => {
                let i = rng.below(seqs.len());
                let n = rng.below(2 * page + 2);
                let seq = &seqs[i];
                let need = a.pages_needed(seq.len(), n);
                let room = if seq.len().is_multiple_of(page) {
                    0
                } else {
                    page - seq.len() % page
                };
                assert_eq!(need, n.saturating_sub(room).div_ceil(page), "{ctx}");
                let last = seq.last().copied().unwrap_or(0);
                match a.alloc_extend(seq.len(), last, n) {
                    Ok(slots) => {
                        assert_eq!(slots.len(), n, "{ctx}");
                        take(&mut used, seq, &slots, &ctx);
                        seqs[i].extend(slots);
                    }
                    Err(AllocError::OutOfMemory { .. }) => {
                        assert!(need > free_pages, "{ctx}: spurious OOM");
                        ooms += 1;
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            // free a whole sequence, in a shuffled order with a duplicate
            6..=8 if !seqs.is_empty() => {
                let mut seq = seqs.swap_remove(rng.below(seqs.len()));
                if let Some(&s) = seq.first() {
                    seq.push(s);
                }
                for k in (1..seq.len()).rev() {
                    seq.swap(k, rng.below(k + 1));
                }
                a.free(&seq).unwrap();
                for s in seq {
                    used.remove(&(s / page as u32));
                }
            }
            // a bad free: every live sequence's first slot plus one slot that is free or
            // outside the pool; nothing may be freed
            _ => {
                let bad = rng.below(size + 3 * page) as u32;
                let bad_page = bad / page as u32;
                if used.contains(&bad_page) {
                    continue;
                }
                let mut slots: Vec<u32> = seqs.iter().flat_map(|s| s.first().copied()).collect();
                slots.insert(rng.below(slots.len() + 1), bad);
                let want = if bad_page == 0 || bad_page as usize > num_pages {
                    AllocError::OutOfRange(bad)
                } else {
                    AllocError::NotAllocated(bad)
                };
                assert_eq!(a.free(&slots), Err(want), "{ctx}");
            }
        }
        assert_eq!(
            a.available(),
            (num_pages - used.len()) * page,
            "{ctx}: available"
        );
        let owned: usize = seqs.iter().map(|s| s.len().div_ceil(page)).sum();
        assert_eq!(owned, used.len(), "{ctx}: pages owned by sequences");
    }
    assert!(ooms > ops / 100, "only {ooms} out-of-memory cases");
    let all: Vec<u32> = seqs.concat();
    a.free(&all).unwrap();
    assert_eq!(a.available(), size);
    a.reset();
    assert_eq!(a.available(), size);
}

#[test]
fn random_ops_page_1() {
    run(0xA110_0001, 64, 1, 50_000);
}

#[test]
fn random_ops_page_4() {
    run(0xA110_0004, 128, 4, 50_000);
}
