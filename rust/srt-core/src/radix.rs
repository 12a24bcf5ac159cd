//! Radix (prefix) tree over `u32` token ids whose values are KV slot indices.
//!
//! API CONTRACT (fixed; other modules and the bindings are written against it):
//! - Node handles are `NodeId` (u32); `RadixTree::ROOT` is never evicted. A handle stays valid
//!   while the node is locked; an unlocked node may be evicted or merged away later.
//! - `namespace`: requests with different namespaces (a per-request cache salt / `extra_key`)
//!   never share prefixes. "" is the default namespace.
//! - With `page_size > 1`, keys are truncated to a multiple of `page_size` on insert, and
//!   matches are page aligned.
//!
//! Implementation:
//! - Nodes live in an arena (`Vec<Node>` plus a free list of ids), so handles are plain
//!   integers and there is no `Rc<RefCell<_>>`. Every edge holds a whole number of pages; a
//!   node's children are keyed by the first page of their edge.
//! - Each namespace has its own root. `ROOT` (id 0) is the root of "" and always exists; other
//!   roots are created by the first insert into their namespace and dropped when they have no
//!   children and no lock. `match_prefix` in a namespace that has no root returns `ROOT` with
//!   nothing matched (locking it is harmless: roots hold no tokens).
//! - Recency is a logical clock: every `match_prefix` / `insert` takes the next tick and stamps
//!   the nodes on its path. One operation touches a single root-to-node path and two nodes of
//!   one path are never both leaves, so the ticks of leaves are distinct and LRU order is total.
//! - `lru` is an ordered index of the evictable leaves (not a root, lock count 0, no children)
//!   by `(last_access, id)`. It is kept exact on every access, lock, unlock, insert, split and
//!   eviction, so `evict` pops leaves in LRU order in O(log L) each.

use std::collections::{BTreeSet, HashMap};
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

/// The parent of a root.
const NONE: NodeId = NodeId::MAX;

#[derive(Debug, Default)]
struct Node {
    /// Edge label from the parent: a whole number of pages (empty for roots).
    key: Vec<u32>,
    /// KV slots of `key`, same length.
    value: Vec<u32>,
    /// `NONE` for roots.
    parent: NodeId,
    /// Children by the first page of their edge.
    children: HashMap<Box<[u32]>, NodeId>,
    /// Locks on this node or any descendant. NOTE: a parent's count is >= each child's.
    lock_ref: u32,
    last_access: u64,
    /// False for arena slots on the free list.
    alive: bool,
}

pub struct RadixTree {
    page_size: usize,
    nodes: Vec<Node>,
    free_ids: Vec<NodeId>,
    /// Roots of the non-default namespaces ("" is always `ROOT`).
    ns_roots: HashMap<String, NodeId>,
    /// Inverse of `ns_roots`, to unregister a root when it is dropped.
    root_ns: HashMap<NodeId, String>,
    /// Evictable leaves by `(last_access, id)`: least recently used first.
    lru: BTreeSet<(u64, NodeId)>,
    tick: u64,
    evictable: usize,
    protected: usize,
}

impl RadixTree {
    pub const ROOT: NodeId = 0;

    pub fn new(page_size: usize) -> Result<Self, RadixError> {
        if page_size == 0 {
            return Err(RadixError::BadPageSize);
        }
        let mut tree = RadixTree {
            page_size,
            nodes: Vec::new(),
            free_ids: Vec::new(),
            ns_roots: HashMap::new(),
            root_ns: HashMap::new(),
            lru: BTreeSet::new(),
            tick: 0,
            evictable: 0,
            protected: 0,
        };
        tree.reset();
        Ok(tree)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Longest cached prefix of `key` in `namespace`; refreshes the LRU time of the path.
    pub fn match_prefix(&mut self, key: &[u32], namespace: &str) -> MatchResult {
        let Some(root) = self.root_of(namespace) else {
            return MatchResult {
                values: Vec::new(),
                node: Self::ROOT,
                len: 0,
            };
        };
        let key = &key[..self.aligned(key.len())];
        let tick = self.next_tick();
        let mut values = Vec::new();
        let mut node = root;
        let mut pos = 0;
        self.touch(root, tick);
        while pos < key.len() {
            let Some(child) = self.child(node, &key[pos..]) else {
                break;
            };
            let edge_len = self.nodes[child as usize].key.len();
            let m = self.common_prefix(&self.nodes[child as usize].key, &key[pos..]);
            let next = if m < edge_len {
                self.split(child, m)
            } else {
                child
            };
            values.extend_from_slice(&self.nodes[next as usize].value);
            self.touch(next, tick);
            node = next;
            pos += m;
            if m < edge_len {
                break;
            }
        }
        let len = values.len();
        MatchResult { values, node, len }
    }

    /// Inserts `key -> values` (same length). Returns how many leading tokens were already
    /// cached: for those the existing values win and the caller frees its own duplicates
    /// `values[..returned]` (only the page-aligned part is inserted; the caller also owns the
    /// unaligned tail `values[aligned_len..]`).
    pub fn insert(
        &mut self,
        key: &[u32],
        values: &[u32],
        namespace: &str,
    ) -> Result<usize, RadixError> {
        if key.len() != values.len() {
            return Err(RadixError::LengthMismatch {
                key: key.len(),
                values: values.len(),
            });
        }
        let n = self.aligned(key.len());
        if n == 0 {
            // Nothing to cache; do not create a namespace root for it.
            return Ok(0);
        }
        let (key, values) = (&key[..n], &values[..n]);
        let tick = self.next_tick();
        let mut node = self.root_or_create(namespace);
        let mut pos = 0;
        self.touch(node, tick);
        while pos < n {
            let Some(child) = self.child(node, &key[pos..]) else {
                self.new_leaf(node, &key[pos..], &values[pos..], tick);
                return Ok(pos);
            };
            let m = self.common_prefix(&self.nodes[child as usize].key, &key[pos..]);
            node = if m < self.nodes[child as usize].key.len() {
                self.split(child, m)
            } else {
                child
            };
            self.touch(node, tick);
            pos += m;
        }
        Ok(pos)
    }

    /// Increments the lock count of `node` and every ancestor up to the root: none of them can
    /// be evicted while locked. Locked tokens move from evictable to protected.
    pub fn lock(&mut self, node: NodeId) -> Result<(), RadixError> {
        self.check(node)?;
        let mut id = node;
        while id != NONE {
            let is_root = self.nodes[id as usize].parent == NONE;
            if !is_root && self.nodes[id as usize].lock_ref == 0 {
                self.lru_remove(id);
                let len = self.nodes[id as usize].key.len();
                self.evictable -= len;
                self.protected += len;
            }
            let n = &mut self.nodes[id as usize];
            n.lock_ref += 1;
            id = n.parent;
        }
        Ok(())
    }

    pub fn unlock(&mut self, node: NodeId) -> Result<(), RadixError> {
        self.check(node)?;
        if self.nodes[node as usize].lock_ref == 0 {
            return Err(RadixError::NotLocked(node));
        }
        // NOTE: ancestors' counts are >= this node's, so none of them underflows.
        let mut id = node;
        while id != NONE {
            let n = &mut self.nodes[id as usize];
            n.lock_ref -= 1;
            let parent = n.parent;
            if n.lock_ref == 0 {
                if parent != NONE {
                    let len = n.key.len();
                    self.protected -= len;
                    self.evictable += len;
                    self.lru_insert_if_leaf(id);
                } else {
                    self.drop_root_if_empty(id);
                }
            }
            id = parent;
        }
        Ok(())
    }

    /// Evicts least recently used unlocked leaves until at least `n_tokens` tokens are freed or
    /// nothing evictable remains. Returns the freed KV slot values. O(k log L).
    pub fn evict(&mut self, n_tokens: usize) -> Vec<u32> {
        let mut freed = Vec::new();
        while freed.len() < n_tokens {
            let Some((_, id)) = self.lru.pop_first() else {
                break;
            };
            let parent = self.nodes[id as usize].parent;
            let mut node = std::mem::take(&mut self.nodes[id as usize]);
            self.free_ids.push(id);
            self.evictable -= node.key.len();
            self.nodes[parent as usize]
                .children
                .remove(&node.key[..self.page_size]);
            freed.append(&mut node.value);
            if self.nodes[parent as usize].parent == NONE {
                self.drop_root_if_empty(parent);
            } else {
                // A parent that became an unlocked leaf is now evictable itself.
                self.lru_insert_if_leaf(parent);
            }
        }
        freed
    }

    /// Tokens cached in nodes with lock count 0.
    pub fn evictable_size(&self) -> usize {
        self.evictable
    }

    /// Tokens cached in locked nodes.
    pub fn protected_size(&self) -> usize {
        self.protected
    }

    /// Parent of `node` (None for a namespace root / ROOT, or a bad handle). Lets `sched`
    /// compute dfs-weight orderings from matched nodes.
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        self.check(node).ok()?;
        let parent = self.nodes[node as usize].parent;
        (parent != NONE).then_some(parent)
    }

    /// evictable + protected.
    pub fn total_size(&self) -> usize {
        self.evictable + self.protected
    }

    /// Drops everything; returns all slot values that were cached (the caller frees them).
    /// Every handle (and lock) taken before is invalid afterwards, except `ROOT`.
    pub fn reset(&mut self) -> Vec<u32> {
        let mut freed = Vec::with_capacity(self.total_size());
        for node in &mut self.nodes {
            if node.alive {
                freed.append(&mut node.value);
            }
        }
        self.nodes.clear();
        self.nodes.push(Node {
            parent: NONE,
            alive: true,
            ..Node::default()
        });
        self.free_ids.clear();
        self.ns_roots.clear();
        self.root_ns.clear();
        self.lru.clear();
        self.evictable = 0;
        self.protected = 0;
        freed
    }

    // ---- internals ----

    fn aligned(&self, len: usize) -> usize {
        len / self.page_size * self.page_size
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn check(&self, node: NodeId) -> Result<(), RadixError> {
        match self.nodes.get(node as usize) {
            Some(n) if n.alive => Ok(()),
            _ => Err(RadixError::BadNode(node)),
        }
    }

    fn root_of(&self, namespace: &str) -> Option<NodeId> {
        if namespace.is_empty() {
            Some(Self::ROOT)
        } else {
            self.ns_roots.get(namespace).copied()
        }
    }

    fn root_or_create(&mut self, namespace: &str) -> NodeId {
        if let Some(root) = self.root_of(namespace) {
            return root;
        }
        let root = self.alloc_node(Node {
            parent: NONE,
            alive: true,
            ..Node::default()
        });
        self.ns_roots.insert(namespace.to_string(), root);
        self.root_ns.insert(root, namespace.to_string());
        root
    }

    /// Drops a non-default namespace root that holds nothing and that nobody has locked.
    fn drop_root_if_empty(&mut self, root: NodeId) {
        let n = &self.nodes[root as usize];
        if root == Self::ROOT || n.lock_ref > 0 || !n.children.is_empty() {
            return;
        }
        if let Some(ns) = self.root_ns.remove(&root) {
            self.ns_roots.remove(&ns);
        }
        self.nodes[root as usize] = Node::default();
        self.free_ids.push(root);
    }

    fn alloc_node(&mut self, node: Node) -> NodeId {
        match self.free_ids.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                NodeId::try_from(self.nodes.len() - 1).expect("more than 2^32 radix nodes")
            }
        }
    }

    fn child(&self, node: NodeId, rest: &[u32]) -> Option<NodeId> {
        // Callers only pass non-empty, page-aligned `rest`.
        self.nodes[node as usize]
            .children
            .get(&rest[..self.page_size])
            .copied()
    }

    /// Length of the common prefix of `a` and `b`, rounded down to whole pages.
    fn common_prefix(&self, a: &[u32], b: &[u32]) -> usize {
        let n = a.len().min(b.len());
        let m = a[..n]
            .iter()
            .zip(&b[..n])
            .position(|(x, y)| x != y)
            .unwrap_or(n);
        self.aligned(m)
    }

    /// Splits `child`'s edge after `at` tokens (0 < at < edge length, page aligned): a new node
    /// takes the first `at` tokens and becomes `child`'s parent. `child` keeps its id, so its
    /// handle, lock count and LRU entry stay valid; the new node inherits the lock count because
    /// every lock below `child` now also passes through it. Sizes do not change.
    fn split(&mut self, child: NodeId, at: usize) -> NodeId {
        let c = &mut self.nodes[child as usize];
        let rest_key = c.key.split_off(at);
        let rest_value = c.value.split_off(at);
        let head = Node {
            key: std::mem::replace(&mut c.key, rest_key),
            value: std::mem::replace(&mut c.value, rest_value),
            parent: c.parent,
            children: HashMap::new(),
            lock_ref: c.lock_ref,
            last_access: c.last_access,
            alive: true,
        };
        let parent = head.parent;
        let page = self.page_size;
        let first_page: Box<[u32]> = head.key[..page].into();
        let child_page: Box<[u32]> = self.nodes[child as usize].key[..page].into();
        let mid = self.alloc_node(head);
        self.nodes[mid as usize].children.insert(child_page, child);
        self.nodes[child as usize].parent = mid;
        self.nodes[parent as usize].children.insert(first_page, mid);
        mid
    }

    /// A new unlocked leaf under `parent`; `parent` stops being an evictable leaf.
    fn new_leaf(&mut self, parent: NodeId, key: &[u32], value: &[u32], tick: u64) -> NodeId {
        self.lru_remove(parent);
        let leaf = self.alloc_node(Node {
            key: key.to_vec(),
            value: value.to_vec(),
            parent,
            children: HashMap::new(),
            lock_ref: 0,
            last_access: tick,
            alive: true,
        });
        self.nodes[parent as usize]
            .children
            .insert(key[..self.page_size].into(), leaf);
        self.evictable += key.len();
        self.lru.insert((tick, leaf));
        leaf
    }

    fn is_evictable_leaf(&self, id: NodeId) -> bool {
        let n = &self.nodes[id as usize];
        n.parent != NONE && n.lock_ref == 0 && n.children.is_empty()
    }

    fn lru_remove(&mut self, id: NodeId) {
        if self.is_evictable_leaf(id) {
            self.lru.remove(&(self.nodes[id as usize].last_access, id));
        }
    }

    fn lru_insert_if_leaf(&mut self, id: NodeId) {
        if self.is_evictable_leaf(id) {
            self.lru.insert((self.nodes[id as usize].last_access, id));
        }
    }

    fn touch(&mut self, id: NodeId, tick: u64) {
        if self.nodes[id as usize].last_access == tick {
            return;
        }
        self.lru_remove(id);
        self.nodes[id as usize].last_access = tick;
        self.lru_insert_if_leaf(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(page: usize) -> RadixTree {
        RadixTree::new(page).unwrap()
    }

    fn check_sizes(t: &RadixTree) {
        let mut total = 0;
        let mut evictable = 0;
        for n in t.nodes.iter().filter(|n| n.alive && n.parent != NONE) {
            total += n.key.len();
            if n.lock_ref == 0 {
                evictable += n.key.len();
            }
        }
        assert_eq!(t.total_size(), total);
        assert_eq!(t.evictable_size(), evictable);
        assert_eq!(t.evictable_size() + t.protected_size(), t.total_size());
    }

    #[test]
    fn bad_page_size() {
        assert_eq!(RadixTree::new(0).err(), Some(RadixError::BadPageSize));
    }

    #[test]
    fn empty_tree_and_empty_key() {
        let mut t = tree(1);
        assert_eq!(
            t.match_prefix(&[], ""),
            MatchResult {
                values: vec![],
                node: RadixTree::ROOT,
                len: 0
            }
        );
        assert_eq!(
            t.match_prefix(&[1, 2], ""),
            MatchResult {
                values: vec![],
                node: RadixTree::ROOT,
                len: 0
            }
        );
        assert_eq!(t.insert(&[], &[], ""), Ok(0));
        assert_eq!(t.total_size(), 0);
        assert_eq!(t.evict(10), Vec::<u32>::new());
    }

    #[test]
    fn insert_then_match() {
        let mut t = tree(1);
        assert_eq!(t.insert(&[1, 2, 3], &[10, 20, 30], ""), Ok(0));
        let m = t.match_prefix(&[1, 2, 3, 4], "");
        assert_eq!((m.values, m.len), (vec![10, 20, 30], 3));
        assert_eq!(t.total_size(), 3);
        // Existing values win; the return value tells the caller which of its values to free.
        assert_eq!(t.insert(&[1, 2, 3, 4], &[11, 21, 31, 41], ""), Ok(3));
        assert_eq!(
            t.match_prefix(&[1, 2, 3, 4], "").values,
            vec![10, 20, 30, 41]
        );
        assert_eq!(t.insert(&[1, 2], &[7, 7], ""), Ok(2));
        assert_eq!(t.total_size(), 4);
        check_sizes(&t);
    }

    #[test]
    fn length_mismatch() {
        let mut t = tree(1);
        assert_eq!(
            t.insert(&[1, 2], &[1], ""),
            Err(RadixError::LengthMismatch { key: 2, values: 1 })
        );
        assert_eq!(t.total_size(), 0);
    }

    #[test]
    fn split_in_middle_of_edge() {
        let mut t = tree(1);
        t.insert(&[1, 2, 3, 4, 5], &[10, 20, 30, 40, 50], "")
            .unwrap();
        let leaf = t.match_prefix(&[1, 2, 3, 4, 5], "").node;
        let m = t.match_prefix(&[1, 2, 9], "");
        assert_eq!((m.values.clone(), m.len), (vec![10, 20], 2));
        assert_ne!(m.node, leaf);
        // The old leaf keeps its id and now hangs below the split node.
        assert_eq!(t.parent(leaf), Some(m.node));
        assert_eq!(t.parent(m.node), Some(RadixTree::ROOT));
        assert_eq!(t.match_prefix(&[1, 2, 3, 4, 5], "").node, leaf);
        // Diverging insert after the split point.
        assert_eq!(t.insert(&[1, 2, 7, 8], &[10, 20, 70, 80], ""), Ok(2));
        assert_eq!(
            t.match_prefix(&[1, 2, 7, 8], "").values,
            vec![10, 20, 70, 80]
        );
        assert_eq!(
            t.match_prefix(&[1, 2, 3, 4, 5], "").values,
            vec![10, 20, 30, 40, 50]
        );
        assert_eq!(t.total_size(), 7);
        check_sizes(&t);
    }

    #[test]
    fn page_size_four_unaligned_keys() {
        let mut t = tree(4);
        assert_eq!(t.page_size(), 4);
        // 6 tokens: only the first page is inserted.
        assert_eq!(
            t.insert(&[1, 2, 3, 4, 5, 6], &[8, 9, 10, 11, 12, 13], ""),
            Ok(0)
        );
        assert_eq!(t.total_size(), 4);
        assert_eq!(
            t.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8], "").values,
            vec![8, 9, 10, 11]
        );
        // A key shorter than a page matches nothing and inserts nothing.
        assert_eq!(t.match_prefix(&[1, 2, 3], "").len, 0);
        assert_eq!(t.insert(&[1, 2, 3], &[0, 0, 0], ""), Ok(0));
        // Same first token, different first page: a separate child.
        assert_eq!(t.insert(&[1, 2, 3, 5], &[20, 21, 22, 23], ""), Ok(0));
        assert_eq!(
            t.match_prefix(&[1, 2, 3, 5], "").values,
            vec![20, 21, 22, 23]
        );
        assert_eq!(t.match_prefix(&[1, 2, 3, 4], "").values, vec![8, 9, 10, 11]);
        // Mismatch inside the second page: the match stops at the page boundary.
        t.insert(
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            &(100..112).collect::<Vec<_>>(),
            "",
        )
        .unwrap();
        let m = t.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12], "");
        assert_eq!(m.len, 4);
        assert_eq!(m.values, vec![8, 9, 10, 11]);
        // Split at a page boundary inside an edge.
        let m = t.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], "");
        assert_eq!(m.len, 8);
        assert_eq!(m.values, vec![8, 9, 10, 11, 104, 105, 106, 107]);
        assert_eq!(t.total_size(), 16);
        check_sizes(&t);
    }

    #[test]
    fn namespaces_are_isolated() {
        let mut t = tree(1);
        t.insert(&[1, 2, 3], &[10, 20, 30], "a").unwrap();
        assert_eq!(t.match_prefix(&[1, 2, 3], "").len, 0);
        assert_eq!(t.match_prefix(&[1, 2, 3], "b").len, 0);
        assert_eq!(t.match_prefix(&[1, 2, 3], "b").node, RadixTree::ROOT);
        let m = t.match_prefix(&[1, 2, 3], "a");
        assert_eq!(m.values, vec![10, 20, 30]);
        let ns_root = t.parent(m.node).unwrap();
        assert_ne!(ns_root, RadixTree::ROOT);
        assert_eq!(t.parent(ns_root), None);
        // Same key in another namespace is not a duplicate.
        assert_eq!(t.insert(&[1, 2, 3], &[11, 21, 31], ""), Ok(0));
        assert_eq!(t.match_prefix(&[1, 2, 3], "").values, vec![11, 21, 31]);
        assert_eq!(t.total_size(), 6);
        // Evicting everything of "a" drops its root.
        let mut freed = t.evict(6);
        freed.sort();
        assert_eq!(freed, vec![10, 11, 20, 21, 30, 31]);
        assert!(t.ns_roots.is_empty());
        assert_eq!(t.parent(ns_root), None);
        assert_eq!(t.lock(ns_root), Err(RadixError::BadNode(ns_root)));
        check_sizes(&t);
    }

    #[test]
    fn locked_namespace_root_survives_until_unlock() {
        let mut t = tree(1);
        t.insert(&[1], &[10], "a").unwrap();
        let root = t.match_prefix(&[2], "a").node;
        assert_ne!(root, RadixTree::ROOT);
        t.lock(root).unwrap();
        assert_eq!(t.protected_size(), 0);
        assert_eq!(t.evict(1), vec![10]);
        let still = t.match_prefix(&[], "a").node;
        assert_eq!(t.parent(still), None);
        assert_eq!(t.match_prefix(&[], "a").node, root);
        t.unlock(root).unwrap();
        assert!(t.ns_roots.is_empty());
        assert_eq!(t.unlock(root), Err(RadixError::BadNode(root)));
    }

    #[test]
    fn lock_protects_ancestors() {
        let mut t = tree(1);
        t.insert(&[1, 2, 3], &[1, 2, 3], "").unwrap();
        t.insert(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], "").unwrap();
        t.insert(&[1, 2, 7], &[1, 2, 7], "").unwrap();
        let m = t.match_prefix(&[1, 2, 3], "");
        t.lock(m.node).unwrap();
        // [1,2] and [3] are locked; [4,5] and [7] are not.
        assert_eq!(t.protected_size(), 3);
        assert_eq!(t.evictable_size(), 3);
        check_sizes(&t);
        let mut freed = t.evict(100);
        freed.sort();
        assert_eq!(freed, vec![4, 5, 7]);
        assert_eq!(t.match_prefix(&[1, 2, 3, 4], "").values, vec![1, 2, 3]);
        t.lock(m.node).unwrap();
        t.unlock(m.node).unwrap();
        assert_eq!(t.protected_size(), 3);
        t.unlock(m.node).unwrap();
        assert_eq!(t.unlock(m.node), Err(RadixError::NotLocked(m.node)));
        assert_eq!(t.protected_size(), 0);
        check_sizes(&t);
        let mut freed = t.evict(100);
        freed.sort();
        assert_eq!(freed, vec![1, 2, 3]);
        assert_eq!(t.total_size(), 0);
    }

    #[test]
    fn lock_then_split_keeps_counts() {
        let mut t = tree(1);
        t.insert(&[1, 2, 3, 4], &[1, 2, 3, 4], "").unwrap();
        let leaf = t.match_prefix(&[1, 2, 3, 4], "").node;
        t.lock(leaf).unwrap();
        // Splitting a locked edge: both halves stay protected.
        let mid = t.match_prefix(&[1, 2], "").node;
        assert_eq!(t.parent(leaf), Some(mid));
        assert_eq!(t.protected_size(), 4);
        t.unlock(leaf).unwrap();
        assert_eq!(t.evictable_size(), 4);
        // Unlock made `mid` non-leaf, so only the leaf is evicted first.
        assert_eq!(t.evict(1), vec![3, 4]);
        assert_eq!(t.evict(1), vec![1, 2]);
        check_sizes(&t);
    }

    #[test]
    fn evict_order_is_lru() {
        let mut t = tree(1);
        t.insert(&[1], &[1], "").unwrap();
        t.insert(&[2], &[2], "").unwrap();
        t.insert(&[3], &[3], "").unwrap();
        t.match_prefix(&[1], ""); // 1 is now the most recent.
        assert_eq!(t.evict(1), vec![2]);
        assert_eq!(t.evict(1), vec![3]);
        assert_eq!(t.evict(1), vec![1]);
        // A parent that becomes a leaf is evicted with its own (older) time.
        t.insert(&[5, 6], &[5, 6], "").unwrap();
        t.insert(&[5, 6, 7], &[5, 6, 7], "").unwrap(); // [5,6] and [7] touched at the same op
        t.insert(&[8], &[8], "").unwrap();
        assert_eq!(t.evict(1), vec![7]);
        assert_eq!(t.evict(1), vec![5, 6]);
        assert_eq!(t.evict(1), vec![8]);
    }

    #[test]
    fn evict_more_than_available() {
        let mut t = tree(2);
        t.insert(&[1, 2, 3, 4], &[1, 2, 3, 4], "").unwrap();
        t.insert(&[1, 2, 5, 6], &[1, 2, 5, 6], "").unwrap();
        let locked = t.match_prefix(&[1, 2, 5, 6], "").node;
        t.lock(locked).unwrap();
        let freed = t.evict(1000);
        assert_eq!(freed, vec![3, 4]);
        assert_eq!(t.evictable_size(), 0);
        assert_eq!(t.protected_size(), 4);
        assert_eq!(t.evict(1000), Vec::<u32>::new());
        check_sizes(&t);
    }

    #[test]
    fn evict_frees_whole_leaves() {
        let mut t = tree(1);
        t.insert(&[1, 2, 3], &[1, 2, 3], "").unwrap();
        // Asking for one token evicts the whole 3-token leaf.
        assert_eq!(t.evict(1), vec![1, 2, 3]);
        assert_eq!(t.evict(0), Vec::<u32>::new());
    }

    #[test]
    fn bad_handles() {
        let mut t = tree(1);
        assert_eq!(t.lock(99), Err(RadixError::BadNode(99)));
        assert_eq!(t.unlock(99), Err(RadixError::BadNode(99)));
        assert_eq!(
            t.unlock(RadixTree::ROOT),
            Err(RadixError::NotLocked(RadixTree::ROOT))
        );
        assert_eq!(t.parent(99), None);
        assert_eq!(t.parent(RadixTree::ROOT), None);
        t.insert(&[1], &[1], "").unwrap();
        let n = t.match_prefix(&[1], "").node;
        t.evict(1);
        assert_eq!(t.lock(n), Err(RadixError::BadNode(n)));
        // Locking ROOT is allowed and protects nothing.
        t.lock(RadixTree::ROOT).unwrap();
        t.unlock(RadixTree::ROOT).unwrap();
    }

    #[test]
    fn reset_returns_everything() {
        let mut t = tree(1);
        t.insert(&[1, 2], &[1, 2], "").unwrap();
        t.insert(&[1, 3], &[1, 3], "x").unwrap();
        let n = t.match_prefix(&[1, 2], "").node;
        t.lock(n).unwrap();
        let mut freed = t.reset();
        freed.sort();
        assert_eq!(freed, vec![1, 1, 2, 3]);
        assert_eq!(
            (t.total_size(), t.evictable_size(), t.protected_size()),
            (0, 0, 0)
        );
        assert_eq!(t.match_prefix(&[1, 2], "").len, 0);
        assert_eq!(t.match_prefix(&[1, 3], "x").len, 0);
        assert_eq!(t.lock(n), Err(RadixError::BadNode(n)));
    }
}
