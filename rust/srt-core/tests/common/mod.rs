//! A test driver that plays the Python scheduler process against a `BatchScheduler`: it applies
//! every plan to its own copy of each request's slot list, keeps a model of what every KV slot
//! holds, samples a token per sampling request, finishes requests at max_new_tokens, and
//! checks every contract of the plan on the way.
//!
//! KV model: writing position `i` of a request stores `hash(namespace, tokens[..=i])` in its
//! slot. Whenever a plan makes a request read KV (its prefix in a prefill, everything in a
//! decode), each slot must still hold exactly that hash: a cache hit on the wrong slots, a slot
//! freed and reused while still read, or two requests writing one slot all show up here.

#![allow(dead_code)]

use srt_core::sched::{BatchScheduler, NewRequest, Plan, PrefillEntry, SchedConfig, SchedStats};
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    MidChunk,
    Sampling,
    Running,
    Finished,
}

pub struct SimReq {
    pub prompt_len: usize,
    pub tokens: Vec<u32>,
    pub max_new: usize,
    pub namespace: String,
    /// Python's copy of the request's KV slots.
    pub view: Vec<u32>,
    pub phase: Phase,
    pub aborted: bool,
    pub cached_len: usize,
    pub retractions: usize,
    /// `hashes[i]` = hash of (namespace, tokens[..=i]).
    hashes: Vec<u64>,
}

impl SimReq {
    pub fn outputs(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn hash_upto(&mut self, n: usize) -> &[u64] {
        while self.hashes.len() < n {
            let prev = match self.hashes.last() {
                Some(&h) => h,
                None => self
                    .namespace
                    .bytes()
                    .fold(0x243F_6A88_85A3_08D3, |h, b| mix(h ^ u64::from(b))),
            };
            let t = self.tokens[self.hashes.len()];
            self.hashes.push(mix(prev ^ u64::from(t)));
        }
        &self.hashes[..n]
    }
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Default, Debug)]
pub struct Counters {
    pub prefills: usize,
    pub decodes: usize,
    pub idles: usize,
    pub chunks: usize,
    pub retractions: usize,
    pub cached_tokens: usize,
}

pub struct Driver {
    pub sched: BatchScheduler,
    pub cfg: SchedConfig,
    pub reqs: BTreeMap<u64, SimReq>,
    /// What each KV slot holds (see the module doc).
    content: HashMap<u32, u64>,
    pub counters: Counters,
    /// Sampled tokens are a function of the sequence (greedy-like), so identical prompts
    /// generate identical outputs; `vocab` keeps collisions likely.
    pub vocab: u32,
}

impl Driver {
    pub fn new(cfg: SchedConfig) -> Self {
        Driver {
            sched: BatchScheduler::new(cfg.clone()).expect("valid config"),
            cfg,
            reqs: BTreeMap::new(),
            content: HashMap::new(),
            counters: Counters::default(),
            vocab: 50,
        }
    }

    pub fn add(&mut self, id: u64, tokens: Vec<u32>, max_new: usize, namespace: &str) {
        self.sched
            .add_request(NewRequest {
                id,
                tokens: tokens.clone(),
                max_new_tokens: max_new,
                namespace: namespace.to_string(),
            })
            .expect("add_request");
        self.reqs.insert(
            id,
            SimReq {
                prompt_len: tokens.len(),
                tokens,
                max_new,
                namespace: namespace.to_string(),
                view: Vec::new(),
                phase: Phase::Waiting,
                aborted: false,
                cached_len: 0,
                retractions: 0,
                hashes: Vec::new(),
            },
        );
    }

    pub fn live(&self) -> impl Iterator<Item = (&u64, &SimReq)> {
        self.reqs.iter().filter(|(_, r)| r.phase != Phase::Finished)
    }

    pub fn all_finished(&self) -> bool {
        self.live().next().is_none()
    }

    pub fn abort(&mut self, id: u64) {
        self.sched.finish(id).expect("finish");
        let r = self.reqs.get_mut(&id).expect("known");
        r.phase = Phase::Finished;
        r.aborted = true;
        r.view.clear();
        self.check();
    }

    pub fn stats(&self) -> SchedStats {
        self.sched.stats()
    }

    pub fn check(&self) {
        if let Err(e) = self.sched.check_invariants() {
            panic!("invariant violated: {e}");
        }
    }

    /// One scheduler step: plan, check, "forward", sample, commit, finish.
    pub fn step(&mut self) -> Plan {
        let plan = self.sched.schedule().expect("schedule");
        let sampled = match &plan {
            Plan::Idle => {
                self.counters.idles += 1;
                assert!(
                    self.live().all(|(_, r)| r.phase == Phase::Waiting),
                    "idle while requests run"
                );
                Vec::new()
            }
            Plan::Prefill(entries) => {
                self.counters.prefills += 1;
                self.apply_prefill(entries)
            }
            Plan::Decode(d) => {
                self.counters.decodes += 1;
                for &id in &d.retracted {
                    let r = self.reqs.get_mut(&id).expect("retracted request is known");
                    assert_eq!(r.phase, Phase::Running, "retracted {id} was not running");
                    r.phase = Phase::Waiting;
                    r.view.clear();
                    r.retractions += 1;
                    self.counters.retractions += 1;
                }
                self.apply_decode(&d.ids, &d.slots)
            }
        };
        self.check_running_cap();
        self.check();
        // Sample: max_new_tokens == 0 requests end at their prefill without a sample.
        let (zero, sampled): (Vec<u64>, Vec<u64>) = sampled
            .into_iter()
            .partition(|id| self.reqs[id].max_new == 0);
        for id in zero {
            self.finish(id);
        }
        let toks: Vec<u32> = sampled
            .iter()
            .map(|id| {
                let r = self.reqs.get_mut(id).expect("known");
                let n = r.tokens.len();
                (r.hash_upto(n)[n - 1] % u64::from(self.vocab)) as u32
            })
            .collect();
        self.sched.commit(&sampled, &toks).expect("commit");
        for (id, t) in sampled.iter().zip(&toks) {
            let r = self.reqs.get_mut(id).expect("known");
            r.tokens.push(*t);
            r.phase = Phase::Running;
            if r.outputs() >= r.max_new {
                self.finish(*id);
            }
        }
        self.check();
        plan
    }

    fn finish(&mut self, id: u64) {
        self.sched.finish(id).expect("finish");
        let r = self.reqs.get_mut(&id).expect("known");
        r.phase = Phase::Finished;
        r.view.clear();
    }

    /// Runs until every request has finished; panics after `max_steps`.
    pub fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if self.all_finished() {
                return;
            }
            if matches!(self.step(), Plan::Idle) {
                panic!("idle with waiting requests: nothing can ever be admitted");
            }
        }
        panic!("requests still unfinished after {max_steps} steps");
    }

    /// Which live requests hold each page in their slot lists.
    fn page_holders(&self) -> HashMap<u32, HashSet<u64>> {
        let p = self.cfg.page_size as u32;
        let mut holders: HashMap<u32, HashSet<u64>> = HashMap::new();
        for (&id, r) in self.live() {
            for &s in &r.view {
                holders.entry(s / p).or_default().insert(id);
            }
        }
        holders
    }

    fn assert_only_holder(holders: &HashMap<u32, HashSet<u64>>, page: u32, id: u64, slot: u32) {
        if let Some(h) = holders.get(&page) {
            assert!(
                h.iter().all(|&o| o == id),
                "slot {slot} written by {id} is also held by {h:?}"
            );
        }
    }

    fn apply_prefill(&mut self, entries: &[PrefillEntry]) -> Vec<u64> {
        assert!(!entries.is_empty(), "empty prefill plan");
        let ids: HashSet<u64> = entries.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), entries.len(), "a request twice in one plan");
        let total: usize = entries.iter().map(|e| e.extend_len).sum();
        let budget = match self.cfg.chunked_prefill_size {
            Some(c) => c.min(self.cfg.max_prefill_tokens),
            None => self.cfg.max_prefill_tokens,
        };
        assert!(
            total <= budget || (entries.len() == 1 && self.cfg.chunked_prefill_size.is_none()),
            "prefill of {total} tokens over the budget {budget}"
        );
        assert!(
            entries.iter().filter(|e| !e.is_last_chunk).count() <= 1,
            "two requests mid-chunk"
        );
        // Pass 1: Python takes the new slot lists.
        for (i, e) in entries.iter().enumerate() {
            let r = self.reqs.get_mut(&e.id).expect("planned request is known");
            match r.phase {
                Phase::Waiting => assert_eq!(e.slots_from, 0, "admission must send all slots"),
                Phase::MidChunk => assert_eq!(i, 0, "the mid-chunk request must resume first"),
                other => panic!("prefill of request {} in phase {other:?}", e.id),
            }
            let end = e.prefix_len + e.extend_len;
            assert!(e.extend_len > 0, "empty extend");
            assert!(end <= r.tokens.len(), "extend past the sequence");
            assert_eq!(e.is_last_chunk, end == r.tokens.len());
            assert!(e.slots_from <= r.view.len() && e.slots_from <= e.prefix_len);
            assert_eq!(
                e.slots.len(),
                end - e.slots_from,
                "slots cover the wrong range"
            );
            assert!(e.cached_len <= r.prompt_len);
            if !e.is_last_chunk {
                assert_eq!(end % self.cfg.page_size, 0, "chunk end not page aligned");
            }
            r.view.truncate(e.slots_from);
            r.view.extend_from_slice(&e.slots);
        }
        // Pass 2: reads see KV of earlier steps (none of it is being written in this
        // step), writes touch nobody else's slots.
        let holders = self.page_holders();
        let p = self.cfg.page_size as u32;
        let writes: HashSet<u32> = entries
            .iter()
            .flat_map(|e| e.slots[e.slots.len() - e.extend_len..].iter().copied())
            .collect();
        let mut written = HashSet::new();
        let mut sampled = Vec::new();
        for e in entries {
            let r = self.reqs.get_mut(&e.id).expect("known");
            let end = e.prefix_len + e.extend_len;
            let hashes = r.hash_upto(end).to_vec();
            let (read, write) = r.view[..end].split_at(e.prefix_len);
            for (pos, (s, h)) in read.iter().zip(&hashes).enumerate() {
                assert!(
                    !writes.contains(s),
                    "request {} reads slot {s} that this step writes",
                    e.id
                );
                assert_eq!(
                    self.content.get(s),
                    Some(h),
                    "request {} reads wrong KV at position {pos} (slot {s})",
                    e.id
                );
            }
            for (&s, &h) in write.iter().zip(&hashes[e.prefix_len..]) {
                assert!(written.insert(s), "slot {s} written twice in one plan");
                Self::assert_only_holder(&holders, s / p, e.id, s);
                self.content.insert(s, h);
            }
            if r.phase == Phase::Waiting {
                r.cached_len = r.cached_len.max(e.cached_len);
                self.counters.cached_tokens += e.prefix_len;
            }
            if e.is_last_chunk {
                r.phase = Phase::Sampling;
                sampled.push(e.id);
            } else {
                r.phase = Phase::MidChunk;
                self.counters.chunks += 1;
            }
        }
        sampled
    }

    fn apply_decode(&mut self, ids: &[u64], slots: &[u32]) -> Vec<u64> {
        assert_eq!(ids.len(), slots.len());
        let set: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(set.len(), ids.len(), "a request decodes twice");
        for (id, r) in self.live() {
            assert_eq!(
                r.phase == Phase::Running,
                set.contains(id),
                "request {id} in phase {:?}",
                r.phase
            );
        }
        let holders = self.page_holders();
        let p = self.cfg.page_size as u32;
        let mut written = HashSet::new();
        for (&id, &s) in ids.iter().zip(slots) {
            let r = self.reqs.get_mut(&id).expect("known");
            let pos = r.tokens.len() - 1;
            assert_eq!(r.view.len(), pos, "decode of {id} at the wrong position");
            let hashes = r.hash_upto(pos + 1).to_vec();
            for (i, &v) in r.view.iter().enumerate() {
                assert_eq!(
                    self.content.get(&v),
                    Some(&hashes[i]),
                    "request {id} reads wrong KV at position {i}"
                );
            }
            assert!(written.insert(s), "slot {s} written twice in one decode");
            Self::assert_only_holder(&holders, s / p, id, s);
            // The new slot continues the request's own last page or starts a fresh one.
            if !pos.is_multiple_of(p as usize) {
                assert_eq!(
                    s / p,
                    r.view[pos - 1] / p,
                    "decode slot leaves a page half used"
                );
            }
            r.view.push(s);
            self.content.insert(s, hashes[pos]);
            r.phase = Phase::Sampling;
        }
        ids.to_vec()
    }

    /// After every request ended: nothing leaks, the cache holds the rest.
    pub fn check_drained(&mut self) {
        let st = self.sched.stats();
        assert_eq!(st.num_waiting, 0);
        assert_eq!(st.num_running, 0);
        assert_eq!(st.request_owned, 0, "{st:?}");
        assert_eq!(
            st.available + st.evictable + st.protected,
            st.pool_size,
            "{st:?}"
        );
        assert_eq!(st.protected, 0, "locks left behind: {st:?}");
        self.sched.flush_cache().expect("flush");
        let st = self.sched.stats();
        assert_eq!(st.available, st.pool_size, "{st:?}");
        self.check();
    }

    fn check_running_cap(&self) {
        let st = self.sched.stats();
        assert!(
            st.num_running <= self.cfg.max_running_requests,
            "{} running over the cap {}",
            st.num_running,
            self.cfg.max_running_requests
        );
    }
}

pub fn config(pool: usize) -> SchedConfig {
    SchedConfig::new(pool)
}

/// `n` tokens starting at `start`, distinct from other ranges.
pub fn seq(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}
