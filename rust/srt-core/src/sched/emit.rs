//! What one planned sequence contributes to a step's arrays: its batch entry, the tokens it
//! computes, the table writes that bring its row up to date, its sample, and, when it was
//! given a row this step, its sampling parameters and token history.

use super::request::{flags, Req};
use super::step::{FloatSection, Section, StepBuilder};

impl Req {
    /// Batch entry, tokens `from..to` (input ids, positions, KV slots), and the table writes
    /// for every column this request's row does not hold yet.
    pub(super) fn emit_sequence(&mut self, b: &mut StepBuilder, id: u64, from: usize, to: usize) {
        let row = self.row.expect("a planned request holds a row");
        b.push(Section::Ids, id as i64);
        b.push(Section::Rows, i64::from(row));
        b.push(Section::SeqLens, to as i64);
        b.push(Section::SeqFlags, i64::from(self.flags));
        b.all_flags |= self.flags;
        for pos in from..to {
            // NOTE: a position past the committed tokens is a sample still in flight.
            let tok = self.tokens.get(pos).map_or(-1, |&t| i64::from(t));
            b.push(Section::InputIds, tok);
            b.push(Section::Positions, pos as i64);
            b.push(Section::OutLoc, i64::from(self.slots[pos]));
        }
        for col in self.table_len..self.slots.len() {
            b.push(Section::TableRows, i64::from(row));
            b.push(Section::TableCols, col as i64);
            b.push(Section::TableSlots, i64::from(self.slots[col]));
        }
        self.table_len = self.slots.len();
    }

    /// Marks batch entry `batch_pos` as sampling its next token: the token's output index,
    /// and the min_new_tokens masks over the stop ids while the output is too short.
    pub(super) fn emit_sample(&mut self, b: &mut StepBuilder, batch_pos: usize) {
        let sample = b.len(Section::SamplePos) as i64;
        let out_index = self.len() - self.prompt_len;
        b.push(Section::SamplePos, batch_pos as i64);
        b.push(
            Section::SampleRows,
            i64::from(self.row.expect("a sampling request holds a row")),
        );
        b.push(Section::SampleSteps, out_index as i64);
        if out_index < self.min_new_tokens {
            for &t in &self.stop_ids {
                b.push(Section::MaskSample, sample);
                b.push(Section::MaskTokens, i64::from(t));
            }
        }
        b.flags |= self.flags;
        b.top_k_max = b.top_k_max.max(self.filter_top_k());
        self.pending += 1;
    }

    /// The sampling state of a request that was given a row this step: its parameters, and
    /// the token history its penalties need (a retracted request comes back with outputs).
    pub(super) fn emit_admission(&self, b: &mut StepBuilder) {
        let row = i64::from(self.row.expect("an admitted request holds a row"));
        let s = &self.sampling;
        b.push(Section::AdmitRows, row);
        b.push(Section::AdmitTopK, s.top_k);
        // Seeds travel as the int64 with the same bits.
        b.push(Section::AdmitSeed, s.seed as i64);
        for v in [
            s.temperature,
            s.top_p,
            s.min_p,
            s.repetition_penalty,
            s.frequency_penalty,
            s.presence_penalty,
        ] {
            b.push_float(FloatSection::AdmitFloats, v);
        }
        for &(tok, v) in &s.logit_bias {
            b.push(Section::BiasRows, row);
            b.push(Section::BiasTokens, i64::from(tok));
            b.push_float(FloatSection::BiasValues, v);
        }
        if self.flags & flags::REPETITION_PENALTY != 0 {
            b.extend(
                Section::SeenRows,
                std::iter::repeat_n(row, self.tokens.len()),
            );
            b.extend(
                Section::SeenTokens,
                self.tokens.iter().map(|&t| i64::from(t)),
            );
        }
        if self.flags & flags::OUTPUT_PENALTY != 0 {
            let outputs = &self.tokens[self.prompt_len..];
            b.extend(Section::CountRows, std::iter::repeat_n(row, outputs.len()));
            b.extend(Section::CountTokens, outputs.iter().map(|&t| i64::from(t)));
        }
    }
}
