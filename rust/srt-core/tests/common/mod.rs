//! A test driver that plays the Python scheduler process and the model runner against a
//! `BatchScheduler`: it applies every step's table writes to its own request-to-token table,
//! keeps a model of what every KV slot holds, "samples" a token per sampling sequence, commits
//! (immediately, or one step late in overlap mode, as the overlapping scheduler does) and checks
//! every contract of the step arrays and of the commits on the way.
//!
//! KV model: writing position `i` of a request stores `hash(namespace, tokens[..=i])` in its
//! slot. Whenever a step makes a request read KV (its prefix in a prefill, everything before
//! its input in a decode), each slot the table gives must still hold exactly that hash: a cache
//! hit on the wrong slots, a stale table entry, a slot freed and reused while still read, or two
//! requests writing one slot all show up here.

#![allow(dead_code)]

use srt_core::sched::{
    BatchScheduler, CommitResult, FinishKind, NewRequest, SchedConfig, SchedStats, Section, Step,
    StepKind,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    MidChunk,
    Running,
    Finished,
}

pub struct SimReq {
    pub prompt_len: usize,
    /// Every token the "device" knows: the prompt, then each sampled token (committed or not).
    pub tokens: Vec<u32>,
    /// Tokens the scheduler has committed.
    pub committed: usize,
    pub max_new: usize,
    pub stop_ids: Vec<u32>,
    pub namespace: String,
    pub row: Option<i64>,
    pub phase: Phase,
    pub aborted: bool,
    pub finish: Option<FinishKind>,
    pub cached_len: usize,
    pub retractions: usize,
    /// `hashes[i]` = hash of (namespace, tokens[..=i]).
    hashes: Vec<u64>,
}

impl SimReq {
    /// Committed output tokens.
    pub fn outputs(&self) -> usize {
        self.committed - self.prompt_len
    }

    pub fn output_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..self.committed]
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
    /// Tokens sampled for requests that had ended by their commit (overlap only).
    pub dropped: usize,
}

pub struct Driver {
    pub sched: BatchScheduler,
    pub cfg: SchedConfig,
    pub reqs: BTreeMap<u64, SimReq>,
    /// Commit one step late, as the overlapping scheduler does.
    pub overlap: bool,
    /// The request-to-token table as the runner holds it: (row, column) -> slot.
    table: HashMap<(i64, usize), u32>,
    /// What each KV slot holds (see the module doc).
    content: HashMap<u32, u64>,
    /// Sampled tokens of the uncommitted steps, oldest first.
    uncommitted: VecDeque<Vec<u32>>,
    pub counters: Counters,
    /// Sampled tokens are a function of the sequence (greedy-like), so identical prompts
    /// generate identical outputs; `vocab` keeps collisions likely.
    pub vocab: u32,
    /// The last commit's result.
    pub last_commit: Option<CommitResult>,
}

impl Driver {
    pub fn new(cfg: SchedConfig) -> Self {
        Driver {
            sched: BatchScheduler::new(cfg.clone()).expect("valid config"),
            cfg,
            reqs: BTreeMap::new(),
            overlap: false,
            table: HashMap::new(),
            content: HashMap::new(),
            uncommitted: VecDeque::new(),
            counters: Counters::default(),
            vocab: 50,
            last_commit: None,
        }
    }

    pub fn overlapped(cfg: SchedConfig) -> Self {
        Driver {
            overlap: true,
            ..Driver::new(cfg)
        }
    }

    pub fn add(&mut self, id: u64, tokens: Vec<u32>, max_new: usize, namespace: &str) {
        self.add_request(NewRequest {
            namespace: namespace.to_string(),
            ..NewRequest::new(id, tokens, max_new)
        });
    }

    pub fn add_request(&mut self, req: NewRequest) {
        self.sched.add_request(req.clone()).expect("add_request");
        self.reqs.insert(
            req.id,
            SimReq {
                prompt_len: req.tokens.len(),
                committed: req.tokens.len(),
                tokens: req.tokens,
                max_new: req.max_new_tokens,
                stop_ids: req.stop_ids,
                namespace: req.namespace,
                row: None,
                phase: Phase::Waiting,
                aborted: false,
                finish: None,
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

    /// Ends a request from the outside (abort), in whatever state it is.
    pub fn abort(&mut self, id: u64) {
        let f = self.sched.finish(id).expect("finish");
        assert_eq!(f.kind, FinishKind::Abort);
        let r = self.reqs.get_mut(&id).expect("known");
        assert_eq!(f.output_len, r.outputs(), "abort of {id}: output count");
        r.phase = Phase::Finished;
        r.aborted = true;
        r.finish = Some(FinishKind::Abort);
        r.row = None;
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

    /// One scheduler step: plan, check and apply it ("forward", sample), then commit what is
    /// due (this step at once; in overlap mode the previous one).
    pub fn step(&mut self) -> Step {
        let step = self.sched.schedule().expect("schedule");
        for &id in step.section(Section::Retracted) {
            let id = id as u64;
            let r = self.reqs.get_mut(&id).expect("retracted request is known");
            assert_eq!(r.phase, Phase::Running, "retracted {id} was not running");
            r.phase = Phase::Waiting;
            r.row = None;
            r.retractions += 1;
            self.counters.retractions += 1;
        }
        match step.kind {
            StepKind::Idle => {
                self.counters.idles += 1;
                assert_eq!(step.num_seqs(), 0);
            }
            StepKind::Prefill => {
                self.counters.prefills += 1;
                self.apply(&step);
            }
            StepKind::Decode => {
                self.counters.decodes += 1;
                self.apply(&step);
            }
        }
        self.check_running_cap();
        self.check();
        let keep = usize::from(self.overlap && step.kind != StepKind::Idle);
        while self.uncommitted.len() > keep {
            self.commit_oldest();
        }
        self.check();
        step
    }

    /// Commits the oldest uncommitted step and checks the scheduler's decisions.
    pub fn commit_oldest(&mut self) {
        let tokens = self.uncommitted.pop_front().expect("a step to commit");
        let res = self.sched.commit(&tokens).expect("commit");
        for (&id, &tok) in res.ids.iter().zip(&res.tokens) {
            let id = id as u64;
            let r = self.reqs.get_mut(&id).expect("known");
            assert_ne!(r.phase, Phase::Finished, "token committed to ended {id}");
            assert_eq!(
                r.tokens[r.committed], tok as u32,
                "request {id} committed a token it did not sample next"
            );
            r.committed += 1;
        }
        let got: usize = res.ids.len() + res.finished.len();
        let sampled = tokens.len();
        self.counters.dropped += sampled.saturating_sub(got);
        for &(id, cached) in &res.first {
            let r = self.reqs.get_mut(&id).expect("known");
            assert_eq!(r.outputs(), 1, "first token of {id}");
            // A later chunk may adopt more of the prompt from the cache than the admission.
            assert!(
                r.cached_len <= cached && cached < r.prompt_len,
                "cached tokens of {id}: {cached}, admitted with {}",
                r.cached_len
            );
            r.cached_len = cached;
        }
        for f in &res.finished {
            let r = self.reqs.get_mut(&f.id).expect("known");
            assert_ne!(r.phase, Phase::Finished, "{} finished twice", f.id);
            assert_eq!(f.output_len, r.outputs(), "output count of {}", f.id);
            match &f.kind {
                FinishKind::Length(n) => {
                    assert_eq!(*n, r.max_new, "length finish of {}", f.id);
                    assert_eq!(r.outputs(), r.max_new);
                }
                FinishKind::StopToken(t) => {
                    assert!(r.stop_ids.contains(t));
                    assert_eq!(r.output_tokens().last(), Some(t));
                }
                other => panic!("unexpected finish {other:?}"),
            }
            r.phase = Phase::Finished;
            r.finish = Some(f.kind.clone());
            r.row = None;
        }
        self.last_commit = Some(res);
    }

    /// Runs until every request has finished and nothing is uncommitted; panics after
    /// `max_steps`.
    pub fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if self.all_finished() && self.uncommitted.is_empty() {
                return;
            }
            let step = self.step();
            if step.kind == StepKind::Idle
                && self.uncommitted.is_empty()
                && self.live().all(|(_, r)| r.phase == Phase::Waiting)
                && !self.all_finished()
            {
                panic!("idle with waiting requests: nothing can ever be admitted");
            }
        }
        panic!("requests still unfinished after {max_steps} steps");
    }

    /// Which live requests hold each page through their table rows.
    fn page_holders(&self) -> HashMap<u32, HashSet<u64>> {
        let p = self.cfg.page_size as u32;
        let rows: HashMap<i64, u64> = self
            .live()
            .filter_map(|(&id, r)| r.row.map(|row| (row, id)))
            .collect();
        let mut holders: HashMap<u32, HashSet<u64>> = HashMap::new();
        for (&(row, _), &s) in &self.table {
            if let Some(&id) = rows.get(&row) {
                holders.entry(s / p).or_default().insert(id);
            }
        }
        holders
    }

    /// Checks a prefill or decode step's arrays against the driver's state, applies its table
    /// writes and KV writes, and samples.
    fn apply(&mut self, step: &Step) {
        let ids = step.section(Section::Ids).to_vec();
        let rows = step.section(Section::Rows).to_vec();
        let seq_lens = step.section(Section::SeqLens).to_vec();
        let prefill = step.kind == StepKind::Prefill;
        let (prefix_lens, extend_lens) = if prefill {
            (
                step.section(Section::PrefixLens).to_vec(),
                step.section(Section::ExtendLens).to_vec(),
            )
        } else {
            assert!(step.section(Section::PrefixLens).is_empty());
            (
                seq_lens.iter().map(|&n| n - 1).collect(),
                vec![1; ids.len()],
            )
        };
        let b = ids.len();
        assert!(b > 0, "empty step");
        assert_eq!(rows.len(), b);
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            b,
            "a request twice in one step"
        );
        assert_eq!(rows.iter().collect::<HashSet<_>>().len(), b, "a row twice");
        let total: usize = extend_lens.iter().map(|&n| n as usize).sum();
        assert_eq!(step.num_tokens(), total);
        if prefill {
            let budget = match self.cfg.chunked_prefill_size {
                Some(c) => c.min(self.cfg.max_prefill_tokens),
                None => self.cfg.max_prefill_tokens,
            };
            assert!(
                total <= budget || (b == 1 && self.cfg.chunked_prefill_size.is_none()),
                "prefill of {total} tokens over the budget {budget}"
            );
        } else {
            let expected: Vec<u64> = self
                .live()
                .filter(|(_, r)| r.phase == Phase::Running)
                .map(|(&id, _)| id)
                .collect();
            for id in &ids {
                assert!(expected.contains(&(*id as u64)), "decode of {id}");
            }
        }
        // Rows: a request keeps its row; a newly admitted one takes a row nobody live holds.
        let held: HashMap<i64, u64> = self
            .live()
            .filter_map(|(&id, r)| r.row.map(|row| (row, id)))
            .collect();
        for (&id, &row) in ids.iter().zip(&rows) {
            let id = id as u64;
            assert!((row as usize) < self.cfg.max_running_requests, "row {row}");
            let r = self.reqs.get_mut(&id).expect("planned request is known");
            match r.row {
                Some(mine) => assert_eq!(mine, row, "request {id} changed rows"),
                None => {
                    assert!(prefill, "decode of {id} without a row");
                    assert!(!held.contains_key(&row), "row {row} handed out twice");
                    r.row = Some(row);
                    // The runner's row holds whatever its last owner left there.
                    self.table.retain(|&(tr, _), _| tr != row);
                }
            }
        }
        let admitted: HashSet<i64> = step.section(Section::AdmitRows).iter().copied().collect();
        // Table writes touch only this step's rows.
        let batch_rows: HashSet<i64> = rows.iter().copied().collect();
        let tr = step.section(Section::TableRows);
        let tc = step.section(Section::TableCols);
        let ts = step.section(Section::TableSlots);
        assert!(tr.len() == tc.len() && tc.len() == ts.len());
        for ((&row, &col), &slot) in tr.iter().zip(tc).zip(ts) {
            assert!(
                batch_rows.contains(&row),
                "table write to row {row} outside the step"
            );
            self.table.insert((row, col as usize), slot as u32);
        }
        // Reads see KV of earlier steps (none of it written in this step); writes touch nobody
        // else's slots.
        let holders = self.page_holders();
        let p = self.cfg.page_size as u32;
        let writes: HashSet<u32> = step
            .section(Section::OutLoc)
            .iter()
            .map(|&s| s as u32)
            .collect();
        assert_eq!(writes.len(), total, "a slot written twice in one step");
        let input_ids = step.section(Section::InputIds).to_vec();
        let positions = step.section(Section::Positions).to_vec();
        let out_loc = step.section(Section::OutLoc).to_vec();
        let mut t = 0;
        for i in 0..b {
            let id = ids[i] as u64;
            let row = rows[i];
            let (prefix, extend) = (prefix_lens[i] as usize, extend_lens[i] as usize);
            assert_eq!(seq_lens[i] as usize, prefix + extend);
            let r = self.reqs.get_mut(&id).expect("known");
            if prefill {
                match r.phase {
                    Phase::Waiting => assert!(admitted.contains(&row), "admission of {id}"),
                    Phase::MidChunk => {
                        assert_eq!(i, 0, "the mid-chunk request must resume first");
                        assert!(!admitted.contains(&row));
                    }
                    other => panic!("prefill of request {id} in phase {other:?}"),
                }
                assert!(extend > 0, "empty extend");
                assert!(
                    prefix + extend <= r.committed,
                    "extend past the known tokens"
                );
                if prefix + extend < r.committed {
                    assert_eq!(
                        (prefix + extend) % self.cfg.page_size,
                        0,
                        "chunk not aligned"
                    );
                }
                if r.phase == Phase::Waiting {
                    self.counters.cached_tokens += prefix;
                    if r.outputs() == 0 {
                        r.cached_len = prefix;
                    }
                }
            } else {
                assert_eq!(r.phase, Phase::Running, "decode of {id}");
                assert_eq!(
                    prefix + 1,
                    r.tokens.len(),
                    "decode of {id} at the wrong position"
                );
            }
            let hashes = r.hash_upto(prefix + extend).to_vec();
            for (pos, h) in hashes.iter().enumerate().take(prefix) {
                let s = *self
                    .table
                    .get(&(row, pos))
                    .unwrap_or_else(|| panic!("request {id}: no table entry at {pos}"));
                assert!(
                    !writes.contains(&s),
                    "request {id} reads slot {s} that this step writes"
                );
                assert_eq!(
                    self.content.get(&s),
                    Some(h),
                    "request {id} reads wrong KV at position {pos} (slot {s})"
                );
            }
            for (pos, &h) in hashes.iter().enumerate().skip(prefix) {
                assert_eq!(positions[t] as usize, pos);
                let tok = input_ids[t];
                if pos < r.committed {
                    assert_eq!(tok, i64::from(r.tokens[pos]), "input of {id} at {pos}");
                } else {
                    assert_eq!(
                        tok, -1,
                        "an uncommitted input of {id} must come from the device"
                    );
                }
                let s = out_loc[t] as u32;
                assert_eq!(
                    self.table.get(&(row, pos)),
                    Some(&s),
                    "table of {id} at {pos}"
                );
                if let Some(h) = holders.get(&(s / p)) {
                    assert!(
                        h.iter().all(|&o| o == id),
                        "slot {s} written by {id} is also held by {h:?}"
                    );
                }
                // A request fills its own last page before taking a fresh one.
                if pos > 0 && !pos.is_multiple_of(p as usize) {
                    if let Some(&prev) = self.table.get(&(row, pos - 1)) {
                        assert_eq!(s / p, prev / p, "slot of {id} leaves a page half used");
                    }
                }
                self.content.insert(s, h);
                t += 1;
            }
            r.phase = Phase::MidChunk;
        }
        // Samples.
        let mut sampled = Vec::new();
        let steps = step.section(Section::SampleSteps).to_vec();
        let sample_rows = step.section(Section::SampleRows).to_vec();
        for (k, &pos) in step.section(Section::SamplePos).iter().enumerate() {
            let id = ids[pos as usize] as u64;
            assert_eq!(sample_rows[k], rows[pos as usize]);
            let r = self.reqs.get_mut(&id).expect("known");
            let n = r.tokens.len();
            assert_eq!(
                seq_lens[pos as usize] as usize, n,
                "{id} samples before its end"
            );
            assert_eq!(steps[k] as usize, n - r.prompt_len, "output index of {id}");
            let tok = (r.hash_upto(n)[n - 1] % u64::from(self.vocab)) as u32;
            r.tokens.push(tok);
            r.phase = Phase::Running;
            sampled.push(tok);
        }
        for id in &ids {
            if self.reqs[&(*id as u64)].phase == Phase::MidChunk {
                self.counters.chunks += 1;
            }
        }
        assert!(
            ids.iter()
                .filter(|&&id| self.reqs[&(id as u64)].phase == Phase::MidChunk)
                .count()
                <= 1,
            "two requests mid-chunk"
        );
        self.uncommitted.push_back(sampled);
    }

    /// After every request ended: nothing leaks, the cache holds the rest.
    pub fn check_drained(&mut self) {
        let st = self.sched.stats();
        assert_eq!(st.num_requests, 0);
        assert_eq!(st.num_waiting, 0);
        assert_eq!(st.num_running, 0);
        assert_eq!(st.in_flight, 0);
        assert_eq!(st.request_owned, 0, "{st:?}");
        assert_eq!(st.rows_free, self.cfg.max_running_requests, "{st:?}");
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
