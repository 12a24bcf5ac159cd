//! Radix (prefix) tree over `u32` token ids whose values are KV slot indices.
//!
//! API CONTRACT (fixed; other modules and the bindings are written against it):
//! - Node handles are `NodeId` (u32); `RadixTree::ROOT` is never evicted. A handle stays valid
//!   while the node is locked; an unlocked node may be evicted or merged away later.
//! - `namespace`: requests with different namespaces (a per-request cache salt / `extra_key`)
//!   never share prefixes. "" is the default namespace.
//! - With `page_size > 1`, keys are truncated to a multiple of `page_size` on insert, and
//!   matches are page aligned.

use thiserror::Error;

pub type NodeId = u32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RadixError {
    #[error("key has {key} tokens but values has {values}")]
    LengthMismatch { key: usize, values: usize },
    #[error("unknown or evicted node handle {0}")]
    BadNode(NodeId),
    #[error("unlock of node {0} whose lock count is already zero")]
    NotLocked(NodeId),
    #[error("page_size must be >= 1")]
    BadPageSize,
}

/// Result of [`RadixTree::match_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchResult {
    /// KV slot values of the longest cached (page-aligned) prefix of the key.
    pub values: Vec<u32>,
    /// The node at which the match ends (split if the match ends inside a node's edge).
    /// `RadixTree::ROOT` (of the namespace) when nothing matched.
    pub node: NodeId,
    /// `values.len()`.
    pub len: usize,
}

pub struct RadixTree {
    // implementation detail: arena of nodes, per-namespace roots, LRU index of evictable leaves
}

impl RadixTree {
    pub const ROOT: NodeId = 0;

    pub fn new(page_size: usize) -> Result<Self, RadixError> {
        todo!()
    }
    pub fn page_size(&self) -> usize {
        todo!()
    }
    /// Longest cached prefix of `key` in `namespace`; refreshes the LRU time of the path.
    pub fn match_prefix(&mut self, key: &[u32], namespace: &str) -> MatchResult {
        todo!()
    }
    /// Inserts `key -> values` (same length). Returns how many leading tokens were already
    /// cached: for those the existing values win and the caller frees its own duplicates
    /// `values[..returned]` (only the page-aligned part is inserted; the caller also owns the
    /// unaligned tail `values[aligned_len..]`).
    pub fn insert(&mut self, key: &[u32], values: &[u32], namespace: &str) -> Result<usize, RadixError> {
        todo!()
    }
    /// Increments the lock count of `node` and every ancestor up to the root: none of them can
    /// be evicted while locked. Locked tokens move from evictable to protected.
    pub fn lock(&mut self, node: NodeId) -> Result<(), RadixError> {
        todo!()
    }
    pub fn unlock(&mut self, node: NodeId) -> Result<(), RadixError> {
        todo!()
    }
    /// Evicts least recently used unlocked leaves until at least `n_tokens` tokens are freed or
    /// nothing evictable remains. Returns the freed KV slot values. O(k log L).
    pub fn evict(&mut self, n_tokens: usize) -> Vec<u32> {
        todo!()
    }
    /// Tokens cached in nodes with lock count 0.
    pub fn evictable_size(&self) -> usize {
        todo!()
    }
    /// Tokens cached in locked nodes.
    pub fn protected_size(&self) -> usize {
        todo!()
    }
    /// Parent of `node` (None for a namespace root / ROOT, or a bad handle). Lets `sched`
    /// compute dfs-weight orderings from matched nodes.
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        todo!()
    }
    /// evictable + protected.
    pub fn total_size(&self) -> usize {
        todo!()
    }
    /// Drops everything; returns all slot values that were cached (the caller frees them).
    pub fn reset(&mut self) -> Vec<u32> {
        todo!()
    }
}
