//! Incremental detokenizer on the `tokenizers` crate.
//!
//! API CONTRACT (fixed; the detokenizer process, the scheduler's stop-string check and the
//! bindings are written against it):
//! - `Detokenizer` owns the tokenizer and per-request state keyed by a `u64` id.
//! - `add_request(id, prompt_ids, params)`: `prompt_ids` give the decoding context (the text of
//!   the first generated token depends on what precedes it, e.g. SentencePiece's leading space);
//!   only a bounded tail of them is kept.
//! - `step(id, new_ids)` -> the text that became final. It holds back incomplete UTF-8 and any
//!   tail that could be the start of a stop string. When a stop string appears, `stop` is set,
//!   the text is cut at the stop string (kept when `no_stop_trim`), and later steps return "".
//! - `finish(id)` flushes what was held back (lossy for incomplete UTF-8, never a partial stop
//!   string if one matched) and forgets the request.
//! - Per request: prompt text + all deltas + final flush = decode(prompt + generated) minus
//!   decode(prompt), i.e. the deltas concatenate to the decoded generation, when no stop string
//!   matched. O(1) amortized per token: only a window of recent ids is ever re-decoded.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DetokError {
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    #[error("request {0} already exists")]
    DuplicateRequest(u64),
    #[error("unknown request {0}")]
    UnknownRequest(u64),
    #[error("decode failed: {0}")]
    Decode(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeParams {
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    pub stop: Vec<String>,
    /// Keep the matched stop string in the output.
    pub no_stop_trim: bool,
}

impl Default for DecodeParams {
    fn default() -> Self {
        DecodeParams {
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            stop: Vec::new(),
            no_stop_trim: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepOutput {
    /// Text that became final with this step.
    pub text: String,
    /// Index into `DecodeParams::stop` of the stop string that matched, if one did.
    pub stop: Option<usize>,
}

pub struct Detokenizer {
    // implementation detail: Arc<tokenizers::Tokenizer>, per-request state
}

impl Detokenizer {
    pub fn from_file(path: &str) -> Result<Self, DetokError> {
        todo!()
    }
    pub fn from_json(json: &str) -> Result<Self, DetokError> {
        todo!()
    }
    pub fn add_request(
        &mut self,
        id: u64,
        prompt_ids: &[u32],
        params: DecodeParams,
    ) -> Result<(), DetokError> {
        todo!()
    }
    pub fn step(&mut self, id: u64, new_ids: &[u32]) -> Result<StepOutput, DetokError> {
        todo!()
    }
    /// Many requests' new ids at once (one call per detokenizer batch).
    pub fn step_batch(&mut self, items: &[(u64, Vec<u32>)]) -> Vec<Result<StepOutput, DetokError>> {
        todo!()
    }
    pub fn finish(&mut self, id: u64) -> Result<String, DetokError> {
        todo!()
    }
    /// Forgets a request without flushing (abort).
    pub fn remove(&mut self, id: u64) -> bool {
        todo!()
    }
    pub fn num_requests(&self) -> usize {
        todo!()
    }
    /// Plain full decode (tests, logprob token texts).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DetokError> {
        todo!()
    }
}
