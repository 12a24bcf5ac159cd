//! Orderings of the waiting queue, one per [`Policy`]. The prefill adder walks the order it gets
//! from here and admits requests until a budget runs out, so the order decides who runs first.

use super::Policy;
use crate::radix::{NodeId, RadixTree};
use crate::rng::SplitMix64;
use std::cmp::Reverse;
use std::collections::HashMap;

/// One waiting request as the policies see it.
pub(super) struct Candidate<'a> {
    pub id: u64,
    /// The key matched against the prefix cache (`tokens[..len - 1]`).
    pub key: &'a [u32],
    pub namespace: &'a str,
    pub max_new_tokens: usize,
}

/// The ids of `waiting` (given in arrival order) in the order the policy wants them tried.
/// `tree` is `None` when the radix cache is disabled: the prefix-aware policies then fall back
/// to fcfs, as they do when the queue is longer than `fallback_len`.
pub(super) fn order(
    policy: Policy,
    waiting: &[Candidate<'_>],
    tree: Option<&mut RadixTree>,
    fallback_len: usize,
    rng: &mut SplitMix64,
) -> Vec<u64> {
    let mut ids: Vec<u64> = waiting.iter().map(|c| c.id).collect();
    match policy {
        Policy::Fcfs => ids,
        Policy::Lof => {
            // Stable: ties stay in arrival order.
            let mut by_len: Vec<(usize, u64)> =
                waiting.iter().map(|c| (c.max_new_tokens, c.id)).collect();
            by_len.sort_by_key(|&(n, _)| Reverse(n));
            by_len.into_iter().map(|(_, id)| id).collect()
        }
        Policy::Random => {
            for i in (1..ids.len()).rev() {
                let j = rng.below(i + 1);
                ids.swap(i, j);
            }
            ids
        }
        Policy::Lpm | Policy::DfsWeight => match tree {
            Some(tree) if waiting.len() <= fallback_len => {
                let matched: Vec<(u64, usize, NodeId)> = waiting
                    .iter()
                    .map(|c| {
                        let m = tree.match_prefix(c.key, c.namespace);
                        (c.id, m.len, m.node)
                    })
                    .collect();
                if policy == Policy::Lpm {
                    longest_prefix_first(matched)
                } else {
                    dfs_weight(tree, &matched)
                }
            }
            _ => ids,
        },
    }
}

fn longest_prefix_first(mut matched: Vec<(u64, usize, NodeId)>) -> Vec<u64> {
    matched.sort_by_key(|&(_, len, _)| Reverse(len));
    matched.into_iter().map(|(id, _, _)| id).collect()
}

/// Depth-first over the part of the prefix tree that the waiting requests matched into. A
/// node's weight is the number of waiting requests whose match ends in its subtree; heavier
/// children are visited first (ties: first seen in arrival order), a node's own requests come
/// after its children's (deeper matches first), so requests sharing a prefix run together
/// while it is cached.
fn dfs_weight(tree: &RadixTree, matched: &[(u64, usize, NodeId)]) -> Vec<u64> {
    let mut weight: HashMap<NodeId, usize> = HashMap::new();
    let mut children: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let mut own: HashMap<NodeId, Vec<u64>> = HashMap::new();
    let mut roots: Vec<NodeId> = Vec::new();
    for &(id, _, node) in matched {
        own.entry(node).or_default().push(id);
        let mut cur = node;
        loop {
            let w = weight.entry(cur).or_insert(0);
            let first_visit = *w == 0;
            *w += 1;
            match tree.parent(cur) {
                Some(p) => {
                    if first_visit {
                        children.entry(p).or_default().push(cur);
                    }
                    cur = p;
                }
                None => {
                    if first_visit {
                        roots.push(cur);
                    }
                    break;
                }
            }
        }
    }
    let heaviest_first = |nodes: &mut Vec<NodeId>| nodes.sort_by_key(|n| Reverse(weight[n]));
    heaviest_first(&mut roots);
    let mut out = Vec::with_capacity(matched.len());
    // (node, children already pushed): an explicit stack, since prefix trees can be deep.
    let mut stack: Vec<(NodeId, bool)> = roots.iter().rev().map(|&n| (n, false)).collect();
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            if let Some(ids) = own.get(&node) {
                out.extend_from_slice(ids);
            }
            continue;
        }
        stack.push((node, true));
        if let Some(kids) = children.get_mut(&node) {
            heaviest_first(kids);
            stack.extend(kids.iter().rev().map(|&k| (k, false)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lof_is_stable_and_random_is_a_permutation() {
        let toks = [1u32, 2, 3];
        let cands: Vec<Candidate<'_>> = [(1u64, 5usize), (2, 9), (3, 5), (4, 9)]
            .iter()
            .map(|&(id, n)| Candidate {
                id,
                key: &toks,
                namespace: "",
                max_new_tokens: n,
            })
            .collect();
        let mut rng = SplitMix64::new(3);
        assert_eq!(
            order(Policy::Lof, &cands, None, 128, &mut rng),
            vec![2, 4, 1, 3]
        );
        let mut shuffled = order(Policy::Random, &cands, None, 128, &mut rng);
        shuffled.sort();
        assert_eq!(shuffled, vec![1, 2, 3, 4]);
        // Without a tree the prefix-aware policies are fcfs.
        assert_eq!(
            order(Policy::Lpm, &cands, None, 128, &mut rng),
            vec![1, 2, 3, 4]
        );
    }
}
