//! Decode planning: one more token for every running request that can still grow, retracting
//! requests back to the waiting queue when the KV pool cannot hold that growth.

use super::step::{Section, Step, StepBuilder, StepKind};
use super::{BatchScheduler, SchedError};
use std::cmp::Reverse;

/// Retraction resets the ratio as if every remaining request will need this many more steps
/// (SGLang: `retract_decode_steps`).
const RETRACT_DECODE_STEPS: usize = 10;

impl BatchScheduler {
    /// The running requests that get a token this step: all but those whose samples in flight
    /// already end them.
    fn growing(&self) -> Vec<u64> {
        let ctx = self.cfg.context_len;
        self.running
            .iter()
            .copied()
            .filter(|id| !self.reqs[id].done_when_committed(ctx))
            .collect()
    }

    pub(super) fn plan_decode(&mut self) -> Result<Step, SchedError> {
        let p = self.cfg.page_size;
        let mut b = StepBuilder::default();
        let mut growing = self.growing();
        if growing.is_empty() {
            return Ok(b.build(StepKind::Idle));
        }
        let mut retracted = false;
        let need = loop {
            let need: usize = growing
                .iter()
                .map(|id| {
                    let r = &self.reqs[id];
                    self.alloc.pages_needed(r.slots.len(), 1)
                })
                .sum::<usize>()
                * p;
            if need <= self.alloc.available() + self.evictable() {
                break need;
            }
            // Fewest output tokens first (least work lost), then the longest prompt (most
            // memory back), then the newest. NOTE: the last request is retracted only when it
            // cannot grow even alone; it then waits until the caller gives up on it.
            let victim = growing
                .iter()
                .map(|id| (*id, &self.reqs[id]))
                .min_by_key(|(_, r)| (r.output_len(), Reverse(r.prompt_len), Reverse(r.seq)))
                .map(|(id, _)| id);
            let Some(victim) = victim else { break 0 };
            self.retract(victim)?;
            growing.retain(|&id| id != victim);
            b.push(Section::Retracted, victim as i64);
            retracted = true;
        };
        if !retracted {
            self.new_token_ratio = (self.new_token_ratio - self.cfg.new_token_ratio_decay)
                .max(self.cfg.min_new_token_ratio);
        } else {
            let (decoded, max_new) = self.running.iter().fold((0, 0), |(d, m), id| {
                let r = &self.reqs[id];
                (d + r.output_len(), m + r.max_new_tokens)
            });
            let steps = RETRACT_DECODE_STEPS * self.running.len();
            self.new_token_ratio = if max_new == 0 {
                1.0
            } else {
                ((decoded + steps) as f64 / max_new as f64).min(1.0)
            };
        }
        if growing.is_empty() {
            return Ok(b.build(StepKind::Idle));
        }
        self.make_room(need)?;
        for (i, &id) in growing.iter().enumerate() {
            self.grow(id, 1)?;
            let r = self
                .reqs
                .get_mut(&id)
                .ok_or(SchedError::UnknownRequest(id))?;
            let len = r.len();
            r.emit_sequence(&mut b, id, len - 1, len);
            r.emit_sample(&mut b, i);
        }
        Ok(b.build(StepKind::Decode))
    }

    /// Moves a running request back to the waiting queue; its KV goes into the tree and its
    /// row is freed. A sample of it still in flight is committed while it waits.
    fn retract(&mut self, id: u64) -> Result<(), SchedError> {
        self.unadmit(id)?;
        self.retracted_total += 1;
        self.enqueue_waiting(id)
    }
}
