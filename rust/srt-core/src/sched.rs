//! Waiting queue and batch assembly: which requests run in the next step, how many tokens
//! each, which KV slots they write, and which running requests are retracted.
//!
//! API CONTRACT (fixed; the Python scheduler process and the bindings are written against it):
//!
//! `BatchScheduler` owns the [`RadixTree`] and the [`SlotAllocator`] and every admitted
//! request's KV slots, so "no slot is owned twice" and "nothing leaks" are checked in one place
//! (`check_invariants`). Python owns tensors and sampling; it calls, once per step:
//!
//! 1. `add_request` for each new request (it joins the waiting queue),
//! 2. `schedule()` -> `Plan`:
//!    - `Plan::Prefill`: entries to extend. Entry `e` computes `tokens[e.prefix_len ..
//!      e.prefix_len + e.extend_len]`; `e.slots` are the KV slots of
//!      `tokens[e.slots_from .. e.prefix_len + e.extend_len]` (Python already knows the slots
//!      before `slots_from` from earlier chunks; `slots_from == 0` on admission). The last
//!      `extend_len` of them are where the new KV is written. `is_last_chunk`: the whole
//!      sequence is now in KV and the next token is sampled; the request is running from now on.
//!      A plan-time insert puts every entry's computed prefix into the tree, so a later request
//!      with the same prefix reuses it (this is how in-batch dedupe seeds the cache).
//!    - `Plan::Decode`: every running request decodes one token: input `tokens.last()` at
//!      position `tokens.len() - 1`, KV written to `slots[i]`. `retracted` lists requests that
//!      were moved back to the waiting queue (their KV was cached in the tree and released);
//!      Python drops their slots and keeps their output so far.
//!    - `Plan::Idle`: nothing to do.
//! 3. `commit(ids, tokens)`: the token sampled for each request that sampled this step
//!    (decode entries and prefill entries with `is_last_chunk`).
//! 4. `finish(id)`: the request ended (finished, aborted, disconnected), in any state: its
//!    computed KV goes into the prefix cache, locks are released, the rest is freed.
//!
//! Between a plan and the next `schedule()` call every sampling request must be committed or
//! finished.

mod invariants;
mod policy;
mod prefill;

use crate::alloc::{AllocError, SlotAllocator};
use crate::radix::{NodeId, RadixError, RadixTree};
use crate::rng::SplitMix64;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("request {0} already exists")]
    DuplicateRequest(u64),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    #[error("request {0} has no input tokens")]
    EmptyRequest(u64),
    #[error("request {id} is not waiting for a sampled token (state: {state})")]
    NotSampling { id: u64, state: &'static str },
    #[error(
        "request {0} still waits for its sampled token: commit or finish it before the next schedule()"
    )]
    PendingSample(u64),
    #[error("ids and tokens differ in length: {ids} vs {tokens}")]
    LengthMismatch { ids: usize, tokens: usize },
    #[error("cannot flush the cache while {0} requests are in the system")]
    Busy(usize),
    #[error("unknown schedule policy {0:?} (expected fcfs, lpm, dfs-weight, lof or random)")]
    BadPolicy(String),
    #[error("invalid scheduler configuration: {0}")]
    BadConfig(String),
    #[error(transparent)]
    Radix(#[from] RadixError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
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
    pub max_running_requests: usize,
    pub enable_radix_cache: bool,
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
            lpm_fallback_queue_len: 128,
            in_batch_prefix_threshold: 32,
            init_new_token_ratio: 0.7,
            min_new_token_ratio: 0.1,
            new_token_ratio_decay: 0.001,
            clip_max_new_tokens: 4096,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: u64,
    /// Prompt token ids.
    pub tokens: Vec<u32>,
    pub max_new_tokens: usize,
    /// Prefix-cache namespace (cache salt); "" by default.
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillEntry {
    pub id: u64,
    /// Tokens already in KV before this step (prefix cache hit and earlier chunks).
    pub prefix_len: usize,
    /// Tokens computed this step.
    pub extend_len: usize,
    /// Tokens of this request served from the prefix cache so far (usage reporting).
    pub cached_len: usize,
    /// `slots` covers `tokens[slots_from .. prefix_len + extend_len]`.
    pub slots_from: usize,
    pub slots: Vec<u32>,
    pub is_last_chunk: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeBatch {
    pub ids: Vec<u64>,
    /// One new KV slot per request, aligned with `ids`.
    pub slots: Vec<u32>,
    /// Requests moved back to the waiting queue to make room.
    pub retracted: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Idle,
    Prefill(Vec<PrefillEntry>),
    Decode(DecodeBatch),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedStats {
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
}

/// Where a request is in its life. `Sampling`: its last plan computed the logits of its next
/// token, which `commit` appends; every other state has no sample outstanding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    MidChunk,
    Sampling,
    Running,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::MidChunk => "mid-chunk",
            State::Sampling => "sampling",
            State::Running => "running",
        }
    }
}

struct Req {
    /// Prompt followed by the output so far.
    tokens: Vec<u32>,
    max_new_tokens: usize,
    output_len: usize,
    namespace: String,
    /// Arrival order; a retracted request keeps it, so it goes back near the queue's front.
    seq: u64,
    /// KV slots of `tokens[..slots.len()]`.
    slots: Vec<u32>,
    /// NOTE: `slots[..tree_owned]` belong to the tree (locked through `node`);
    /// `slots[tree_owned..]` belong to the request. `tree_owned` is page aligned.
    tree_owned: usize,
    node: Option<NodeId>,
    cached_len: usize,
    state: State,
}

impl Req {
    fn prompt_len(&self) -> usize {
        self.tokens.len() - self.output_len
    }

    /// The key matched against the prefix cache: the last token is always computed, since its
    /// logits give the next token.
    fn match_key(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - 1]
    }
}

pub struct BatchScheduler {
    cfg: SchedConfig,
    tree: RadixTree,
    alloc: SlotAllocator,
    reqs: HashMap<u64, Req>,
    /// (seq, id), sorted by seq.
    waiting: Vec<(u64, u64)>,
    /// Requests past their last prefill chunk (`Sampling` or `Running`), in admission order.
    running: Vec<u64>,
    /// The one request between two prefill chunks.
    chunked: Option<u64>,
    next_seq: u64,
    new_token_ratio: f64,
    rng: SplitMix64,
}

fn align_down(n: usize, page: usize) -> usize {
    n - n % page
}

/// Retraction resets the ratio as if every remaining request will need this many more steps
/// (SGLang: `retract_decode_steps`).
const RETRACT_DECODE_STEPS: usize = 10;

impl BatchScheduler {
    pub fn new(cfg: SchedConfig) -> Result<Self, SchedError> {
        validate(&cfg)?;
        let tree = RadixTree::new(cfg.page_size)?;
        let alloc = SlotAllocator::new(cfg.pool_size, cfg.page_size)?;
        Ok(BatchScheduler {
            tree,
            alloc,
            reqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            chunked: None,
            next_seq: 0,
            new_token_ratio: cfg.init_new_token_ratio,
            rng: SplitMix64::new(cfg.seed),
            cfg,
        })
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    pub fn add_request(&mut self, req: NewRequest) -> Result<(), SchedError> {
        if self.reqs.contains_key(&req.id) {
            return Err(SchedError::DuplicateRequest(req.id));
        }
        if req.tokens.is_empty() {
            return Err(SchedError::EmptyRequest(req.id));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.reqs.insert(
            req.id,
            Req {
                tokens: req.tokens,
                max_new_tokens: req.max_new_tokens,
                output_len: 0,
                namespace: req.namespace,
                seq,
                slots: Vec::new(),
                tree_owned: 0,
                node: None,
                cached_len: 0,
                state: State::Waiting,
            },
        );
        self.waiting.push((seq, req.id));
        Ok(())
    }

    pub fn schedule(&mut self) -> Result<Plan, SchedError> {
        if let Some(&id) = self
            .running
            .iter()
            .find(|id| self.reqs[id].state == State::Sampling)
        {
            return Err(SchedError::PendingSample(id));
        }
        if self.running.is_empty() && self.chunked.is_none() {
            self.new_token_ratio = self.cfg.init_new_token_ratio;
        }
        let entries = self.plan_prefill()?;
        if !entries.is_empty() {
            return Ok(Plan::Prefill(entries));
        }
        if !self.running.is_empty() {
            return self.plan_decode().map(Plan::Decode);
        }
        Ok(Plan::Idle)
    }

    pub fn commit(&mut self, ids: &[u64], tokens: &[u32]) -> Result<(), SchedError> {
        if ids.len() != tokens.len() {
            return Err(SchedError::LengthMismatch {
                ids: ids.len(),
                tokens: tokens.len(),
            });
        }
        // All or nothing: validate every id before changing any request.
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            let r = self.reqs.get(&id).ok_or(SchedError::UnknownRequest(id))?;
            if r.state != State::Sampling {
                return Err(SchedError::NotSampling {
                    id,
                    state: r.state.name(),
                });
            }
            if !seen.insert(id) {
                return Err(SchedError::NotSampling {
                    id,
                    state: "listed twice in one commit",
                });
            }
        }
        for (&id, &tok) in ids.iter().zip(tokens) {
            if let Some(r) = self.reqs.get_mut(&id) {
                r.tokens.push(tok);
                r.output_len += 1;
                r.state = State::Running;
            }
        }
        Ok(())
    }

    pub fn finish(&mut self, id: u64) -> Result<(), SchedError> {
        let state = self
            .reqs
            .get(&id)
            .ok_or(SchedError::UnknownRequest(id))?
            .state;
        match state {
            State::Waiting => self.waiting.retain(|&(_, w)| w != id),
            State::MidChunk => {
                self.release_kv(id)?;
                self.chunked = None;
            }
            State::Sampling | State::Running => {
                self.release_kv(id)?;
                self.running.retain(|&r| r != id);
            }
        }
        self.reqs.remove(&id);
        Ok(())
    }

    /// True if `id` is known (waiting, mid-chunk or running).
    pub fn contains(&self, id: u64) -> bool {
        self.reqs.contains_key(&id)
    }

    pub fn stats(&self) -> SchedStats {
        SchedStats {
            num_waiting: self.waiting.len(),
            num_running: self.running.len() + usize::from(self.chunked.is_some()),
            pool_size: self.cfg.pool_size,
            available: self.alloc.available(),
            evictable: self.tree.evictable_size(),
            protected: self.tree.protected_size(),
            request_owned: self.reqs.values().map(|r| self.owned_slots(r)).sum(),
            new_token_ratio: self.new_token_ratio,
        }
    }

    /// Empties the prefix cache; refused while any request is in the system.
    pub fn flush_cache(&mut self) -> Result<(), SchedError> {
        if !self.reqs.is_empty() {
            return Err(SchedError::Busy(self.reqs.len()));
        }
        // With no request in the system every allocated slot is the tree's.
        self.tree.reset();
        self.alloc.reset();
        Ok(())
    }

    /// Checks: every slot is free, owned by the tree, or owned by exactly one request;
    /// evictable + protected = tree total; at most one request mid-chunk.
    pub fn check_invariants(&self) -> Result<(), String> {
        invariants::check(self)
    }

    pub fn tree(&self) -> &RadixTree {
        &self.tree
    }

    pub fn allocator(&self) -> &SlotAllocator {
        &self.alloc
    }

    // ---- decode -------------------------------------------------------------------------

    fn plan_decode(&mut self) -> Result<DecodeBatch, SchedError> {
        let p = self.cfg.page_size;
        let mut retracted = Vec::new();
        let need = loop {
            let need: usize = self
                .running
                .iter()
                .map(|id| self.alloc.pages_needed(self.reqs[id].slots.len(), 1))
                .sum::<usize>()
                * p;
            if need <= self.alloc.available() + self.evictable() {
                break need;
            }
            // Fewest output tokens first (least work lost), then the longest prompt (most
            // memory back), then the newest. NOTE: the last request is retracted only when it
            // cannot grow even alone; it then waits until Python gives up on it.
            let victim = self
                .running
                .iter()
                .map(|id| (id, &self.reqs[id]))
                .min_by_key(|(_, r)| (r.output_len, Reverse(r.prompt_len()), Reverse(r.seq)))
                .map(|(&id, _)| id);
            let Some(victim) = victim else { break 0 };
            self.retract(victim)?;
            retracted.push(victim);
        };
        if retracted.is_empty() {
            self.new_token_ratio = (self.new_token_ratio - self.cfg.new_token_ratio_decay)
                .max(self.cfg.min_new_token_ratio);
        } else {
            let (decoded, max_new) = self.running.iter().fold((0, 0), |(d, m), id| {
                let r = &self.reqs[id];
                (d + r.output_len, m + r.max_new_tokens)
            });
            let steps = RETRACT_DECODE_STEPS * self.running.len();
            self.new_token_ratio = if max_new == 0 {
                1.0
            } else {
                ((decoded + steps) as f64 / max_new as f64).min(1.0)
            };
        }
        self.make_room(need)?;
        let mut slots = Vec::with_capacity(self.running.len());
        for i in 0..self.running.len() {
            let id = self.running[i];
            self.grow(id, 1)?;
            let r = self
                .reqs
                .get_mut(&id)
                .ok_or(SchedError::UnknownRequest(id))?;
            r.state = State::Sampling;
            slots.extend(r.slots.last());
        }
        Ok(DecodeBatch {
            ids: self.running.clone(),
            slots,
            retracted,
        })
    }

    /// Moves a running request back to the waiting queue; its KV goes into the tree.
    fn retract(&mut self, id: u64) -> Result<(), SchedError> {
        self.release_kv(id)?;
        self.running.retain(|&r| r != id);
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

    /// Gives up a request's KV: the computed part goes into the tree (duplicates of what is
    /// already cached are freed), the unaligned tail is freed, the lock is released.
    fn release_kv(&mut self, id: u64) -> Result<(), SchedError> {
        let p = self.cfg.page_size;
        let r = self
            .reqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        let kv = r.slots.len();
        if self.cfg.enable_radix_cache {
            let cached = self
                .tree
                .insert(&r.tokens[..kv], &r.slots, &r.namespace)?
                .max(r.tree_owned);
            // `[tree_owned..cached]`: another request cached these tokens first; ours are
            // duplicates. `[cached..aligned]` now belongs to the tree.
            let mut free = r.slots[r.tree_owned..cached].to_vec();
            free.extend_from_slice(&r.slots[align_down(kv, p).max(cached)..]);
            if let Some(node) = r.node.take() {
                self.tree.unlock(node)?;
            }
            self.alloc.free(&free)?;
        } else {
            self.alloc.free(&r.slots)?;
        }
        r.slots.clear();
        r.tree_owned = 0;
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
        let remaining = r.max_new_tokens.saturating_sub(r.output_len);
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
