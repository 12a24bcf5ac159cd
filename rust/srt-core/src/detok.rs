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
//!
//! # How text becomes final
//!
//! Each request keeps a *window*: the ids from the last clean cut point on. `ids[..read]` is the
//! part whose text (`decode(ids[..read])`) has been emitted. A step appends the new ids, decodes
//! the window and emits what lies past the emitted text, unless that text is not final yet:
//! - it ends in U+FFFD: the last character may still be incomplete UTF-8 (byte-level BPE);
//! - with a `ByteFallback` decoder, a trailing run of `<0xNN>` tokens is held whole until a
//!   non-byte token closes it, because the decoder turns the *whole* run into U+FFFD when any
//!   byte of it is invalid, so one stray byte would turn characters already shown into U+FFFD.
//!
//! Once a window holds more than `REBASE_AT` emitted ids it is cut back to the last `KEEP`,
//! so emitted tokens stay as left context: that keeps the leading space of the next token right
//! for decoders that strip it at the start of the text (Metaspace, `Strip(" ", 1, 0)`). The
//! window is thus bounded (about `REBASE_AT` ids plus what is held back) and each step decodes
//! only it: O(1) per token.
//!
//! Exactness holds while no byte-fallback run and no run of not-yet-final text exceeds
//! [`MAX_PENDING`] ids; past that, text is released anyway (trailing incomplete UTF-8 excepted)
//! so that memory and time stay bounded on pathological output.
//!
//! # What the deltas add up to
//!
//! With `P` the prompt ids and `G` the generated ids, and no stop string matched: all deltas plus
//! the final flush equal `decode(P ++ G)` minus its prefix `decode(P)`. More precisely they
//! equal `decode(P ++ G)` from the end of its longest common prefix with `decode(P)`: the same
//! thing when `decode(P)` is a prefix, and otherwise (the prompt ends inside a UTF-8 character
//! or a byte run that the generation completes or makes invalid) the first delta restarts at
//! the first character that changed. So the first token's leading space is kept after a
//! non-empty prompt and dropped (by Strip / Metaspace decoders) after an empty one or one made
//! only of skipped special tokens, exactly as the full decode does.
//!
//! # Special tokens
//!
//! - `skip_special_tokens`: special tokens (added tokens marked special) are dropped before
//!   decoding, as `tokenizer.decode(ids, true)` does; `spaces_between_special_tokens` is moot.
//! - not skipped, `spaces_between_special_tokens == false`: special tokens go through the
//!   tokenizer's decoder like any other token: the text is `tokenizer.decode(ids, false)`.
//! - not skipped, `spaces_between_special_tokens == true` (HF slow tokenizers' option): the ids
//!   are split at every special token; each maximal run of other ids is decoded on its own
//!   (`decode(run, false)`, so a Strip decoder drops a run's leading space), each special token
//!   contributes its content verbatim, and the non-empty pieces are joined with one `' '`.
//!   E.g. `<|im_start|>` `user` -> `"<|im_start|> user"`, and `▁Hi` `</s>` -> `"Hi </s>"`.
//!
//! # Stop strings
//!
//! Matched on the final text of the generation (never the prompt). The stop string that
//! completes first wins (ties: the longest, then the first listed), so the outcome does not
//! depend on how text was split into tokens. Text is released only when no suffix of it could
//! start a stop string; after a match nothing more is released. A stop string that only the
//! final flush completes (text held as incomplete UTF-8 until then) is cut there too, but
//! `finish` returns text only.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

mod stop;
use stop::StopFilter;

/// Prompt ids kept as left context for the first generated tokens.
const PROMPT_CONTEXT: usize = 8;
/// Emitted ids a window may hold before it is cut back to its last `KEEP` emitted ids.
const REBASE_AT: usize = 4;
/// Emitted ids kept as left context when a window is cut.
const KEEP: usize = 2;
/// Ids a window may hold back before they are released regardless (see module docs).
pub const MAX_PENDING: usize = 128;

const REPLACEMENT: char = '\u{FFFD}';

#[derive(Debug, Error, PartialEq, Eq)]
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
    /// Index into `DecodeParams::stop` of the stop string that matched, if one did. Stays set
    /// in every later step of the request.
    pub stop: Option<usize>,
}

/// What the decoder makes of an id, computed once per tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// Not in the vocabulary: `decode` drops it.
    Unknown,
    Normal,
    /// `<0xNN>` (its byte), under a decoder that contains `ByteFallback`.
    Byte(u8),
    /// An added token marked special.
    Special,
}

/// The tokenizer plus per-id facts, shared by all requests.
struct Vocab {
    tokenizer: Tokenizer,
    kinds: Vec<TokenKind>,
    /// Content of each special token (what `spaces_between_special_tokens` mode shows).
    special_text: HashMap<u32, String>,
}

impl Vocab {
    fn new(tokenizer: Tokenizer) -> Self {
        let byte_fallback = tokenizer.get_decoder().is_some_and(has_byte_fallback);
        let max_id = tokenizer.get_vocab(true).into_values().max();
        let added = tokenizer.get_added_tokens_decoder();
        let mut kinds = Vec::with_capacity(max_id.map_or(0, |m| m as usize + 1));
        let mut special_text = HashMap::new();
        for id in max_id.into_iter().flat_map(|m| 0..=m) {
            // NOTE: same lookup and same special check as `Tokenizer::decode`, so a kind here
            // means exactly what decode will do with the id.
            let kind = match tokenizer.id_to_token(id) {
                None => TokenKind::Unknown,
                Some(tok) if tokenizer.get_added_vocabulary().is_special_token(&tok) => {
                    let content = added.get(&id).map_or(tok, |t| t.content.clone());
                    special_text.insert(id, content);
                    TokenKind::Special
                }
                Some(tok) if byte_fallback => {
                    byte_token(&tok).map_or(TokenKind::Normal, TokenKind::Byte)
                }
                Some(_) => TokenKind::Normal,
            };
            kinds.push(kind);
        }
        Vocab {
            tokenizer,
            kinds,
            special_text,
        }
    }

    fn kind(&self, id: u32) -> TokenKind {
        self.kinds
            .get(id as usize)
            .copied()
            .unwrap_or(TokenKind::Unknown)
    }

    /// Decodes window ids (special tokens that must be skipped never enter a window).
    fn decode(&self, ids: &[u32]) -> Result<String, DetokError> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| DetokError::Decode(e.to_string()))
    }
}

fn has_byte_fallback(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteFallback(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(has_byte_fallback),
        _ => false,
    }
}

/// The byte of a `<0xNN>` token, by the test `ByteFallback` applies to a token string.
fn byte_token(tok: &str) -> Option<u8> {
    if tok.len() == 6 && tok.starts_with("<0x") && tok.ends_with('>') {
        tok.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok())
    } else {
        None
    }
}

/// Special-token handling of a request, fixed when it is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Special tokens are dropped.
    Skip,
    /// Special tokens go through the decoder.
    Inline,
    /// Special tokens split the text into separately decoded pieces joined by spaces.
    Spaced,
}

/// What one id does to a request's state.
enum Role {
    Ignore,
    Token { byte: bool },
    Break,
}

impl Mode {
    fn of(params: &DecodeParams) -> Mode {
        match (
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
        ) {
            (true, _) => Mode::Skip,
            (false, false) => Mode::Inline,
            (false, true) => Mode::Spaced,
        }
    }

    fn role(self, kind: TokenKind) -> Role {
        match (kind, self) {
            (TokenKind::Unknown, _) | (TokenKind::Special, Mode::Skip) => Role::Ignore,
            (TokenKind::Special, Mode::Spaced) => Role::Break,
            (TokenKind::Byte(_), _) => Role::Token { byte: true },
            (TokenKind::Normal, _) | (TokenKind::Special, Mode::Inline) => {
                Role::Token { byte: false }
            }
        }
    }
}

/// The ids still needed to decode what comes next (see module docs).
#[derive(Debug, Default)]
struct Window {
    ids: Vec<u32>,
    /// `ids[..read]` have had their text emitted.
    read: usize,
    /// `decode(ids[..read])`.
    text: String,
    /// Start of the trailing run of byte-fallback ids, if the window ends in one.
    run_start: Option<usize>,
    /// `end` of the last attempt that released nothing; retrying it is pointless.
    failed_end: usize,
}

impl Window {
    fn push(&mut self, id: u32, byte: bool) {
        if !byte {
            self.run_start = None;
        } else if self.run_start.is_none() {
            self.run_start = Some(self.ids.len());
        }
        self.ids.push(id);
    }

    fn pending(&self) -> usize {
        self.ids.len() - self.read
    }

    /// Releases the text of the window that is final. `force` releases even text that is not
    /// (bounded memory on pathological output), keeping only trailing incomplete UTF-8.
    fn advance(&mut self, vocab: &Vocab, force: bool) -> Result<String, DetokError> {
        let len = self.ids.len();
        let mut end = match self.run_start {
            Some(start) if !force => start,
            _ => len,
        };
        if end <= self.read || (!force && end == self.failed_end) {
            return Ok(String::new());
        }
        let mut text = vocab.decode(&self.ids[..end])?;
        if force && text.ends_with(REPLACEMENT) {
            // An incomplete character spans at most 3 bytes, so at most 3 ids.
            for back in 1..=3 {
                if len - back <= self.read {
                    break;
                }
                let shorter = vocab.decode(&self.ids[..len - back])?;
                if !shorter.ends_with(REPLACEMENT) {
                    end = len - back;
                    text = shorter;
                    break;
                }
            }
        }
        if !force && (text.ends_with(REPLACEMENT) || text.len() <= self.text.len()) {
            self.failed_end = end;
            return Ok(String::new());
        }
        let delta = text[common_prefix(&self.text, &text)..].to_owned();
        self.read = end;
        self.text = text;
        self.failed_end = 0;
        if self.read > REBASE_AT {
            // NOTE: any cut before `read` is sound: what decodes after `read` does not depend
            // on the ids before it (`read` ends a complete character and no byte run is open
            // across it), and the ids kept give the text after `read` the left context that
            // Strip / Metaspace decoders look at. A cut through a closed byte run or a
            // character only changes the window's own leading text, on both sides of a diff.
            let mut cut = self.read - KEEP;
            if let Some(start) = self.run_start {
                // After a forced release an open byte run spans `read`: cut only where a
                // character starts, so the run's kept part stays valid UTF-8.
                while cut > start
                    && matches!(vocab.kind(self.ids[cut]), TokenKind::Byte(b) if b & 0xC0 == 0x80)
                {
                    cut -= 1;
                }
            }
            self.ids.drain(..cut);
            self.read -= cut;
            self.run_start = self.run_start.map(|s| s.saturating_sub(cut));
            self.text = vocab.decode(&self.ids[..self.read])?;
        }
        Ok(delta)
    }

    /// Releases everything left, lossily: the window's text is final.
    fn flush(&mut self, vocab: &Vocab) -> Result<String, DetokError> {
        let delta = if self.read == self.ids.len() {
            String::new()
        } else {
            let text = vocab.decode(&self.ids)?;
            text[common_prefix(&self.text, &text)..].to_owned()
        };
        *self = Window::default();
        Ok(delta)
    }
}

/// Byte length of the longest common prefix of `a` and `b`, at a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    if b.starts_with(a) {
        return a.len();
    }
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Per-request state.
#[derive(Debug)]
struct Request {
    mode: Mode,
    window: Window,
    /// Spaced mode: a non-empty piece precedes the current one.
    piece_before: bool,
    /// Spaced mode: the current piece has shown text.
    piece_started: bool,
    stop: StopFilter,
}

impl Request {
    fn new(vocab: &Vocab, prompt: &[u32], params: &DecodeParams) -> Result<Self, DetokError> {
        let mode = Mode::of(params);
        // The prompt's last ids (since its last special token in Spaced mode), and the whole
        // byte run it may end in: the generation can still continue that run.
        let mut tail = Vec::new();
        let (mut piece_before, mut truncated, mut open_run) = (false, false, true);
        for &id in prompt.iter().rev() {
            match mode.role(vocab.kind(id)) {
                Role::Ignore => {}
                Role::Break => {
                    piece_before = true;
                    break;
                }
                Role::Token { byte } => {
                    open_run &= byte;
                    if tail.len() >= PROMPT_CONTEXT && !(open_run && tail.len() < MAX_PENDING) {
                        truncated = true;
                        break;
                    }
                    tail.push(id);
                }
            }
        }
        tail.reverse();
        let mut window = Window::default();
        for &id in &tail {
            window.push(id, matches!(vocab.kind(id), TokenKind::Byte(_)));
        }
        window.read = tail.len();
        window.text = vocab.decode(&tail)?;
        Ok(Request {
            mode,
            piece_started: truncated || !window.text.is_empty(),
            piece_before,
            window,
            stop: StopFilter::new(&params.stop, params.no_stop_trim),
        })
    }

    /// Appends a piece of decoded text, with the separator Spaced mode puts before a piece.
    fn emit(&mut self, text: &str, out: &mut String) {
        if text.is_empty() {
            return;
        }
        if self.mode == Mode::Spaced && !self.piece_started {
            if self.piece_before {
                out.push(' ');
            }
            self.piece_started = true;
        }
        out.push_str(text);
    }

    fn step(&mut self, vocab: &Vocab, new_ids: &[u32]) -> Result<StepOutput, DetokError> {
        if self.stop.matched.is_some() {
            return Ok(self.output(String::new()));
        }
        let mut out = String::new();
        for &id in new_ids {
            match self.mode.role(vocab.kind(id)) {
                Role::Ignore => {}
                Role::Token { byte } => self.window.push(id, byte),
                Role::Break => {
                    let rest = self.window.flush(vocab)?;
                    self.emit(&rest, &mut out);
                    if self.piece_before || self.piece_started {
                        out.push(' ');
                    }
                    if let Some(content) = vocab.special_text.get(&id) {
                        out.push_str(content);
                    }
                    self.piece_before = true;
                    self.piece_started = false;
                }
            }
        }
        let force = self.window.pending() > MAX_PENDING;
        let delta = self.window.advance(vocab, force)?;
        self.emit(&delta, &mut out);
        let text = self.stop.push(&out);
        if self.stop.matched.is_some() {
            // Nothing after a stop string is ever shown: the ids are no longer needed.
            self.window = Window::default();
        }
        Ok(self.output(text))
    }

    fn finish(&mut self, vocab: &Vocab) -> Result<String, DetokError> {
        if self.stop.matched.is_some() {
            return Ok(String::new());
        }
        let mut out = String::new();
        let rest = self.window.flush(vocab)?;
        self.emit(&rest, &mut out);
        let mut text = self.stop.push(&out);
        text.push_str(&self.stop.flush());
        Ok(text)
    }

    fn output(&self, text: String) -> StepOutput {
        StepOutput {
            text,
            stop: self.stop.matched,
        }
    }
}

pub struct Detokenizer {
    vocab: Arc<Vocab>,
    requests: HashMap<u64, Request>,
}

impl Detokenizer {
    /// Loads a `tokenizer.json`, or the `tokenizer.json` inside the given folder.
    pub fn from_file(path: &str) -> Result<Self, DetokError> {
        let mut file = Path::new(path).to_path_buf();
        if file.is_dir() {
            file.push("tokenizer.json");
        }
        let json = std::fs::read_to_string(&file)
            .map_err(|e| DetokError::Load(format!("{}: {e}", file.display())))?;
        Self::from_json(&json).map_err(|e| match e {
            DetokError::Load(msg) => DetokError::Load(format!("{}: {msg}", file.display())),
            other => other,
        })
    }

    /// Loads a tokenizer from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self, DetokError> {
        let tokenizer = Tokenizer::from_str(json).map_err(|e| DetokError::Load(e.to_string()))?;
        Ok(Self::from_tokenizer(tokenizer))
    }

    /// Wraps an already built tokenizer.
    pub fn from_tokenizer(tokenizer: Tokenizer) -> Self {
        Detokenizer {
            vocab: Arc::new(Vocab::new(tokenizer)),
            requests: HashMap::new(),
        }
    }

    pub fn add_request(
        &mut self,
        id: u64,
        prompt_ids: &[u32],
        params: DecodeParams,
    ) -> Result<(), DetokError> {
        if self.requests.contains_key(&id) {
            return Err(DetokError::DuplicateRequest(id));
        }
        let request = Request::new(&self.vocab, prompt_ids, &params)?;
        self.requests.insert(id, request);
        Ok(())
    }

    pub fn step(&mut self, id: u64, new_ids: &[u32]) -> Result<StepOutput, DetokError> {
        let request = self
            .requests
            .get_mut(&id)
            .ok_or(DetokError::UnknownRequest(id))?;
        request.step(&self.vocab, new_ids)
    }

    /// Many requests' new ids at once (one call per detokenizer batch).
    pub fn step_batch(&mut self, items: &[(u64, Vec<u32>)]) -> Vec<Result<StepOutput, DetokError>> {
        items.iter().map(|(id, ids)| self.step(*id, ids)).collect()
    }

    pub fn finish(&mut self, id: u64) -> Result<String, DetokError> {
        let mut request = self
            .requests
            .remove(&id)
            .ok_or(DetokError::UnknownRequest(id))?;
        request.finish(&self.vocab)
    }

    /// Forgets a request without flushing (abort).
    pub fn remove(&mut self, id: u64) -> bool {
        self.requests.remove(&id).is_some()
    }

    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Whether a request with this id is live.
    pub fn contains(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }

    /// Number of ids a request keeps for decoding (bounded; diagnostics and tests).
    pub fn window_len(&self, id: u64) -> Option<usize> {
        self.requests.get(&id).map(|r| r.window.ids.len())
    }

    /// Plain full decode (tests, logprob token texts).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DetokError> {
        self.vocab
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| DetokError::Decode(e.to_string()))
    }
}
