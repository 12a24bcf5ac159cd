//! The prefill adder: which requests a prefill step extends and by how many tokens, under
//! the token budget, the running cap and KV memory; chunked prefill; in-batch prefix dedupe.

use super::step::{Section, Step, StepBuilder, StepKind};
use super::{align_down, policy, BatchScheduler, SchedError, State};
use crate::radix::RadixTree;
use policy::Candidate;

/// One request extended by a prefill step.
struct Entry {
    id: u64,
    extend: usize,
    /// Given a row this step (its sampling state is written before the step runs).
    admitted: bool,
}

impl BatchScheduler {
    /// The prefill adder: the mid-chunk request first, then waiting requests in policy order
    /// while the token budget, the running cap, the rows and KV memory allow. None if nobody
    /// fits.
    pub(super) fn plan_prefill(&mut self) -> Result<Option<Step>, SchedError> {
        if self.chunked.is_none() && (self.waiting.is_empty() || self.admission_paused) {
            return Ok(None);
        }
        let p = self.cfg.page_size;
        let chunking = self.cfg.chunked_prefill_size.is_some();
        let mut budget = self
            .cfg
            .chunked_prefill_size
            .map_or(self.cfg.max_prefill_tokens, |c| {
                c.min(self.cfg.max_prefill_tokens)
            });
        // KV that admitted requests will still take: decode growth, and the rest of a prompt
        // that is mid-chunk after this step.
        let mut reserved: f64 = self
            .running
            .iter()
            .chain(&self.chunked)
            .map(|id| self.growth(&self.reqs[id]))
            .sum();
        let mut admitted = self.running.len() + usize::from(self.chunked.is_some());
        let mut entries: Vec<Entry> = Vec::new();
        let mut mid_chunk = None;

        if let Some(id) = self.chunked.take() {
            let from = self.adopt_cached_prefix(id)?;
            let r = self
                .reqs
                .get_mut(&id)
                .ok_or(SchedError::UnknownRequest(id))?;
            r.table_len = r.table_len.min(from);
            let remaining = r.tokens.len() - r.slots.len();
            let extend = if remaining <= budget {
                remaining
            } else {
                align_down(budget, p)
            };
            let rest = remaining - extend;
            if rest > 0 {
                reserved += (self.alloc.pages_needed(r.slots.len() + extend, rest) * p) as f64;
                mid_chunk = Some(id);
            }
            budget -= extend;
            self.grow(id, extend)?;
            entries.push(Entry {
                id,
                extend,
                admitted: false,
            });
        }

        let dedupe = self.cfg.enable_radix_cache && self.cfg.in_batch_prefix_threshold > 0;
        let threshold = self.cfg.in_batch_prefix_threshold;
        // The prompts chosen this step, to spot requests that would recompute the same
        // uncached prefix side by side (values are unused).
        let mut chosen: Option<RadixTree> = None;
        let order = if self.admission_paused {
            Vec::new()
        } else {
            self.policy_order()
        };
        for id in order {
            if admitted >= self.cfg.max_running_requests || budget == 0 || self.free_rows.is_empty()
            {
                break;
            }
            self.adopt_cached_prefix(id)?;
            let r = &self.reqs[&id];
            let prefix = r.slots.len();
            if dedupe && prefix <= threshold {
                if let Some(chosen) = chosen.as_mut() {
                    if chosen.match_prefix(r.match_key(), &r.namespace).len >= threshold {
                        // Another request of this step seeds the shared prefix; this one
                        // reuses it next step.
                        self.unadopt(id)?;
                        continue;
                    }
                }
            }
            let remaining = r.tokens.len() - prefix;
            let extend = if remaining <= budget {
                remaining
            } else if !chunking {
                // A request over the budget runs alone in its step.
                if entries.is_empty() {
                    remaining
                } else {
                    0
                }
            } else if mid_chunk.is_none() {
                align_down(budget, p)
            } else {
                0
            };
            if extend == 0 {
                self.unadopt(id)?;
                break;
            }
            let need = (self.alloc.pages_needed(prefix, remaining) * p) as f64;
            let growth = self.growth(r);
            let room = (self.alloc.available() + self.evictable()) as f64;
            // NOTE: a request alone in the system only needs room for its prompt; reserving
            // its growth too could keep it waiting forever.
            let fits = if admitted == 0 {
                need <= room
            } else {
                reserved + need + growth <= room
            };
            if !fits {
                self.unadopt(id)?;
                break;
            }
            if dedupe && prefix <= threshold {
                let key = r.match_key();
                let values: Vec<u32> = (0..key.len() as u32).collect();
                if chosen.is_none() {
                    chosen = Some(RadixTree::new(1)?);
                }
                if let Some(chosen) = chosen.as_mut() {
                    chosen.insert(key, &values, &r.namespace)?;
                }
            }
            reserved += growth;
            if extend < remaining {
                reserved +=
                    (self.alloc.pages_needed(prefix + extend, remaining - extend) * p) as f64;
                mid_chunk = Some(id);
            }
            // Saturating: a request over the budget may run alone.
            budget = budget.saturating_sub(extend);
            admitted += 1;
            self.waiting.retain(|&(_, w)| w != id);
            let r = self
                .reqs
                .get_mut(&id)
                .ok_or(SchedError::UnknownRequest(id))?;
            if r.output_len() == 0 {
                r.cached_len = prefix;
            }
            r.row = self.free_rows.pop();
            r.table_len = 0;
            self.grow(id, extend)?;
            entries.push(Entry {
                id,
                extend,
                admitted: true,
            });
        }
        if entries.is_empty() {
            return Ok(None);
        }

        // NOTE: the computed prefixes enter the tree only now, after every match of this step:
        // a request must never reuse KV that this very step is still computing.
        let mut b = StepBuilder::default();
        for (i, e) in entries.iter().enumerate() {
            if self.cfg.enable_radix_cache {
                self.cache_computed_prefix(e.id)?;
            }
            let r = self
                .reqs
                .get_mut(&e.id)
                .ok_or(SchedError::UnknownRequest(e.id))?;
            let end = r.slots.len();
            let prefix = end - e.extend;
            r.emit_sequence(&mut b, e.id, prefix, end);
            b.push(Section::PrefixLens, prefix as i64);
            b.push(Section::ExtendLens, e.extend as i64);
            if e.admitted {
                r.emit_admission(&mut b);
            }
            if end == r.tokens.len() {
                r.state = State::Running;
                r.emit_sample(&mut b, i);
                self.running.push(e.id);
            } else {
                r.state = State::MidChunk;
            }
        }
        self.chunked = mid_chunk;
        Ok(Some(b.build(StepKind::Prefill)))
    }

    /// Makes the request use the tree's KV for the longest cached prefix of its key beyond
    /// what it already holds from the tree: locks the new node, unlocks the old one, frees its
    /// own slots that the tree's replace. Returns the first position whose slot changed
    /// (Python re-reads the slots from there).
    fn adopt_cached_prefix(&mut self, id: u64) -> Result<usize, SchedError> {
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        let kv = r.slots.len();
        if !self.cfg.enable_radix_cache {
            return Ok(kv);
        }
        let m = self.tree.match_prefix(r.match_key(), &r.namespace);
        // The tree's values agree with ours on the locked `..tree_owned`; beyond it they are
        // KV computed in an earlier step, possibly by another request.
        if m.len <= r.tree_owned {
            return Ok(kv);
        }
        self.tree.lock(m.node)?;
        if let Some(old) = r.node.replace(m.node) {
            self.tree.unlock(old)?;
        }
        let from = r.tree_owned;
        self.alloc.free(&r.slots[from..m.len.min(kv)])?;
        let tail = r.slots.split_off(m.len.min(kv));
        r.slots = m.values;
        r.slots.extend(tail);
        r.tree_owned = m.len;
        // Usage reporting counts the prompt's cache hits; an admission sets it outright.
        if r.output_len() == 0 && r.state != State::Waiting && m.len > kv {
            r.cached_len += m.len - kv;
        }
        Ok(from)
    }

    /// Undoes `adopt_cached_prefix` for a waiting request that is not admitted after all.
    fn unadopt(&mut self, id: u64) -> Result<(), SchedError> {
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        if let Some(node) = r.node.take() {
            self.tree.unlock(node)?;
        }
        r.slots.clear();
        r.tree_owned = 0;
        Ok(())
    }

    /// Inserts the KV a prefill entry computes into the tree (the page-aligned part of its
    /// key), so later requests reuse it, and locks it for the request.
    fn cache_computed_prefix(&mut self, id: u64) -> Result<(), SchedError> {
        let p = self.cfg.page_size;
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        let key_len = r.slots.len().min(r.tokens.len() - 1);
        if align_down(key_len, p) <= r.tree_owned {
            return Ok(());
        }
        let key = &r.tokens[..key_len];
        // Another entry of this step may have cached part of the same path with its own slots;
        // then ours stay request-owned (Python already writes them), and the next re-match or
        // the final insert sorts out the duplicates.
        if self.tree.match_prefix(key, &r.namespace).len != r.tree_owned {
            return Ok(());
        }
        self.tree.insert(key, &r.slots[..key_len], &r.namespace)?;
        let m = self.tree.match_prefix(key, &r.namespace);
        self.tree.lock(m.node)?;
        if let Some(old) = r.node.replace(m.node) {
            self.tree.unlock(old)?;
        }
        r.tree_owned = m.len;
        Ok(())
    }

    fn policy_order(&mut self) -> Vec<u64> {
        // NOTE: a request retracted (or requeued) with a sample in flight waits for its
        // commit: its last token is not known yet.
        let candidates: Vec<Candidate<'_>> = self
            .waiting
            .iter()
            .filter(|(_, id)| self.reqs[id].pending == 0 && self.reqs[id].discard == 0)
            .map(|(_, id)| {
                let r = &self.reqs[id];
                Candidate {
                    id: *id,
                    key: r.match_key(),
                    namespace: &r.namespace,
                    max_new_tokens: r.max_new_tokens,
                }
            })
            .collect();
        let tree = self.cfg.enable_radix_cache.then_some(&mut self.tree);
        policy::order(
            self.cfg.policy,
            &candidates,
            tree,
            self.cfg.lpm_fallback_queue_len,
            &mut self.rng,
        )
    }
}
