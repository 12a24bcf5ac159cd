//! The scheduler's request table and batch assembly: which requests run in the next step,
//! how many tokens each, which KV slots and table rows they use, which running requests are
//! retracted, and when a request is finished.
//!
//! API CONTRACT (the Python scheduler process and the bindings are written against it):
//!
//! `BatchScheduler` is the one record of every request in the scheduler process: its tokens,
//! KV slots, request-to-token table row, length limits, stop ids and stop strings, and
//! sampling parameters. It owns the [`RadixTree`], the [`SlotAllocator`] and the table rows,
//! so "no slot is owned twice" and "nothing leaks" are checked in one place
//! (`check_invariants`). The caller owns tensors and sampling. Per step:
//!
//! 1. `add_request` for each new request (it joins the waiting queue);
//! 2. `schedule()` -> [`Step`]: a prefill (chunks of waiting requests, with prefix-cache reuse),
//!    a decode (one token for each running request, retracting some when KV runs out) or idle,
//!    as contiguous arrays (`step::Section`): input ids, positions, KV slots, sequence
//!    lengths, rows, the table writes to apply before the step, which sequences sample (with
//!    their output index and min_new_tokens masks) and the sampling parameters of requests
//!    admitted to a row this step;
//! 3. `commit(tokens)` with one sampled token per sampling sequence of the oldest uncommitted
//!    step (or `abandon()` if that step failed). Commit decides the finishes (stop id / EOS
//!    after min_new_tokens, stop string, max_new_tokens, context length), ends those requests
//!    and returns what to send ([`CommitResult`]);
//! 4. `finish(id)` for requests the caller ends (abort, timeout, grammar), in any state.
//!
//! Overlap: `schedule()` may run while the previous step is still uncommitted (its samples
//! are "pending": a decode step then takes each running request's next input from the device,
//! `Section::InputIds` holds -1). At most one step may be uncommitted when planning. A request
//! whose pending samples already end it (max_new_tokens, context length) is not planned again;
//! one that ends by a stop condition gets one more token planned, which its commit drops (the
//! KV slot it was given is released with the request). Freed slots and rows are only handed
//! out by later plans, so a step in flight never sees them reused before it ran.

mod commit;
mod decode;
mod emit;
mod invariants;
mod policy;
mod prefill;
pub mod request;
pub mod step;

use crate::alloc::{AllocError, SlotAllocator};
use crate::detok::{DetokError, Detokenizer};
use crate::radix::{NodeId, RadixError, RadixTree};
use crate::rng::SplitMix64;
use request::Req;
use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use thiserror::Error;

pub use commit::CommitResult;
pub use request::{flags, FinishKind, Finished, NewRequest, SamplingParams, StopStrings};
pub use step::{FloatSection, PrefillView, Section, Step, StepKind};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("request {0} already exists")]
    DuplicateRequest(u64),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    #[error("request {0} has no input tokens")]
    EmptyRequest(u64),
    #[error("request {0} has stop strings but the scheduler has no stop checker")]
    NoStopChecker(u64),
    #[error("{0} steps are uncommitted: commit (or abandon) the oldest before planning another")]
    TooManyInFlight(usize),
    #[error("no step is waiting for its commit")]
    NothingInFlight,
    #[error("commit of {tokens} tokens for a step that sampled {expected}")]
    LengthMismatch { expected: usize, tokens: usize },
    #[error("cannot flush the cache while {0} requests hold KV or steps are in flight")]
    Busy(usize),
    #[error("unknown schedule policy {0:?} (expected fcfs, lpm, dfs-weight, lof or random)")]
    BadPolicy(String),
    #[error("invalid scheduler configuration: {0}")]
    BadConfig(String),
    #[error(transparent)]
    Radix(#[from] RadixError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Detok(#[from] DetokError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// First come, first served.
    Fcfs,
    /// Longest prefix match first; falls back to fcfs when the queue is longer than
    /// `SchedConfig::lpm_fallback_queue_len`.
    Lpm,
    /// Depth-first over the prefix tree, heavier subtrees (more waiting requests) first.
    DfsWeight,
    /// Longest output (max_new_tokens) first.
    Lof,
    /// Random order from a seeded generator.
    Random,
}

impl FromStr for Policy {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fcfs" => Ok(Policy::Fcfs),
            "lpm" => Ok(Policy::Lpm),
            "dfs-weight" => Ok(Policy::DfsWeight),
            "lof" => Ok(Policy::Lof),
            "random" => Ok(Policy::Random),
            other => Err(SchedError::BadPolicy(other.to_string())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SchedConfig {
    pub policy: Policy,
    /// Seed of the `random` policy.
    pub seed: u64,
    /// KV pool size in usable slots (a multiple of `page_size`).
    pub pool_size: usize,
    pub page_size: usize,
    /// Input tokens one prefill step may compute in total.
    pub max_prefill_tokens: usize,
    /// A request whose remaining input exceeds the step's remaining chunk budget is split into
    /// chunks of at most this many tokens (page aligned). `None`: no chunking (a request larger
    /// than the budget runs alone in its step).
    pub chunked_prefill_size: Option<usize>,
    /// Admitted requests at most; also the number of request-to-token table rows handed out
    /// (rows `0..max_running_requests`).
    pub max_running_requests: usize,
    pub enable_radix_cache: bool,
    /// A request whose prompt and output reach this many tokens finishes (`Length`).
    pub context_len: usize,
    /// Queue length above which `lpm` / `dfs-weight` fall back to fcfs (SGLang: 128).
    pub lpm_fallback_queue_len: usize,
    /// In-batch prefix dedupe: a waiting request whose cached prefix is at most this long and
    /// that shares at least this many tokens with a request already chosen this step waits one
    /// step, so the first seeds the cache (SGLang: 32 / 32).
    pub in_batch_prefix_threshold: usize,
    /// Fraction of each running request's remaining max_new_tokens reserved as decode growth.
    pub init_new_token_ratio: f64,
    pub min_new_token_ratio: f64,
    /// Subtracted from the ratio after every decode step (floor `min_new_token_ratio`).
    pub new_token_ratio_decay: f64,
    /// max_new_tokens counted for a request is clipped to this when reserving (SGLang: 4096).
    pub clip_max_new_tokens: usize,
}

impl SchedConfig {
    /// Defaults for a pool of `pool_size` slots (page size 1, fcfs, 8192-token chunks).
    pub fn new(pool_size: usize) -> Self {
        SchedConfig {
            policy: Policy::Fcfs,
            seed: 0,
            pool_size,
            page_size: 1,
            max_prefill_tokens: 16384,
            chunked_prefill_size: Some(8192),
            max_running_requests: 256,
            enable_radix_cache: true,
            context_len: usize::MAX,
            lpm_fallback_queue_len: 128,
            in_batch_prefix_threshold: 32,
            init_new_token_ratio: 0.7,
            min_new_token_ratio: 0.1,
            new_token_ratio_decay: 0.001,
            clip_max_new_tokens: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedStats {
    /// Requests in the system (waiting, mid-chunk or running).
    pub num_requests: usize,
    pub num_waiting: usize,
    /// Admitted requests (running plus the one mid-chunk).
    pub num_running: usize,
    pub pool_size: usize,
    pub available: usize,
    pub evictable: usize,
    pub protected: usize,
    /// Slots owned by requests and not by the tree.
    pub request_owned: usize,
    pub new_token_ratio: f64,
    /// Table rows not held by a request.
    pub rows_free: usize,
    /// Steps planned and not yet committed.
    pub in_flight: usize,
    /// Retractions since the start.
    pub retracted_total: usize,
    /// Prompt tokens, and of them the ones served from the prefix cache, of the requests that
    /// ended with at least one output token.
    pub hit_prompt_tokens: usize,
    pub hit_cached_tokens: usize,
    pub admission_paused: bool,
}

/// Where a request is in its life. Samples in flight are counted apart (`Req::pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Waiting,
    MidChunk,
    Running,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::MidChunk => "mid-chunk",
            State::Running => "running",
        }
    }
}

pub struct BatchScheduler {
    cfg: SchedConfig,
    tree: RadixTree,
    alloc: SlotAllocator,
    reqs: HashMap<u64, Req>,
    /// (seq, id), sorted by seq.
    waiting: Vec<(u64, u64)>,
    /// Requests past their last prefill chunk, in admission order.
    running: Vec<u64>,
    /// The one request between two prefill chunks.
    chunked: Option<u64>,
    /// Free table rows; popping hands out the lowest.
    free_rows: Vec<u32>,
    /// The sampling request ids of each uncommitted step, oldest first.
    in_flight: VecDeque<Vec<u64>>,
    /// Follows the requests that have stop strings (see `set_stop_checker`).
    stop_checker: Option<Detokenizer>,
    admission_paused: bool,
    next_seq: u64,
    new_token_ratio: f64,
    rng: SplitMix64,
    retracted_total: usize,
    hit_prompt_tokens: usize,
    hit_cached_tokens: usize,
}

fn align_down(n: usize, page: usize) -> usize {
    n - n % page
}

impl BatchScheduler {
    pub fn new(cfg: SchedConfig) -> Result<Self, SchedError> {
        validate(&cfg)?;
        let tree = RadixTree::new(cfg.page_size)?;
        let alloc = SlotAllocator::new(cfg.pool_size, cfg.page_size)?;
        let rows = u32::try_from(cfg.max_running_requests)
            .map_err(|_| SchedError::BadConfig("max_running_requests over u32".into()))?;
        Ok(BatchScheduler {
            tree,
            alloc,
            reqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            chunked: None,
            free_rows: (0..rows).rev().collect(),
            in_flight: VecDeque::new(),
            stop_checker: None,
            admission_paused: false,
            next_seq: 0,
            new_token_ratio: cfg.init_new_token_ratio,
            rng: SplitMix64::new(cfg.seed),
            retracted_total: 0,
            hit_prompt_tokens: 0,
            hit_cached_tokens: 0,
            cfg,
        })
    }

    /// Gives the scheduler the incremental detokenizer that decides stop strings (the
    /// tokenizer of the served model).
    pub fn set_stop_checker(&mut self, checker: Detokenizer) {
        self.stop_checker = Some(checker);
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    pub fn add_request(&mut self, req: NewRequest) -> Result<(), SchedError> {
        let id = req.id;
        if self.reqs.contains_key(&id) {
            return Err(SchedError::DuplicateRequest(id));
        }
        if req.tokens.is_empty() {
            return Err(SchedError::EmptyRequest(id));
        }
        if let Some(stop) = &req.stop_strings {
            let checker = self
                .stop_checker
                .as_mut()
                .ok_or(SchedError::NoStopChecker(id))?;
            checker.add_request(id, &stop.prompt_tail, stop.params.clone())?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.reqs.insert(id, Req::new(req, seq));
        self.waiting.push((seq, id));
        Ok(())
    }

    /// Plans the next step. At most one earlier step may still be uncommitted.
    pub fn schedule(&mut self) -> Result<Step, SchedError> {
        if self.in_flight.len() > 1 {
            return Err(SchedError::TooManyInFlight(self.in_flight.len()));
        }
        if self.running.is_empty() && self.chunked.is_none() {
            self.new_token_ratio = self.cfg.init_new_token_ratio;
        }
        let step = match self.plan_prefill()? {
            Some(step) => step,
            None => self.plan_decode()?,
        };
        if step.kind != StepKind::Idle {
            self.in_flight.push_back(step.sample_ids());
        }
        Ok(step)
    }

    /// Ends a request in any state: its computed KV goes into the prefix cache, its locks,
    /// row and other slots are released. The caller decides why (`FinishKind::Abort` here).
    pub fn finish(&mut self, id: u64) -> Result<Finished, SchedError> {
        self.end(id, FinishKind::Abort)
    }

    /// Puts an admitted request back in the waiting queue without its KV and row, for when
    /// the KV it was planned on may be wrong (a step it depends on failed). Its committed
    /// tokens stay; the tokens of its samples in flight are dropped at their commits. A waiting
    /// request is left as it is.
    pub fn requeue(&mut self, id: u64) -> Result<(), SchedError> {
        if self.unadmit(id)? == State::Waiting {
            return Ok(());
        }
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        r.discard += r.pending;
        r.pending = 0;
        self.enqueue_waiting(id)
    }

    /// Requests (in any state) that arrived more than `limit` seconds before `now`.
    pub fn expired(&self, now: f64, limit: f64) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| now - r.arrival > limit)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// True if `id` is in the system (waiting, mid-chunk or running).
    pub fn contains(&self, id: u64) -> bool {
        self.reqs.contains_key(&id)
    }

    /// Ids of every request in the system, ascending.
    pub fn request_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.reqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The committed tokens (prompt, then output) of a request.
    pub fn tokens(&self, id: u64) -> Option<&[u32]> {
        self.reqs.get(&id).map(|r| r.tokens.as_slice())
    }

    /// Prompt tokens of a request served from the prefix cache so far.
    pub fn cached_len(&self, id: u64) -> Option<usize> {
        self.reqs.get(&id).map(|r| r.cached_len)
    }

    /// While paused, no waiting request is admitted (a mid-chunk request still continues).
    /// The caller pauses after a failed step until the cache can be flushed.
    pub fn set_admission_paused(&mut self, paused: bool) {
        self.admission_paused = paused;
    }

    pub fn stats(&self) -> SchedStats {
        SchedStats {
            num_requests: self.reqs.len(),
            num_waiting: self.waiting.len(),
            num_running: self.running.len() + usize::from(self.chunked.is_some()),
            pool_size: self.cfg.pool_size,
            available: self.alloc.available(),
            evictable: self.tree.evictable_size(),
            protected: self.tree.protected_size(),
            request_owned: self.reqs.values().map(|r| self.owned_slots(r)).sum(),
            new_token_ratio: self.new_token_ratio,
            rows_free: self.free_rows.len(),
            in_flight: self.in_flight.len(),
            retracted_total: self.retracted_total,
            hit_prompt_tokens: self.hit_prompt_tokens,
            hit_cached_tokens: self.hit_cached_tokens,
            admission_paused: self.admission_paused,
        }
    }

    /// Empties the prefix cache. Refused while a request holds KV or a row, or a step is
    /// uncommitted; waiting requests (which hold neither) may stay.
    pub fn flush_cache(&mut self) -> Result<(), SchedError> {
        let busy = self
            .reqs
            .values()
            .filter(|r| r.state != State::Waiting)
            .count();
        if busy > 0 || !self.in_flight.is_empty() {
            return Err(SchedError::Busy(busy.max(self.in_flight.len())));
        }
        // No request holds KV: every allocated slot is the tree's.
        self.tree.reset();
        self.alloc.reset();
        self.hit_prompt_tokens = 0;
        self.hit_cached_tokens = 0;
        Ok(())
    }

    /// Checks: every slot is free, owned by the tree, or owned by exactly one request;
    /// evictable + protected = tree total; at most one request mid-chunk; rows are owned once.
    pub fn check_invariants(&self) -> Result<(), String> {
        invariants::check(self)
    }

    pub fn tree(&self) -> &RadixTree {
        &self.tree
    }

    pub fn allocator(&self) -> &SlotAllocator {
        &self.alloc
    }

    // ---- ending requests ----------------------------------------------------------------

    /// Removes a request from wherever it is and releases what it holds.
    fn end(&mut self, id: u64, kind: FinishKind) -> Result<Finished, SchedError> {
        if self.unadmit(id)? == State::Waiting {
            self.waiting.retain(|&(_, w)| w != id);
        }
        let r = self
            .reqs
            .remove(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        if let Some(checker) = self.stop_checker.as_mut() {
            checker.remove(id);
        }
        let output_len = r.output_len();
        if output_len > 0 {
            self.hit_prompt_tokens += r.prompt_len;
            self.hit_cached_tokens += r.cached_len;
        }
        Ok(Finished {
            id,
            kind,
            output_len,
            cached_len: r.cached_len,
        })
    }

    /// Takes an admitted request off the running list (or the mid-chunk slot) and releases
    /// its KV and row; returns the state it was in (a waiting request is left as it is).
    fn unadmit(&mut self, id: u64) -> Result<State, SchedError> {
        let state = self
            .reqs
            .get(&id)
            .ok_or(SchedError::UnknownRequest(id))?
            .state;
        match state {
            State::Waiting => return Ok(state),
            State::MidChunk => self.chunked = None,
            State::Running => self.running.retain(|&r| r != id),
        }
        self.release_kv(id)?;
        Ok(state)
    }

    /// Puts a request that holds no KV back in the waiting queue, at its arrival position.
    fn enqueue_waiting(&mut self, id: u64) -> Result<(), SchedError> {
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        r.state = State::Waiting;
        let at = self.waiting.partition_point(|&(seq, _)| seq < r.seq);
        self.waiting.insert(at, (r.seq, id));
        Ok(())
    }

    // ---- memory -------------------------------------------------------------------------

    /// Gives up a request's KV and row: the computed part goes into the tree (duplicates of
    /// what is already cached are freed), the rest is freed, the lock is released.
    /// NOTE: slots of tokens still being sampled (in flight) have no known token to cache
    /// under; they are freed, and only a later plan can hand them out again.
    fn release_kv(&mut self, id: u64) -> Result<(), SchedError> {
        let p = self.cfg.page_size;
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        let kv = r.slots.len();
        if self.cfg.enable_radix_cache {
            let known = kv.min(r.tokens.len());
            let cached = self
                .tree
                .insert(&r.tokens[..known], &r.slots[..known], &r.namespace)?
                .max(r.tree_owned);
            // `[tree_owned..cached]`: another request cached these tokens first; ours are
            // duplicates. `[cached..aligned]` now belongs to the tree.
            let mut free = r.slots[r.tree_owned..cached].to_vec();
            free.extend_from_slice(&r.slots[align_down(known, p).max(cached)..]);
            if let Some(node) = r.node.take() {
                self.tree.unlock(node)?;
            }
            self.alloc.free(&free)?;
        } else {
            self.alloc.free(&r.slots)?;
        }
        r.slots.clear();
        r.tree_owned = 0;
        r.table_len = 0;
        if let Some(row) = r.row.take() {
            self.free_rows.push(row);
        }
        Ok(())
    }

    /// Appends KV slots for `n` more tokens of a request, evicting cached prefixes if needed.
    fn grow(&mut self, id: u64, n: usize) -> Result<(), SchedError> {
        let r = &self.reqs[&id];
        let (seq_len, last) = (r.slots.len(), r.slots.last().copied().unwrap_or(0));
        self.make_room(self.alloc.pages_needed(seq_len, n) * self.cfg.page_size)?;
        let new = self.alloc.alloc_extend(seq_len, last, n)?;
        self.reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?
            .slots
            .extend(new);
        Ok(())
    }

    /// Evicts unlocked cached prefixes until `slots` slots are free (or nothing is left).
    fn make_room(&mut self, slots: usize) -> Result<(), SchedError> {
        let available = self.alloc.available();
        if available < slots && self.cfg.enable_radix_cache {
            let freed = self.tree.evict(slots - available);
            self.alloc.free(&freed)?;
        }
        Ok(())
    }

    fn evictable(&self) -> usize {
        if self.cfg.enable_radix_cache {
            self.tree.evictable_size()
        } else {
            0
        }
    }

    /// Decode growth reserved for a request: its remaining output, clipped, times the ratio.
    fn growth(&self, r: &Req) -> f64 {
        let remaining = r.max_new_tokens.saturating_sub(r.output_len());
        remaining.min(self.cfg.clip_max_new_tokens) as f64 * self.new_token_ratio
    }

    /// Slots owned by the request itself (whole pages): `slots[tree_owned..]` starts on a page
    /// boundary and fills its pages in order.
    fn owned_slots(&self, r: &Req) -> usize {
        let p = self.cfg.page_size;
        (r.slots.len() - r.tree_owned).div_ceil(p) * p
    }
}

fn validate(cfg: &SchedConfig) -> Result<(), SchedError> {
    let bad = |msg: String| Err(SchedError::BadConfig(msg));
    let p = cfg.page_size;
    if p == 0 {
        return bad("page_size must be >= 1".into());
    }
    if cfg.pool_size == 0 || !cfg.pool_size.is_multiple_of(p) {
        return bad(format!(
            "pool_size {} must be a positive multiple of page_size {p}",
            cfg.pool_size
        ));
    }
    if cfg.max_prefill_tokens < p {
        return bad(format!(
            "max_prefill_tokens {} must be at least page_size {p}",
            cfg.max_prefill_tokens
        ));
    }
    if let Some(c) = cfg.chunked_prefill_size {
        if c < p {
            return bad(format!(
                "chunked_prefill_size {c} must be at least page_size {p}"
            ));
        }
    }
    if cfg.max_running_requests == 0 {
        return bad("max_running_requests must be >= 1".into());
    }
    if cfg.context_len < 2 {
        return bad("context_len must be >= 2".into());
    }
    let (init, min, decay) = (
        cfg.init_new_token_ratio,
        cfg.min_new_token_ratio,
        cfg.new_token_ratio_decay,
    );
    if !(0.0..=1.0).contains(&min) || !(min..=1.0).contains(&init) {
        return bad(format!(
            "need 0 <= min_new_token_ratio ({min}) <= init_new_token_ratio ({init}) <= 1"
        ));
    }
    if !(decay.is_finite() && decay >= 0.0) {
        return bad(format!("new_token_ratio_decay {decay} must be >= 0"));
    }
    Ok(())
}
