//! Approximate prefix index over the replicas of a data-parallel server (or the workers behind
//! an HTTP router): which replica most likely still holds a key's prefix in its cache.
//!
//! One [`RadixTree`] per replica, keyed by what was routed there (token ids, or UTF-8 bytes of
//! a prompt). The index never sees the replicas' real caches: it assumes a replica caches what
//! it was sent and forgets the least recently routed keys once it holds more than
//! `max_tokens` (the replica's KV pool, or a memory cap), like the replica's own LRU does.
//! Values in the trees are unused (all zero); the trees are never locked, so every leaf is
//! evictable.
//!
//! - `match_prefix` reports, among candidate replicas, the one with the longest match (ties:
//!   the smallest tree, then the lowest index). It refreshes the matched paths' recency.
//! - `insert` records a key as routed to a replica, then evicts that replica's least recently
//!   used leaves down to `max_tokens`. A key no longer than `max_tokens` always survives its
//!   own insert (it is the most recent path).

use crate::radix::RadixTree;
use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RouterError {
    #[error("a prefix index needs at least one replica")]
    NoReplicas,
    #[error("max_tokens must be >= 1")]
    BadCapacity,
    #[error("replica {replica} out of range (the index has {replicas})")]
    BadReplica { replica: usize, replicas: usize },
}

/// Result of [`PrefixIndex::match_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// The candidate with the longest cached prefix of the key.
    pub replica: usize,
    /// Length of that prefix.
    pub len: usize,
}

pub struct PrefixIndex {
    trees: Vec<RadixTree>,
    max_tokens: usize,
}

impl PrefixIndex {
    pub fn new(replicas: usize, max_tokens: usize) -> Result<Self, RouterError> {
        if replicas == 0 {
            return Err(RouterError::NoReplicas);
        }
        if max_tokens == 0 {
            return Err(RouterError::BadCapacity);
        }
        let trees = (0..replicas)
            .map(|_| RadixTree::new(1).expect("page size 1 is valid"))
            .collect();
        Ok(PrefixIndex { trees, max_tokens })
    }

    pub fn num_replicas(&self) -> usize {
        self.trees.len()
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The candidate holding the longest prefix of `key` in `namespace`; `None` when
    /// `candidates` is empty. Ties go to the smallest tree (most room), then the lowest index.
    pub fn match_prefix(
        &mut self,
        key: &[u32],
        namespace: &str,
        candidates: &[usize],
    ) -> Result<Option<RouteMatch>, RouterError> {
        self.check_all(candidates)?;
        let mut best: Option<(RouteMatch, usize)> = None;
        for &replica in candidates {
            let tree = &mut self.trees[replica];
            let len = tree.match_prefix(key, namespace).len;
            let size = tree.total_size();
            let better = match best {
                None => true,
                Some((b, b_size)) => {
                    (len, std::cmp::Reverse(size), std::cmp::Reverse(replica))
                        > (
                            b.len,
                            std::cmp::Reverse(b_size),
                            std::cmp::Reverse(b.replica),
                        )
                }
            };
            if better {
                best = Some((RouteMatch { replica, len }, size));
            }
        }
        Ok(best.map(|(m, _)| m))
    }

    /// Records `key` as routed to `replica`; returns how much of it the replica already held.
    /// Then evicts the replica's least recently used keys down to `max_tokens`.
    pub fn insert(
        &mut self,
        replica: usize,
        key: &[u32],
        namespace: &str,
    ) -> Result<usize, RouterError> {
        self.check(replica)?;
        let tree = &mut self.trees[replica];
        let values = vec![0u32; key.len()];
        let had = tree
            .insert(key, &values, namespace)
            .expect("key and values have the same length");
        let total = tree.total_size();
        if total > self.max_tokens {
            tree.evict(total - self.max_tokens);
        }
        Ok(had)
    }

    /// The candidate with the smallest tree (ties: the lowest index); `None` when empty.
    pub fn smallest(&self, candidates: &[usize]) -> Result<Option<usize>, RouterError> {
        self.check_all(candidates)?;
        Ok(candidates
            .iter()
            .copied()
            .min_by_key(|&r| (self.trees[r].total_size(), r)))
    }

    /// Tokens indexed for `replica`.
    pub fn size(&self, replica: usize) -> Result<usize, RouterError> {
        self.check(replica)?;
        Ok(self.trees[replica].total_size())
    }

    /// Forgets everything routed to `replica` (its cache was flushed, or it went away).
    pub fn clear(&mut self, replica: usize) -> Result<(), RouterError> {
        self.check(replica)?;
        self.trees[replica].reset();
        Ok(())
    }

    fn check(&self, replica: usize) -> Result<(), RouterError> {
        if replica < self.trees.len() {
            Ok(())
        } else {
            Err(RouterError::BadReplica {
                replica,
                replicas: self.trees.len(),
            })
        }
    }

    fn check_all(&self, candidates: &[usize]) -> Result<(), RouterError> {
        candidates.iter().try_for_each(|&r| self.check(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_construction() {
        assert_eq!(PrefixIndex::new(0, 10).err(), Some(RouterError::NoReplicas));
        assert_eq!(PrefixIndex::new(2, 0).err(), Some(RouterError::BadCapacity));
    }

    #[test]
    fn longest_match_wins_and_ties_prefer_room() {
        let mut ix = PrefixIndex::new(3, 100).unwrap();
        assert_eq!(ix.match_prefix(&[1, 2], "", &[]), Ok(None));
        // Nothing indexed: all tie at 0 with size 0, the lowest index wins.
        assert_eq!(
            ix.match_prefix(&[1, 2], "", &[2, 1]),
            Ok(Some(RouteMatch { replica: 1, len: 0 }))
        );
        ix.insert(0, &[1, 2, 3, 4], "").unwrap();
        ix.insert(1, &[1, 2, 9], "").unwrap();
        assert_eq!(
            ix.match_prefix(&[1, 2, 3, 5], "", &[0, 1, 2]),
            Ok(Some(RouteMatch { replica: 0, len: 3 }))
        );
        // Both hold [1, 2]: the smaller tree (replica 1, 3 tokens) wins.
        assert_eq!(
            ix.match_prefix(&[1, 2, 7], "", &[0, 1]),
            Ok(Some(RouteMatch { replica: 1, len: 2 }))
        );
        // Only candidates count.
        assert_eq!(
            ix.match_prefix(&[1, 2, 3, 5], "", &[1, 2]),
            Ok(Some(RouteMatch { replica: 1, len: 2 }))
        );
        assert_eq!(ix.smallest(&[0, 1, 2]), Ok(Some(2)));
        assert_eq!(ix.smallest(&[0, 1]), Ok(Some(1)));
        assert_eq!(ix.smallest(&[]), Ok(None));
    }

    #[test]
    fn namespaces_do_not_share() {
        let mut ix = PrefixIndex::new(2, 100).unwrap();
        ix.insert(1, &[5, 6, 7], "salt").unwrap();
        assert_eq!(
            ix.match_prefix(&[5, 6, 7], "", &[0, 1])
                .unwrap()
                .unwrap()
                .len,
            0
        );
        assert_eq!(
            ix.match_prefix(&[5, 6, 7], "salt", &[0, 1]),
            Ok(Some(RouteMatch { replica: 1, len: 3 }))
        );
    }

    #[test]
    fn insert_reports_held_and_caps_size_lru() {
        let mut ix = PrefixIndex::new(1, 6).unwrap();
        assert_eq!(ix.insert(0, &[1, 2, 3], ""), Ok(0));
        assert_eq!(ix.insert(0, &[1, 2, 3, 4], ""), Ok(3));
        assert_eq!(ix.insert(0, &[7, 8], ""), Ok(0));
        assert_eq!(ix.size(0), Ok(6));
        // Touch [1, 2, 3, 4]; then a new key pushes out [7, 8], the least recently used.
        ix.match_prefix(&[1, 2, 3, 4], "", &[0]).unwrap();
        ix.insert(0, &[9], "").unwrap();
        assert_eq!(ix.size(0), Ok(5));
        assert_eq!(ix.match_prefix(&[7, 8], "", &[0]).unwrap().unwrap().len, 0);
        assert_eq!(
            ix.match_prefix(&[1, 2, 3, 4], "", &[0])
                .unwrap()
                .unwrap()
                .len,
            4
        );
        // A key longer than the cap evicts everything, itself included down to the cap.
        ix.insert(0, &(100..110).collect::<Vec<_>>(), "").unwrap();
        assert!(ix.size(0).unwrap() <= 6);
    }

    #[test]
    fn clear_and_bad_replicas() {
        let mut ix = PrefixIndex::new(2, 10).unwrap();
        ix.insert(1, &[1, 2], "").unwrap();
        ix.clear(1).unwrap();
        assert_eq!(ix.size(1), Ok(0));
        let bad = RouterError::BadReplica {
            replica: 2,
            replicas: 2,
        };
        assert_eq!(ix.insert(2, &[1], ""), Err(bad.clone()));
        assert_eq!(ix.match_prefix(&[1], "", &[0, 2]), Err(bad.clone()));
        assert_eq!(ix.smallest(&[2]), Err(bad.clone()));
        assert_eq!(ix.size(2), Err(bad.clone()));
        assert_eq!(ix.clear(2), Err(bad));
        assert_eq!((ix.num_replicas(), ix.max_tokens()), (2, 10));
    }
}
