//! The one record of a request in the scheduler process: what it is (prompt, limits, stop
//! conditions, sampling parameters) and where it stands (tokens so far, samples in flight, KV
//! slots, table row, queue state).

use super::{NodeId, State};
use crate::detok::DecodeParams;

/// Sampling parameters of one request, as numbers. The scheduler does not sample; it hands
/// these to the caller's per-row sampling state when the request is admitted to a row
/// (`Section::AdmitRows` and friends), and derives the step's feature flags from them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// <= 0: no top-k; 1: greedy.
    pub top_k: i64,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Seed of the request's draws (the caller picks one when the client gave none).
    pub seed: u64,
    /// (token id, bias) added to the logits before anything else.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    /// Greedy, no penalties.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

/// Feature bits of a request (`SamplingParams::flags`, plus the caller's own bits from
/// `USER_SHIFT` up). A step reports the OR over its sampling rows (`Step::flags`) and over
/// all its sequences (`Step::all_flags`), so the caller skips whatever no row needs.
pub mod flags {
    /// Not greedy: the row draws from its distribution.
    pub const SAMPLED: u32 = 1;
    /// A sampled row with top-k or top-p filtering.
    pub const TOP_K_P: u32 = 1 << 1;
    /// A sampled row with min-p filtering.
    pub const MIN_P: u32 = 1 << 2;
    /// Frequency or presence penalty: needs counts of the output tokens.
    pub const OUTPUT_PENALTY: u32 = 1 << 3;
    /// Repetition penalty: needs the set of prompt and output tokens.
    pub const REPETITION_PENALTY: u32 = 1 << 4;
    pub const LOGIT_BIAS: u32 = 1 << 5;
    /// min_new_tokens with stop ids to mask.
    pub const MIN_TOKENS: u32 = 1 << 6;
    /// Greedy (the argmax is its token).
    pub const GREEDY: u32 = 1 << 7;
    /// A presence penalty (beside `OUTPUT_PENALTY`, which a frequency penalty also sets).
    pub const PRESENCE_PENALTY: u32 = 1 << 8;
    /// Bits from here up are the caller's (e.g. "needs host work"); the scheduler only ORs them.
    pub const USER_SHIFT: u32 = 16;
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The features these parameters use (the `flags` module's bits below `USER_SHIFT`).
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.is_greedy() {
            f |= flags::GREEDY;
        } else {
            f |= flags::SAMPLED;
            if self.top_k > 1 || self.top_p < 1.0 {
                f |= flags::TOP_K_P;
            }
            if self.min_p > 0.0 {
                f |= flags::MIN_P;
            }
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            f |= flags::OUTPUT_PENALTY;
        }
        if self.presence_penalty != 0.0 {
            f |= flags::PRESENCE_PENALTY;
        }
        if self.repetition_penalty != 1.0 {
            f |= flags::REPETITION_PENALTY;
        }
        if !self.logit_bias.is_empty() {
            f |= flags::LOGIT_BIAS;
        }
        f
    }
}

/// Stop strings of a request: checked on the committed tokens by the scheduler's stop checker
/// (an incremental detokenizer), decoding from the prompt's last ids with these settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStrings {
    pub prompt_tail: Vec<u32>,
    pub params: DecodeParams,
}

#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: u64,
    /// Prompt token ids.
    pub tokens: Vec<u32>,
    /// 0: score only (the prompt is prefilled, the sampled token is dropped and the request
    /// finishes with `Length(0)`).
    pub max_new_tokens: usize,
    /// Stop ids cannot end the request (and are masked from sampling) before this many tokens.
    pub min_new_tokens: usize,
    /// Token ids that end the request (the caller adds EOS unless it is ignored).
    pub stop_ids: Vec<u32>,
    pub stop_strings: Option<StopStrings>,
    /// Prefix-cache namespace (cache salt); "" by default.
    pub namespace: String,
    pub sampling: SamplingParams,
    /// The caller's feature bits, shifted by `flags::USER_SHIFT` by the caller.
    pub user_flags: u32,
    /// Arrival time in seconds (any clock the caller also passes to `expired`).
    pub arrival: f64,
}

impl NewRequest {
    /// A greedy request without stop conditions in the default namespace.
    pub fn new(id: u64, tokens: Vec<u32>, max_new_tokens: usize) -> Self {
        NewRequest {
            id,
            tokens,
            max_new_tokens,
            min_new_tokens: 0,
            stop_ids: Vec::new(),
            stop_strings: None,
            namespace: String::new(),
            sampling: SamplingParams::default(),
            user_flags: 0,
            arrival: 0.0,
        }
    }
}

/// Why a request ended, as decided by `commit` (or `Abort` for `finish` / `abandon`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishKind {
    /// A stop id (or EOS) was sampled.
    StopToken(u32),
    /// The output's text matched this stop string.
    StopString(String),
    /// max_new_tokens (or the context length) was reached; the output length.
    Length(usize),
    /// Ended by the caller.
    Abort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: u64,
    pub kind: FinishKind,
    /// Output tokens the request produced (committed).
    pub output_len: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_len: usize,
}

pub(super) struct Req {
    /// Prompt followed by the committed output tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Samples planned and not yet committed (at most one when a step is planned).
    pub pending: usize,
    /// Samples in flight whose tokens are to be dropped at their commit (see `requeue`).
    pub discard: usize,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub stop_ids: Vec<u32>,
    /// The stop strings, when the stop checker follows this request.
    pub stop_strings: Vec<String>,
    pub sampling: SamplingParams,
    pub flags: u32,
    pub arrival: f64,
    pub namespace: String,
    /// Arrival order; a retracted request keeps it, so it goes back near the queue's front.
    pub seq: u64,
    /// KV slots of positions `0..slots.len()`.
    pub slots: Vec<u32>,
    /// NOTE: `slots[..tree_owned]` belong to the tree (locked through `node`);
    /// `slots[tree_owned..]` belong to the request. `tree_owned` is page aligned.
    pub tree_owned: usize,
    pub node: Option<NodeId>,
    pub cached_len: usize,
    /// The request-to-token table row, while admitted.
    pub row: Option<u32>,
    /// Table columns `0..table_len` of `row` hold `slots[..table_len]` (as written by the
    /// steps so far): a plan writes only what changed.
    pub table_len: usize,
    pub state: State,
}

impl Req {
    pub fn new(r: NewRequest, seq: u64) -> Self {
        let stop_strings = r.stop_strings.map(|s| s.params.stop).unwrap_or_default();
        let mut flags = r.sampling.flags() | r.user_flags;
        if r.min_new_tokens > 0 && !r.stop_ids.is_empty() {
            flags |= flags::MIN_TOKENS;
        }
        Req {
            prompt_len: r.tokens.len(),
            tokens: r.tokens,
            pending: 0,
            discard: 0,
            max_new_tokens: r.max_new_tokens,
            min_new_tokens: r.min_new_tokens,
            stop_ids: r.stop_ids,
            stop_strings,
            sampling: r.sampling,
            flags,
            arrival: r.arrival,
            namespace: r.namespace,
            seq,
            slots: Vec::new(),
            tree_owned: 0,
            node: None,
            cached_len: 0,
            row: None,
            table_len: 0,
            state: State::Waiting,
        }
    }

    /// Committed output tokens.
    pub fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens including the samples in flight.
    pub fn len(&self) -> usize {
        self.tokens.len() + self.pending
    }

    /// The key matched against the prefix cache: the last token is always computed, since its
    /// logits give the next token.
    pub fn match_key(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - 1]
    }

    /// The top-k this request's sampling filter keeps: 0 without top-k / top-p filtering,
    /// `u64::MAX` for top-p alone (the whole vocabulary is a candidate).
    pub fn filter_top_k(&self) -> u64 {
        if self.flags & flags::TOP_K_P == 0 {
            0
        } else if self.sampling.top_k > 0 {
            self.sampling.top_k as u64
        } else {
            u64::MAX
        }
    }

    /// Whether the samples in flight already end the request (max_new_tokens or the context
    /// length), so planning another token for it would be wasted.
    pub fn done_when_committed(&self, context_len: usize) -> bool {
        let outputs = self.len() - self.prompt_len;
        outputs >= self.max_new_tokens.max(1) || self.len() >= context_len
    }
}
