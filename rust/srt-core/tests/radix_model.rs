//! Seeded randomized test of `RadixTree` against a page-level reference model.
//!
//! The model is the set of cached page-aligned prefixes (namespace + tokens), each holding the
//! KV values of its last page and the logical time of the last match/insert whose path covered
//! it. Node boundaries are invisible to it, which is the point: it checks the tree's observable
//! behaviour, not its structure. After every operation:
//! - match returns the model's longest cached page-aligned prefix and its values;
//! - insert returns the length the model already had cached;
//! - evictable + protected == total, and both equal the model's counts (a page is protected
//!   when some held lock's prefix covers it);
//! - evict frees exactly the model's least recently used unlocked leaf pages (so locked paths
//!   survive and the order is LRU), no more than the last evicted node beyond `n_tokens`, and
//!   stops short only when nothing is evictable;
//! - no value is freed twice or cached twice (values are never reused; reset returns exactly
//!   the model's values).

use srt_core::radix::{NodeId, RadixError, RadixTree};
use std::collections::{HashMap, HashSet};

use srt_core::rng::SplitMix64;

const NAMESPACES: [&str; 3] = ["", "a", "b"];

struct Page {
    values: Vec<u32>,
    time: u64,
    /// Cached pages that extend this one by one page.
    children: usize,
}

struct Held {
    node: NodeId,
    /// `[ns, tokens..]` of the locked prefix.
    path: Vec<u32>,
}

/// Pages keyed by `[namespace index, tokens of the prefix up to and including the page]`.
struct Model {
    page: usize,
    pages: HashMap<Vec<u32>, Page>,
    held: Vec<Held>,
    time: u64,
}

impl Model {
    fn path(ns: usize, key: &[u32]) -> Vec<u32> {
        let mut p = vec![ns as u32];
        p.extend_from_slice(key);
        p
    }

    fn aligned(&self, len: usize) -> usize {
        len / self.page * self.page
    }

    /// Longest cached prefix of `key` (length, values); stamps its pages with a new time.
    fn match_prefix(&mut self, ns: usize, key: &[u32]) -> (usize, Vec<u32>) {
        self.time += 1;
        let path = Self::path(ns, key);
        let mut len = 0;
        let mut values = Vec::new();
        while len + self.page <= key.len() {
            let Some(p) = self.pages.get_mut(&path[..1 + len + self.page]) else {
                break;
            };
            p.time = self.time;
            values.extend_from_slice(&p.values);
            len += self.page;
        }
        (len, values)
    }

    fn insert(&mut self, ns: usize, key: &[u32], values: &[u32]) -> usize {
        self.time += 1;
        let path = Self::path(ns, key);
        let n = self.aligned(key.len());
        let mut cached = None;
        for end in (self.page..=n).step_by(self.page) {
            let prefix = &path[..1 + end];
            if let Some(p) = self.pages.get_mut(prefix) {
                p.time = self.time;
                continue;
            }
            cached.get_or_insert(end - self.page);
            if end > self.page {
                self.pages
                    .get_mut(&path[..1 + end - self.page])
                    .unwrap()
                    .children += 1;
            }
            let page = Page {
                values: values[end - self.page..end].to_vec(),
                time: self.time,
                children: 0,
            };
            self.pages.insert(prefix.to_vec(), page);
        }
        cached.unwrap_or(n)
    }

    /// Cached pages covered by some held lock.
    fn protected_pages(&self) -> HashSet<&[u32]> {
        let mut set = HashSet::new();
        for h in &self.held {
            for end in (self.page..h.path.len()).step_by(self.page) {
                set.insert(&h.path[..1 + end]);
            }
        }
        set
    }

    /// Removes the least recently used unlocked leaf page; returns its time and values.
    fn evict_one(&mut self) -> Option<(u64, Vec<u32>)> {
        let protected = self.protected_pages();
        let victim = self
            .pages
            .iter()
            .filter(|(k, p)| p.children == 0 && !protected.contains(k.as_slice()))
            .min_by_key(|(_, p)| p.time)
            .map(|(k, _)| k.clone())?;
        let page = self.pages.remove(&victim).unwrap();
        if victim.len() > 1 + self.page {
            self.pages
                .get_mut(&victim[..victim.len() - self.page])
                .unwrap()
                .children -= 1;
        }
        Some((page.time, page.values))
    }

    fn evictable_pages(&self) -> usize {
        let protected = self.protected_pages();
        self.pages
            .keys()
            .filter(|k| !protected.contains(k.as_slice()))
            .count()
    }
}

/// Keys over a tiny alphabet, so that prefixes are shared and edges split often.
fn random_key(rng: &mut SplitMix64, page: usize) -> Vec<u32> {
    let len = rng.below(6 * page + 6);
    let alphabet = if page == 1 { 3 } else { 2 };
    (0..len).map(|_| rng.below(alphabet) as u32).collect()
}

fn run(seed: u64, page: usize, ops: usize) {
    let mut rng = SplitMix64::new(seed);
    let mut tree = RadixTree::new(page).unwrap();
    let mut model = Model {
        page,
        pages: HashMap::new(),
        held: Vec::new(),
        time: 0,
    };
    let mut next_value = 0u32;
    let mut freed_ever: HashSet<u32> = HashSet::new();
    let mut evicted_tokens = 0usize;

    for op in 0..ops {
        let ctx = format!("seed {seed} page {page} op {op}");
        let ns = rng.below(NAMESPACES.len());
        match rng.below(1000) {
            // match, sometimes keeping a lock on the matched node
            0..=399 => {
                let key = random_key(&mut rng, page);
                let m = tree.match_prefix(&key, NAMESPACES[ns]);
                let (len, values) = model.match_prefix(ns, &key);
                assert_eq!((m.len, &m.values), (len, &values), "{ctx}: match {key:?}");
                assert_eq!(m.values.len(), m.len, "{ctx}");
                if model.held.len() < 8 && rng.chance(30) {
                    tree.lock(m.node).unwrap();
                    let path = Model::path(ns, &key[..len]);
                    model.held.push(Held { node: m.node, path });
                }
            }
            // insert fresh values
            400..=749 => {
                let key = random_key(&mut rng, page);
                let values: Vec<u32> = (next_value..next_value + key.len() as u32).collect();
                next_value += key.len() as u32;
                let got = tree.insert(&key, &values, NAMESPACES[ns]).unwrap();
                let want = model.insert(ns, &key, &values);
                assert_eq!(got, want, "{ctx}: insert {key:?}");
                assert_eq!(got % page, 0, "{ctx}");
            }
            // unlock a held lock
            750..=849 => {
                if !model.held.is_empty() {
                    let h = model.held.swap_remove(rng.below(model.held.len()));
                    // The locked node still exists and sits at the end of its prefix.
                    let mut depth = 0;
                    let mut id = h.node;
                    while let Some(p) = tree.parent(id) {
                        id = p;
                        depth += 1;
                    }
                    assert!(depth <= (h.path.len() - 1) / page, "{ctx}: depth {depth}");
                    assert_eq!(depth == 0, h.path.len() == 1, "{ctx}");
                    tree.unlock(h.node).unwrap();
                }
            }
            // evict
            850..=997 => {
                let n = rng.below(8 * page + 1);
                let mut freed = tree.evict(n);
                let mut want = Vec::new();
                let mut times = Vec::new();
                while want.len() < freed.len() {
                    let (time, values) = model.evict_one().unwrap_or_else(|| {
                        panic!(
                            "{ctx}: tree freed {} tokens, model only {}",
                            freed.len(),
                            want.len()
                        )
                    });
                    times.push(time);
                    want.extend(values);
                }
                freed.sort_unstable();
                want.sort_unstable();
                assert_eq!(freed, want, "{ctx}: evict {n} (LRU order, locks respected)");
                if freed.len() < n {
                    assert_eq!(model.evictable_pages(), 0, "{ctx}: evict stopped early");
                }
                if let Some(&last) = times.last() {
                    // Pages of the last evicted node share its time (and so may descendants
                    // evicted in this call); without them fewer than `n` tokens were freed.
                    let last_run = times.iter().filter(|&&t| t == last).count() * page;
                    assert!(
                        freed.len() - last_run < n,
                        "{ctx}: evict {n} freed {}",
                        freed.len()
                    );
                }
                for v in &freed {
                    assert!(freed_ever.insert(*v), "{ctx}: value {v} freed twice");
                }
                evicted_tokens += freed.len();
            }
            // reset: everything cached comes back exactly once
            _ => {
                let mut all = tree.reset();
                let mut want: Vec<u32> = model
                    .pages
                    .values()
                    .flat_map(|p| p.values.iter().copied())
                    .collect();
                all.sort_unstable();
                want.sort_unstable();
                let before = all.len();
                all.dedup();
                assert_eq!(all.len(), before, "{ctx}: a value was cached twice");
                assert_eq!(all, want, "{ctx}: reset");
                for v in &all {
                    assert!(freed_ever.insert(*v), "{ctx}: value {v} freed twice");
                }
                model.pages.clear();
                model.held.clear();
            }
        }
        let total = model.pages.len() * page;
        let protected = model.protected_pages().len() * page;
        assert_eq!(tree.total_size(), total, "{ctx}: total");
        assert_eq!(tree.protected_size(), protected, "{ctx}: protected");
        assert_eq!(
            tree.evictable_size() + tree.protected_size(),
            tree.total_size(),
            "{ctx}"
        );
    }
    // Enough happened for the checks to mean something.
    assert!(
        evicted_tokens > ops / 10,
        "only {evicted_tokens} tokens evicted"
    );
    for h in model.held.drain(..) {
        tree.unlock(h.node).unwrap();
    }
    assert_eq!(tree.protected_size(), 0);
    let rest = tree.evict(usize::MAX);
    assert_eq!(rest.len(), model.pages.len() * page);
    assert_eq!(tree.total_size(), 0);
}

#[test]
fn random_ops_page_1() {
    run(0x5EED_0001, 1, 60_000);
}

#[test]
fn random_ops_page_4() {
    run(0x5EED_0004, 4, 40_000);
}

#[test]
fn unlock_errors_do_not_change_state() {
    let mut tree = RadixTree::new(1).unwrap();
    tree.insert(&[1, 2], &[1, 2], "").unwrap();
    let node = tree.match_prefix(&[1, 2], "").node;
    assert_eq!(tree.unlock(node), Err(RadixError::NotLocked(node)));
    assert_eq!(tree.evictable_size(), 2);
    assert_eq!(tree.protected_size(), 0);
}
