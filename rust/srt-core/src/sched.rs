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

use crate::alloc::{AllocError, SlotAllocator};
use crate::radix::{NodeId, RadixError, RadixTree};
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

pub struct BatchScheduler {
    // implementation detail: config, tree, allocator, request table, queue, chunked request,
    // new_token_ratio, rng state
}

impl BatchScheduler {
    pub fn new(cfg: SchedConfig) -> Result<Self, SchedError> {
        todo!()
    }
    pub fn config(&self) -> &SchedConfig {
        todo!()
    }
    pub fn add_request(&mut self, req: NewRequest) -> Result<(), SchedError> {
        todo!()
    }
    pub fn schedule(&mut self) -> Result<Plan, SchedError> {
        todo!()
    }
    pub fn commit(&mut self, ids: &[u64], tokens: &[u32]) -> Result<(), SchedError> {
        todo!()
    }
    pub fn finish(&mut self, id: u64) -> Result<(), SchedError> {
        todo!()
    }
    /// True if `id` is known (waiting, mid-chunk or running).
    pub fn contains(&self, id: u64) -> bool {
        todo!()
    }
    pub fn stats(&self) -> SchedStats {
        todo!()
    }
    /// Empties the prefix cache; refused while any request is in the system.
    pub fn flush_cache(&mut self) -> Result<(), SchedError> {
        todo!()
    }
    /// Checks: every slot is free, owned by the tree, or owned by exactly one request;
    /// evictable + protected = tree total; at most one request mid-chunk.
    pub fn check_invariants(&self) -> Result<(), String> {
        todo!()
    }
    pub fn tree(&self) -> &RadixTree {
        todo!()
    }
    pub fn allocator(&self) -> &SlotAllocator {
        todo!()
    }
}

// `NodeId` is part of the request table's state (the locked node of each admitted request).
#[allow(dead_code)]
type LockedNode = NodeId;
