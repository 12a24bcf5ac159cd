//! Committing a step's sampled tokens: each token joins its request (or is dropped when the
//! request ended meanwhile), and the finish conditions are decided here, once: a stop id
//! after min_new_tokens, a stop string, max_new_tokens, the context length.

use super::request::{FinishKind, Finished};
use super::{BatchScheduler, SchedError};

/// What a commit decided, for the caller to send on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitResult {
    /// Requests that got a token, and the token (aligned; int64 for zero-copy hand-off).
    pub ids: Vec<i64>,
    pub tokens: Vec<i64>,
    /// (id, cached prompt tokens) of requests whose first output token this is.
    pub first: Vec<(u64, usize)>,
    /// Requests that ended with this commit (their last token, if any, is in `ids`).
    pub finished: Vec<Finished>,
}

impl BatchScheduler {
    /// Commits the oldest uncommitted step: `tokens[i]` is the token sampled for its i-th
    /// sampling sequence. Requests that ended since that step was planned drop their token.
    pub fn commit(&mut self, tokens: &[u32]) -> Result<CommitResult, SchedError> {
        let expected = self
            .in_flight
            .front()
            .ok_or(SchedError::NothingInFlight)?
            .len();
        if expected != tokens.len() {
            return Err(SchedError::LengthMismatch {
                expected,
                tokens: tokens.len(),
            });
        }
        let ids = self.in_flight.pop_front().unwrap_or_default();
        let mut out = CommitResult::default();
        for (&id, &tok) in ids.iter().zip(tokens) {
            if let Some(kind) = self.commit_one(id, tok, &mut out)? {
                out.finished.push(self.end(id, kind)?);
            }
        }
        Ok(out)
    }

    /// Drops the oldest uncommitted step (it failed): the requests it sampled for that are
    /// still in the system end (`FinishKind::Abort`), since their next token never came.
    pub fn abandon(&mut self) -> Result<Vec<Finished>, SchedError> {
        let ids = self
            .in_flight
            .pop_front()
            .ok_or(SchedError::NothingInFlight)?;
        let mut out = Vec::new();
        for id in ids {
            if self.reqs.contains_key(&id) {
                out.push(self.end(id, FinishKind::Abort)?);
            }
        }
        Ok(out)
    }

    /// Appends one sampled token to a live request; returns why it ends, if it does.
    fn commit_one(
        &mut self,
        id: u64,
        tok: u32,
        out: &mut CommitResult,
    ) -> Result<Option<FinishKind>, SchedError> {
        let Some(r) = self.reqs.get_mut(&id) else {
            return Ok(None); // ended after this step was planned: the token is dropped
        };
        if r.discard > 0 {
            r.discard -= 1; // requeued after this step was planned
            return Ok(None);
        }
        r.pending = r.pending.saturating_sub(1);
        if r.max_new_tokens == 0 {
            // Score only: the prompt was prefilled for its logits; no token is kept.
            return Ok(Some(FinishKind::Length(0)));
        }
        r.tokens.push(tok);
        let n_out = r.output_len();
        out.ids.push(id as i64);
        out.tokens.push(i64::from(tok));
        if n_out == 1 {
            out.first.push((id, r.cached_len));
        }
        if n_out >= r.min_new_tokens && r.stop_ids.contains(&tok) {
            return Ok(Some(FinishKind::StopToken(tok)));
        }
        if !r.stop_strings.is_empty() {
            // NOTE: a token the checker cannot decode matches no stop string.
            let stepped = self.stop_checker.as_mut().map(|c| c.step(id, &[tok]));
            if let Some(Ok(step)) = stepped {
                if let Some(i) = step.stop {
                    let matched = r.stop_strings.get(i).cloned().unwrap_or_default();
                    return Ok(Some(FinishKind::StopString(matched)));
                }
            }
        }
        if n_out >= r.max_new_tokens {
            return Ok(Some(FinishKind::Length(r.max_new_tokens)));
        }
        if r.tokens.len() >= self.cfg.context_len {
            return Ok(Some(FinishKind::Length(n_out)));
        }
        Ok(None)
    }
}
