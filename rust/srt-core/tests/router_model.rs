//! Seeded randomized test of `PrefixIndex` against a reference model: per replica, the set of
//! prefixes of the keys routed there (with their namespace).
//!
//! Without eviction (a cap no run reaches) the index must be exact:
//! - a replica's match length is the longest common prefix of the key with any key routed to
//!   that replica in the same namespace, and its size the number of distinct non-empty
//!   prefixes of those keys;
//! - the best match is the candidate with the longest match, then the smallest size, then the
//!   lowest index; `smallest` is the candidate of least size, then lowest index;
//! - insert returns the longest prefix of the key already held.
//!
//! With a small cap the index forgets, but never invents: every match and insert result is at
//! most the model's, each replica stays within the cap, and a key no longer than the cap is
//! fully matched right after its insert.

use srt_core::router::{PrefixIndex, RouteMatch};
use std::collections::HashSet;

use srt_core::rng::SplitMix64;

const NAMESPACES: [&str; 2] = ["", "salt"];

/// Every distinct non-empty prefix (with its namespace) of the keys routed to one replica.
#[derive(Default, Clone)]
struct ModelReplica {
    prefixes: HashSet<(String, Vec<u32>)>,
}

impl ModelReplica {
    fn longest(&self, key: &[u32], ns: &str) -> usize {
        (1..=key.len())
            .take_while(|&i| self.prefixes.contains(&(ns.to_string(), key[..i].to_vec())))
            .last()
            .unwrap_or(0)
    }
    fn add(&mut self, key: &[u32], ns: &str) {
        for i in 1..=key.len() {
            self.prefixes.insert((ns.to_string(), key[..i].to_vec()));
        }
    }
    fn size(&self) -> usize {
        self.prefixes.len()
    }
}

fn random_key(rng: &mut SplitMix64) -> Vec<u32> {
    // A small alphabet and a few shared heads, so keys overlap a lot.
    let head: &[u32] = match rng.below(3) {
        0 => &[],
        1 => &[1, 2, 3, 4],
        _ => &[1, 2, 9],
    };
    let mut key = head.to_vec();
    for _ in 0..rng.below(8) {
        key.push(rng.below(4) as u32);
    }
    key
}

fn random_candidates(rng: &mut SplitMix64, n: usize) -> Vec<usize> {
    (0..n).filter(|_| rng.below(4) != 0).collect()
}

fn run(seed: u64, replicas: usize, cap: usize, ops: usize) {
    let mut rng = SplitMix64::new(seed);
    let mut ix = PrefixIndex::new(replicas, cap).unwrap();
    let mut model = vec![ModelReplica::default(); replicas];
    let exact = cap == usize::MAX;
    for step in 0..ops {
        let key = random_key(&mut rng);
        let ns = NAMESPACES[rng.below(NAMESPACES.len())];
        let ctx = format!("seed {seed} step {step} key {key:?} ns {ns:?}");
        match rng.below(10) {
            0..=4 => {
                let r = rng.below(replicas);
                let held = model[r].longest(&key, ns);
                let got = ix.insert(r, &key, ns).unwrap();
                if exact {
                    assert_eq!(got, held, "{ctx}");
                } else {
                    assert!(got <= held, "{ctx}");
                }
                model[r].add(&key, ns);
                let size = ix.size(r).unwrap();
                if exact {
                    assert_eq!(size, model[r].size(), "{ctx}");
                } else {
                    assert!(size <= cap, "{ctx}");
                    if key.len() <= cap {
                        let m = ix.match_prefix(&key, ns, &[r]).unwrap().unwrap();
                        assert_eq!(m.len, key.len(), "{ctx}");
                    }
                }
            }
            5..=8 => {
                let cands = random_candidates(&mut rng, replicas);
                let sizes: Vec<usize> = (0..replicas).map(|r| ix.size(r).unwrap()).collect();
                let got = ix.match_prefix(&key, ns, &cands).unwrap();
                if cands.is_empty() {
                    assert_eq!(got, None, "{ctx}");
                    continue;
                }
                let got = got.unwrap();
                assert!(cands.contains(&got.replica), "{ctx}");
                assert!(got.len <= model[got.replica].longest(&key, ns), "{ctx}");
                if exact {
                    let want = cands
                        .iter()
                        .map(|&r| (model[r].longest(&key, ns), sizes[r], r))
                        .min_by_key(|&(len, size, r)| (std::cmp::Reverse(len), size, r))
                        .map(|(len, _, replica)| RouteMatch { replica, len })
                        .unwrap();
                    assert_eq!(got, want, "{ctx}");
                }
            }
            _ => {
                let cands = random_candidates(&mut rng, replicas);
                let want = cands
                    .iter()
                    .copied()
                    .min_by_key(|&r| (ix.size(r).unwrap(), r));
                assert_eq!(ix.smallest(&cands).unwrap(), want, "{ctx}");
                if rng.below(20) == 0 {
                    let r = rng.below(replicas);
                    ix.clear(r).unwrap();
                    model[r].prefixes.clear();
                    assert_eq!(ix.size(r).unwrap(), 0, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn exact_without_eviction() {
    for seed in 0..20 {
        run(seed, 1 + (seed as usize % 4), usize::MAX, 2_000);
    }
}

#[test]
fn never_invents_with_a_small_cap() {
    for seed in 100..120 {
        run(seed, 1 + (seed as usize % 3), 6 + seed as usize % 10, 3_000);
    }
}
